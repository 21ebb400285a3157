"""``easygen eval t2i`` end to end on small fixtures in the official formats (tests/fixtures/t2i/),
with the random tiny EasyGen: the files written (names, count, sizes, what each holds) as each
benchmark's scorer reads them, the tiles and samples against images drawn one by one, resuming,
and one-line errors. The pictures themselves are noise; the scorers need models not available here."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from easygen.eval import t2i

from .test_eval_cli import easygen

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "t2i"
DPG_PROMPTS = FIXTURES / "dpg" / "prompts"
DPG_CSV = FIXTURES / "dpg" / "dpg_bench.csv"
GENEVAL = FIXTURES / "geneval" / "evaluation_metadata.jsonl"
PARA = FIXTURES / "paraprompts" / "ParaPrompts_400.csv"
STEPS, SCALE, SEED = 2, 7.0, 5
FAST = ["--steps", STEPS, "--scale", SCALE, "--seed", SEED, "--device", "cpu", "--quiet"]


def t2i_run(model_dir, benchmark, prompts, out, *extra):
    rc, stdout, stderr = easygen("eval", "t2i", "--model-path", model_dir, "--benchmark", benchmark,
                                 "--prompts", prompts, "--out", out, *FAST, *extra)
    assert rc == 0, stderr
    return stdout


@pytest.fixture(scope="module")
def resolution(tiny_loaded) -> int:
    return tiny_loaded.bidiffuser.config.resolution


@pytest.fixture(scope="module")
def drawn(tiny_loaded):
    """The image one prompt gets with one seed, drawn on its own (memoised)."""
    memo = {}

    def one(prompt: str, seed: int) -> Image.Image:
        if (prompt, seed) not in memo:
            memo[prompt, seed] = tiny_loaded.bidiffuser.text_to_image(prompt, steps=STEPS, scale=SCALE,
                                                                      seed=seed).images[0]
        return memo[prompt, seed]
    return one


@pytest.fixture(scope="module")
def dpg_out(tiny_easygen_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpg") / "images"
    stdout = t2i_run(tiny_easygen_dir, "dpg", DPG_PROMPTS, out)
    return out, stdout


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def same_drawing(batched: Image.Image, alone: Image.Image) -> bool:
    """The eval draws a prompt's seeds in one batch; drawn one at a time, the float rounding may differ on
    some CPU kernels (on AVX-512 one pixel value of 3072 came out one level off). Any other seed's picture
    differs by about 48 levels on average, so 2 levels still tells which seed drew it."""
    diff = np.abs(np.asarray(batched.convert("RGB"), dtype=int) - np.asarray(alone.convert("RGB"), dtype=int))
    return batched.size == alone.size and int(diff.max()) <= 2


def test_t2i_is_an_eval_subcommand_with_its_flags():
    rc, help_text, _ = easygen("eval", "t2i", "--help")
    flags = ["--benchmark", "--prompts", "--out", "--model-path", "--bidiffuser", "--device", "--dtype", "--steps",
             "--scale", "--seed", "--n-samples", "--limit"]
    assert rc == 0 and all(f in help_text for f in flags)
    assert all(name in help_text for name in ("dpg", "geneval", "paraprompts"))


def test_dpg_writes_one_2x2_grid_per_prompt_file(dpg_out, resolution, drawn):
    out, stdout = dpg_out
    # Exactly one PNG per prompts/<item>.txt and nothing else: ELLA's scorer lists the whole folder.
    assert sorted(os.listdir(out)) == sorted(f"{p.stem}.png" for p in DPG_PROMPTS.glob("*.txt"))
    for txt in DPG_PROMPTS.glob("*.txt"):
        png = out / f"{txt.stem}.png"
        assert png.name.split(".")[0] == txt.stem  # compute_dpg_bench.py's key for the image
        grid = Image.open(png)
        assert grid.format == "PNG" and grid.mode == "RGB" and grid.size == (2 * resolution, 2 * resolution)
        # The scorer's crops at --resolution, in its order, are the samples for seeds SEED..SEED+3.
        r = resolution
        crops = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]
        prompt = txt.read_text().strip()
        for k, box in enumerate(crops):
            assert same_drawing(grid.crop(box), drawn(prompt, SEED + k)), (txt.name, k)
    assert "3 of 3 prompts (3 drawn now, 0 already there)" in stdout
    assert f"bash dpg_bench/dist_eval.sh {out} {resolution}" in stdout


def test_dpg_csv_gives_the_same_images_as_the_prompt_files(dpg_out, tiny_easygen_dir, tmp_path):
    out = tmp_path / "from_csv"
    t2i_run(tiny_easygen_dir, "dpg", DPG_CSV, out)
    assert sorted(os.listdir(out)) == ["10.png", "2.png"]  # the CSV's item_ids (its text column: the prompt)
    for name in os.listdir(out):
        assert same_pixels(Image.open(out / name), Image.open(dpg_out[0] / name))


def test_dpg_prompts_read_in_natural_order_and_the_csv_in_item_order(tmp_path):
    assert [p.name for p in t2i.read_prompts("dpg", DPG_PROMPTS)] == ["2", "10", "partiprompts3"]
    assert [p.name for p in t2i.read_prompts("dpg", DPG_CSV)] == ["2", "10"]
    (tmp_path / "1.txt").write_text("a cat\n")
    (tmp_path / "._1.txt").write_bytes(b"\x00\x05")  # what macOS leaves beside a copied file: ignored
    (tmp_path / "notes.md").write_text("not a prompt")
    assert [(p.name, p.text) for p in t2i.read_prompts("dpg", tmp_path)] == [("1", "a cat")]


def test_geneval_layout(tiny_easygen_dir, tmp_path, resolution, drawn):
    out = tmp_path / "geneval"
    stdout = t2i_run(tiny_easygen_dir, "geneval", GENEVAL, out)
    lines = GENEVAL.read_text().splitlines()
    assert sorted(os.listdir(out)) == [f"{i:05d}" for i in range(len(lines))]
    for i, line in enumerate(lines):
        folder = out / f"{i:05d}"
        assert sorted(os.listdir(folder)) == ["metadata.jsonl", "samples"]
        meta = folder / "metadata.jsonl"
        assert meta.read_text() == line + "\n"             # the input line, as one line
        assert json.load(open(meta)) == json.loads(line)   # evaluate_images.py reads it with json.load
        names = sorted(os.listdir(folder / "samples"))
        assert names == ["00000.png", "00001.png", "00002.png", "00003.png"]  # diffusers_generate.py's names
        assert all(re.match(r"\d+\.png", n) for n in names)  # what evaluate_images.py picks up
        for k, name in enumerate(names):
            im = Image.open(folder / "samples" / name)
            assert im.format == "PNG" and im.size == (resolution, resolution)
            if i == 1:
                assert same_drawing(im, drawn(json.loads(line)["prompt"], SEED + k))
    assert "python evaluation/evaluate_images.py" in stdout


def test_geneval_n_samples_and_limit(tiny_easygen_dir, tmp_path):
    out = tmp_path / "geneval"
    t2i_run(tiny_easygen_dir, "geneval", GENEVAL, out, "--n-samples", "2", "--limit", "2")
    assert sorted(os.listdir(out)) == ["00000", "00001"]
    assert sorted(os.listdir(out / "00001" / "samples")) == ["00000.png", "00001.png"]


def test_paraprompts_layout(tiny_easygen_dir, tmp_path, resolution, drawn):
    import csv

    out = tmp_path / "para"
    stdout = t2i_run(tiny_easygen_dir, "paraprompts", PARA, out)
    with open(PARA, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["Image"].endswith(".JPEG") for r in rows)
    # One PNG per row, named after its Image column with .png for .JPEG.
    assert sorted(os.listdir(out)) == sorted(Path(r["Image"]).stem + ".png" for r in rows)
    for r in rows:
        im = Image.open(out / (Path(r["Image"]).stem + ".png"))
        assert im.format == "PNG" and im.size == (resolution, resolution)
        assert same_drawing(im, drawn(r["Prompt"], SEED))
    assert "1 sample a prompt" in stdout


def test_rerun_skips_what_is_done_and_refuses_other_settings(tiny_easygen_dir, tmp_path, monkeypatch):
    out = tmp_path / "dpg"
    stdout = t2i_run(tiny_easygen_dir, "dpg", DPG_PROMPTS, out, "--limit", "1")
    assert os.listdir(out) == ["2.png"] and "1 of 3 prompts (1 drawn now, 0 already there)" in stdout
    first = (out / "2.png").stat().st_mtime_ns, (out / "2.png").read_bytes()
    # What an interrupted run leaves: a temporary file of ours (removed) and a user's file (kept).
    (out / ".10.png.abcd_123.tmp").write_bytes(b"half a png")
    (out / "notes.txt").write_text("mine")
    stdout = t2i_run(tiny_easygen_dir, "dpg", DPG_PROMPTS, out)
    assert "3 of 3 prompts (2 drawn now, 1 already there)" in stdout
    assert ((out / "2.png").stat().st_mtime_ns, (out / "2.png").read_bytes()) == first
    assert sorted(os.listdir(out)) == ["10.png", "2.png", "notes.txt", "partiprompts3.png"]

    # All done: nothing is drawn and the model is not even loaded.
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded with nothing to draw")
    monkeypatch.setattr("easygen.builder.load_pretrained", no_loading)
    stdout = t2i_run(tiny_easygen_dir, "dpg", DPG_PROMPTS, out)
    assert "(0 drawn now, 3 already there)" in stdout
    monkeypatch.undo()

    # Other settings, or files that are not ours, are never mixed in.
    rc, _, stderr = easygen("eval", "t2i", "--model-path", tiny_easygen_dir, "--benchmark", "dpg", "--prompts",
                            DPG_PROMPTS, "--out", out, *FAST, "--steps", "3")
    assert rc == 2 and "2.png was drawn with other settings (steps differ)" in stderr and stderr.count("\n") == 1
    Image.new("RGB", (4, 4)).save(out / "10.png")
    rc, _, stderr = easygen("eval", "t2i", "--model-path", tiny_easygen_dir, "--benchmark", "dpg", "--prompts",
                            DPG_PROMPTS, "--out", out, *FAST)
    assert rc == 2 and "10.png exists and was not written by `easygen eval t2i`" in stderr


def test_geneval_rerun_redraws_only_an_incomplete_prompt(tiny_easygen_dir, tmp_path):
    out = tmp_path / "geneval"
    t2i_run(tiny_easygen_dir, "geneval", GENEVAL, out, "--n-samples", "2")
    kept = (out / "00000" / "samples" / "00000.png").stat().st_mtime_ns
    redo = out / "00001" / "samples" / "00001.png"
    before = redo.read_bytes()
    redo.unlink()
    stdout = t2i_run(tiny_easygen_dir, "geneval", GENEVAL, out, "--n-samples", "2")
    assert "(1 drawn now, 2 already there)" in stdout
    assert redo.read_bytes() == before  # the same seed: the same picture
    assert (out / "00000" / "samples" / "00000.png").stat().st_mtime_ns == kept
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary folder left
    rc, _, stderr = easygen("eval", "t2i", "--model-path", tiny_easygen_dir, "--benchmark", "geneval", "--prompts",
                            GENEVAL, "--out", out, *FAST)  # 4 samples now: not the run that is there
    assert rc == 2 and "(n_samples differ)" in stderr


def test_bad_input_is_a_one_line_error(tiny_easygen_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_prompt = tmp_path / "no_prompt.csv"
    no_prompt.write_text("Image,Caption,Category\r\na.JPEG,a cat,Animals\r\n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "a photo of a cat"}\n{"prompt": \n')
    twice = tmp_path / "twice.csv"
    twice.write_text("Image,Prompt\na.JPEG,a cat\na.png,a dog\n")
    a_file = tmp_path / "file"
    a_file.write_text("")
    cases = [
        (["--benchmark", "dpg", "--prompts", tmp_path / "nowhere"], "prompts not found"),
        (["--benchmark", "paraprompts", "--prompts", no_prompt],
         "no 'Prompt' column (columns: Image, Caption, Category)"),
        (["--benchmark", "dpg", "--prompts", empty], "no .txt prompt files in the folder"),
        (["--benchmark", "drawbench", "--prompts", PARA],
         "unknown benchmark 'drawbench' (choose dpg, geneval, paraprompts)"),
        (["--benchmark", "geneval", "--prompts", bad_jsonl], "bad.jsonl:2: invalid JSON"),
        (["--benchmark", "paraprompts", "--prompts", twice], "gives the same file name as"),
        (["--benchmark", "dpg", "--prompts", DPG_PROMPTS, "--n-samples", "2"], "--n-samples applies to geneval only"),
        (["--benchmark", "dpg", "--prompts", DPG_PROMPTS, "--out", a_file], "is a file; give a folder"),
        (["--benchmark", "dpg", "--prompts", DPG_PROMPTS, "--model-path", tmp_path / "no_model"], "no BiDiffuser"),
    ]
    for extra, message in cases:
        rc, _, stderr = easygen("eval", "t2i", "--model-path", tiny_easygen_dir, "--out", tmp_path / "out", *FAST,
                                *extra)
        assert rc == 2 and stderr.startswith("easygen: error: ") and message in stderr, (extra, stderr)
        assert stderr.count("\n") == 1 and not (tmp_path / "out").exists(), (extra, stderr)


def test_grid_tiles_are_in_reading_order_and_shards_cover_the_prompts():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    grid = t2i.grid_2x2([Image.new("RGB", (3, 3), c) for c in colours])
    assert grid.size == (6, 6)
    assert [grid.getpixel(xy) for xy in ((1, 1), (4, 1), (1, 4), (4, 4))] == colours
    items = list(range(7))
    for world in (1, 2, 3, 8):
        parts = [t2i.shard(items, r, world) for r in range(world)]
        assert sum(parts, []) == items
    assert t2i.seeds_for(42, 4) == [42, 43, 44, 45]
