"""Every sampling mode of the BiDiffuser pipeline (t2i, i2t, joint, i, t, i2t2i, t2i2t; t2i also
unguided) samples the tiny seeded model as the package did before the LLM bridge existed: the expected
values, tests/fixtures/bidiffuser_modes.json, were drawn by the bidiffuser package of commit de62c89
(the last one before the bridge) from the model that today's ``init_tiny(seed=0)`` writes.

Each output tensor is kept as its shape, 16 values spread over it, its sum and its sum of magnitudes
(the whole tensors would be ~100 kB of JSON); another machine agrees to float rounding, not bit for bit.
Regenerate only for a change that is meant to alter sampling, and say so in its commit:

    python tests/test_bidiffuser_modes.py --regenerate

(They were drawn so, run outside the repository with ``PYTHONPATH`` at an export of de62c89's
``bidiffuser/`` and ``--model`` at a directory today's ``bidiffuser init --preset tiny`` wrote; today's
package then gave the same values to the last bit.)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "bidiffuser_modes.json"
TENSORS = ("image_latents", "clip_image", "text_latents")
PROMPTS = ["a red square", "a blue circle"]
MODES = {  # name -> the pipeline call (pipe, an input image); every mode of bidiffuser.modes.MODES
    "t2i": lambda p, im: p.text_to_image(PROMPTS, n_samples=2, steps=3, seed=1),
    "t2i_unguided": lambda p, im: p.text_to_image(PROMPTS[0], steps=3, scale=0.0, seed=2),
    "i2t": lambda p, im: p.image_to_text([im], steps=2, seed=5),
    "joint": lambda p, im: p.joint(n_samples=2, steps=2, seed=4),
    "i": lambda p, im: p.image(n_samples=2, steps=2, seed=6),
    "t": lambda p, im: p.text(n_samples=2, steps=2, seed=7),
    "i2t2i": lambda p, im: p.image_variation([im], steps=2, seed=8),
    "t2i2t": lambda p, im: p.text_variation(PROMPTS[0], steps=2, seed=3),
}


def image() -> Image.Image:
    return Image.new("RGB", (40, 30), (200, 30, 30))


def weight_hashes(model: Path) -> dict[str, str]:
    """sha256 of each weight file's tensors (names, dtypes, shapes, bytes; a .pth file's own bytes vary
    with the temporary name it was written under): the expected values hold for these weights only."""
    from safetensors.torch import load_file
    hashes = {}
    for path in sorted(model.rglob("*")):
        if path.suffix not in (".pth", ".safetensors"):
            continue
        tensors = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        h = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name]
            h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        hashes[str(path.relative_to(model))] = h.hexdigest()
    return hashes


def summary(t: torch.Tensor) -> dict:
    flat = t.detach().flatten().double()
    picks = torch.linspace(0, flat.numel() - 1, 16).round().long()
    return {"shape": list(t.shape), "values": flat[picks].tolist(), "sum": flat.sum().item(),
            "abs_sum": flat.abs().sum().item()}


def run_mode(pipe, name: str) -> dict:
    out = MODES[name](pipe, image())
    got = {k: summary(getattr(out, k)) for k in TENSORS if getattr(out, k, None) is not None}
    if out.texts is not None:
        got["texts"] = list(out.texts)
    return got


# ------------------------------------------------------------------------------------------ the test
@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from bidiffuser.pipeline import BiDiffuser
    return BiDiffuser.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(FIXTURE.read_text())


def test_the_tiny_model_is_the_one_the_values_were_drawn_from(tiny_dir, expected):
    assert weight_hashes(tiny_dir) == expected["weights_sha256"], "init_tiny changed: see this module's docstring"
    assert sorted(expected["modes"]) == sorted(MODES)
    from bidiffuser.modes import MODES as PIPELINE_MODES
    assert set(PIPELINE_MODES) <= set(MODES)  # every mode the pipeline has is checked here


@pytest.mark.parametrize("name", list(MODES))
def test_mode_samples_as_before_the_bridge(pipe, expected, name):
    got, want = run_mode(pipe, name), expected["modes"][name]
    assert got.keys() == want.keys()
    assert got.get("texts") == want.get("texts")
    for key in TENSORS:
        if key not in want:
            continue
        g, w = got[key], want[key]
        assert g["shape"] == w["shape"], key
        torch.testing.assert_close(torch.tensor(g["values"]), torch.tensor(w["values"]), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name} {key}: {m}")
        for stat in ("sum", "abs_sum"):
            assert math.isclose(g[stat], w[stat], rel_tol=1e-5, abs_tol=1e-3), (name, key, stat, g[stat], w[stat])


# ------------------------------------------------------------------------------------------ regenerate
def regenerate(model: Path | None, drawn_by: str) -> None:
    """Draw every mode with the bidiffuser package on the import path (one thread, as the tests run)."""
    from bidiffuser.pipeline import BiDiffuser
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from bidiffuser.model_dir import init_tiny
            model = Path(tmp)
            init_tiny(model, seed=0)
        pipe = BiDiffuser.from_pretrained(model)
        doc = {"drawn_by": f"{drawn_by}, torch {torch.__version__}, 1 thread",
               "weights_sha256": weight_hashes(model), "modes": {name: run_mode(pipe, name) for name in MODES}}
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    # one line per list of numbers, so a diff of the file shows which values moved
    text = re.sub(r"\[\s*([-0-9.e,\s]+?)\s*\]", lambda m: "[" + ", ".join(m[1].replace(",", " ").split()) + "]", text)
    FIXTURE.write_text(text + "\n")
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Rewrite tests/fixtures/bidiffuser_modes.json")
    p.add_argument("--regenerate", action="store_true", required=True)
    p.add_argument("--model", type=Path, help="a tiny BiDiffuser directory (default: init_tiny(seed=0) here)")
    p.add_argument("--drawn-by", default="this checkout's bidiffuser", help="which code drew them, for the file")
    args = p.parse_args()
    regenerate(args.model, args.drawn_by)
    sys.exit(0)
