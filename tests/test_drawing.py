"""The drawing interface and `easygen draw`, on the tiny BiDiffuser (the released systems' backends
have their own test files): seeds honoured, a batch equal to its images drawn alone, one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from drawing import DrawingError, draw_in_batches, load_backend
from easygen.cli import main as easygen_main


@pytest.fixture(scope="module")
def backend(tiny_dir):
    return load_backend("bidiffuser", tiny_dir, device="cpu", steps=2)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_seeds_and_batches(backend):
    prompts = ["a red square", "a blue circle on a white background, drawn with a thin outline"]
    batch = draw_in_batches(backend, prompts, [3, 4])
    alone = [backend.draw([p], [s])[0] for p, s in zip(prompts, [3, 4])]
    for a, b in zip(batch, alone):  # image i depends on prompt i and seed i only
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    again = backend.draw([prompts[0]], [3])[0]
    other = backend.draw([prompts[0]], [5])[0]
    assert np.array_equal(pixels(again), pixels(alone[0]))
    assert not np.array_equal(pixels(other), pixels(alone[0]))
    assert batch[0].size == (backend.defaults.width, backend.defaults.height)


def test_bad_calls_are_refused(backend):
    with pytest.raises(DrawingError, match="2 prompts but 1 seeds"):
        backend.draw(["a", "b"], [1])
    with pytest.raises(DrawingError, match="non-empty"):
        backend.draw([" "], [1])
    with pytest.raises(DrawingError, match="draws .* only"):
        backend.draw(["a"], [1], width=13)
    with pytest.raises(DrawingError, match="unknown drawing backend 'dalle'"):
        load_backend("dalle", ".")


def test_easygen_draw_writes_one_png_per_sample(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = easygen_main(["draw", "--model", str(tiny_dir), "--prompt", "a red square", "--prompt", "a green star",
                       "--n-samples", "2", "--seed", "7", "--steps", "2", "--out", str(out), "--quiet",
                       "--device", "cpu"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000-0-seed7.png", "0000-1-seed8.png", "0001-0-seed9.png", "0001-1-seed10.png"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in
                                               ["0000-0-seed7.png", "0000-1-seed8.png", "0001-0-seed9.png",
                                                "0001-1-seed10.png"]]
    # the file equals the backend's own drawing with that seed
    backend = load_backend("bidiffuser", tiny_dir, device="cpu")
    expected = backend.draw(["a green star"], [10], steps=2)[0]
    assert np.abs(pixels(Image.open(out / "0001-1-seed10.png")) - pixels(expected)).max() <= 1


@pytest.mark.parametrize("argv, message", [
    (["--backend", "ella"], "--backend ella needs --model DIR"),
    (["--option", "nokey"], "--option 'nokey': expected KEY=VALUE"),
    (["--prompt", " "], "--prompt must not be empty"),
])
def test_easygen_draw_errors_are_one_line(tiny_dir, tmp_path, capsys, argv, message):
    argv = argv + (["--prompt", "x"] if "--prompt" not in argv else [])
    rc = easygen_main(["draw", "--out", str(tmp_path / "o"), "--quiet", *argv]
                      + ([] if "--backend" in argv else ["--model", str(tiny_dir)]))
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_builder_checks_drawer_flags(tiny_easygen_dir):
    from easygen.builder import load_pretrained
    from bidiffuser.errors import BiDiffuserError
    with pytest.raises(BiDiffuserError, match="--draw-with ella needs --drawer DIR"):
        load_pretrained(tiny_easygen_dir, device="cpu", draw_with="ella")
    with pytest.raises(BiDiffuserError, match="--drawer is the files of a released system"):
        load_pretrained(tiny_easygen_dir, device="cpu", draw_with="clip", drawer=tiny_easygen_dir)
