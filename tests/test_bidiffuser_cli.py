"""The `bidiffuser` command: the installed console script in a subprocess for the main path, and
the same `main()` in-process for the many error cases (a subprocess costs seconds of imports)."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from bidiffuser.cli import main

SCRIPT = Path(sys.executable).with_name("bidiffuser")


def run(*args, cwd=None):
    """Run the installed `bidiffuser` script (or the module when not installed as a script)."""
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "bidiffuser.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Call main() in-process; returns returncode/stdout/stderr like subprocess.run."""
    def call(*args, cwd=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse errors and --help
            code = e.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return call


def test_init_then_sample_t2i_and_i2t(tmp_path):
    model = tmp_path / "tiny"
    r = run("init", "--preset", "tiny", model)
    assert r.returncode == 0, r.stderr
    assert (model / "bidiffuser.json").is_file() and (model / "uvit_v1.pth").is_file()

    r = run("sample", "--model", model, "--mode", "t2i", "--prompt", "a red circle", "--steps", "2",
            "--n-samples", "2", "--seed", "5", "--out", tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in pngs] == ["t2i-5-0.png", "t2i-5-1.png"]
    assert Image.open(pngs[0]).size == (32, 32)
    assert str(pngs[0]) in r.stdout

    r = run("sample", "--model", model, "--mode", "i2t", "--image", pngs[0], "--steps", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("text[0]: ")
    again = run("sample", "--model", model, "--mode", "i2t", "--image", pngs[0], "--steps", "2", "--quiet")
    assert again.stdout == r.stdout  # same seed, same caption


@pytest.mark.parametrize("args,message", [
    (["--mode", "t2i"], "--mode t2i needs --prompt"),
    (["--mode", "i2t"], "--mode i2t needs --image"),
    (["--mode", "i2t", "--image", "missing.png"], "image not found: missing.png"),
    (["--mode", "i2t", "--image", "notes.txt"], "not an image file"),
    (["--mode", "joint", "--prompt", "x"], "--prompt is not used by --mode joint"),
])
def test_bad_input_is_one_line_and_exit_2(cli, tiny_dir, tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("hello")
    r = cli("sample", "--model", tiny_dir, "--steps", "1", "--quiet", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unknown_mode_missing_model_dir_and_bad_config(cli, tmp_path, tiny_dir):
    r = cli("sample", "--model", tiny_dir, "--mode", "x2y")
    assert r.returncode == 2 and "invalid choice: 'x2y'" in r.stderr
    r = cli("sample", "--model", tmp_path / "nope", "--mode", "t", "--steps", "1")
    assert r.returncode == 2 and "model directory not found" in r.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bidiffuser.json").write_text("{not json")
    r = cli("sample", "--model", broken, "--mode", "t")
    assert r.returncode == 2 and "bidiffuser.json:1: invalid JSON" in r.stderr and "Traceback" not in r.stderr


def test_mismatched_config_names_both_sides(cli, tmp_path, tiny_dir):
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "bidiffuser.json").read_text())
    cfg["uvit"]["text_dim"] += 1
    (bad / "bidiffuser.json").write_text(json.dumps(cfg))
    r = cli("sample", "--model", bad, "--mode", "t", "--steps", "1")
    assert r.returncode == 2 and "uvit.text_dim" in r.stderr and "caption_decoder.hidden_dim" in r.stderr
    # a config that agrees with itself but not with the weights: the checkpoint error lists the keys
    cfg = json.loads((tiny_dir / "bidiffuser.json").read_text())
    cfg["uvit"]["embed_dim"] *= 2
    (bad / "bidiffuser.json").write_text(json.dumps(cfg))
    r = cli("sample", "--model", bad, "--mode", "t", "--steps", "1", "--quiet")
    assert r.returncode == 2 and "mis-shaped keys" in r.stderr and "Traceback" not in r.stderr


def test_help_lists_every_mode(cli):
    r = cli("sample", "--help")
    assert r.returncode == 0
    for mode in ("t2i", "i2t", "joint", "i2t2i", "t2i2t"):
        assert mode in r.stdout


def test_assemble_links_the_official_files_and_checks_them_on_load(cli, tiny_dir, tmp_path):
    """`bidiffuser assemble` with files in the official formats (tiny ones here: the real ones are GBs).
    The directory gets the v1 configs, so loading these tiny weights must fail with the mismatch listed."""
    import json

    from bidiffuser.errors import CheckpointError
    from bidiffuser.pipeline import BiDiffuser

    sources = ["--uvit", tiny_dir / "uvit_v1.pth", "--caption-decoder", tiny_dir / "caption_decoder.pth",
               "--autoencoder", tiny_dir / "autoencoder_kl.pth", "--clip-image", tiny_dir / "clip_image",
               "--clip-text", tiny_dir / "clip_text", "--gpt2-tokenizer", tiny_dir / "gpt2_tokenizer"]
    out = tmp_path / "v1"
    r = cli("assemble", out, *sources)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "bidiffuser.json").read_text())
    assert cfg["resolution"] == 512 and cfg["uvit"]["embed_dim"] == 1536 and cfg["uvit"]["depth"] == 30
    assert (out / "uvit_v1.pth").is_symlink() and (out / "uvit_v1.pth").resolve() == (tiny_dir / "uvit_v1.pth").resolve()
    assert (out / "clip_text").resolve() == (tiny_dir / "clip_text").resolve()
    with pytest.raises(CheckpointError, match="mis-shaped keys: pos_embed"):
        BiDiffuser.from_pretrained(out).uvit

    copied = tmp_path / "v1-copy"
    assert cli("assemble", copied, *sources, "--copy").returncode == 0
    assert not (copied / "uvit_v1.pth").is_symlink() and (copied / "clip_image" / "config.json").is_file()

    missing = [str(a) if a != tiny_dir / "autoencoder_kl.pth" else str(tmp_path / "nope.pth") for a in sources]
    r = cli("assemble", tmp_path / "v1-bad", *missing)
    assert r.returncode == 2 and "--autoencoder: not found" in r.stderr


def test_assemble_in_the_download_folder_keeps_the_files(cli, tiny_dir, tmp_path):
    """Users often assemble where they downloaded: the files are already in OUT under their names."""
    import shutil
    out = tmp_path / "models"
    shutil.copytree(tiny_dir, out)
    (out / "bidiffuser.json").unlink()
    before = (out / "uvit_v1.pth").read_bytes()
    r = cli("assemble", out, "--uvit", out / "uvit_v1.pth", "--caption-decoder", out / "caption_decoder.pth",
            "--autoencoder", out / "autoencoder_kl.pth", "--clip-image", out / "clip_image",
            "--clip-text", out / "clip_text", "--gpt2-tokenizer", out / "gpt2_tokenizer")
    assert r.returncode == 0, r.stderr
    assert not (out / "uvit_v1.pth").is_symlink() and (out / "uvit_v1.pth").read_bytes() == before
    assert (out / "clip_text" / "config.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["--bridge-stage", "t2i", "--copy"], "--copy writes a BiDiffuser directory"),
    (["--bridge-stage", "t2i", "--distill-teacher", "first"], "--distill-teacher belongs to --bridge-stage distill"),
    (["--bridge-stage", "distill", "--uncond-prob", "0.2"], "--uncond-prob belongs to --bridge-stage t2i"),
    (["--text-model", "llm"], "--text-model trains a bridge: give --bridge-stage"),
    (["--bridge-preset", "ella"], "--bridge-preset trains a bridge: give --bridge-stage"),
    (["--uvit-lora-rank", "4"], "--uvit-lora-rank trains a bridge: give --bridge-stage"),
    (["--bridge-stage", "distill", "--snr-gamma", "5"], "--snr-gamma belongs to --bridge-stage t2i"),
    (["--bridge-stage", "t2i", "--bridge-init", "b", "--bridge-width", "8", "--bridge-layer", "-2"],
     "--bridge-width, --bridge-layer: the bridge's shape comes from --bridge-init"),
    (["--bridge-stage", "t2i", "--lm-lr", "1e-4"], "--lm-lr is the LM LoRA's learning rate, and no LM LoRA trains"),
    (["--bridge-stage", "t2i", "--uvit-lora-rank", "0", "--lora-alpha", "4"], "--lora-alpha set up a new LoRA"),
])
def test_train_flags_that_do_nothing_here_are_refused(cli, tiny_dir, tmp_path, args, message):
    """Every flag `train` accepts acts on the run it starts; the others are refused in one line."""
    (tmp_path / "c.tsv").write_text("image\tcaption\n")
    llm = ["--text-model", "llm"] if "--bridge-stage" in args else []
    r = cli("train", "--model", tiny_dir, "--data", tmp_path / "c.tsv", "--out", tmp_path / "o", *args, *llm)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def _with_defaults(tiny_dir, out, **defaults):
    """A copy of the tiny model whose bidiffuser.json carries its own sampling defaults."""
    import shutil

    from bidiffuser.model_dir import set_sampling_defaults
    shutil.copytree(tiny_dir, out)
    set_sampling_defaults(out, **defaults)
    return out


def _png(cli, model, out, *args):
    r = cli("sample", "--model", model, "--prompt", "a red circle", "--mode", "t2i", "--quiet", "--out", out, *args)
    assert r.returncode == 0, r.stderr
    return (out / "t2i-1234-0.png").read_bytes()


def test_sample_uses_the_model_directorys_own_defaults(cli, tiny_dir, tmp_path):
    """bidiffuser.json may say how its model draws best (the shapes demo: 20 steps, scale 0.2); --steps and
    --scale still win, and a mode can have its own (the demo reads images at scale 1)."""
    from bidiffuser.model_dir import read_config
    model = _with_defaults(tiny_dir, tmp_path / "m", steps=2, scale=0.5, modes={"i2t": {"scale": 1.0}})
    cfg = read_config(model)
    assert cfg.sampling_defaults.for_mode("t2i") == (2, 0.5) and cfg.sampling_defaults.for_mode("i2t") == (2, 1.0)
    assert cfg.fingerprint() == read_config(tiny_dir).fingerprint()  # not part of the weights' identity
    own = _png(cli, model, tmp_path / "own")
    assert own == _png(cli, tiny_dir, tmp_path / "explicit", "--steps", "2", "--scale", "0.5")
    assert own != _png(cli, model, tmp_path / "scale", "--scale", "3")
    assert _png(cli, model, tmp_path / "steps", "--steps", "3") == _png(cli, tiny_dir, tmp_path / "s3", "--steps", "3",
                                                                         "--scale", "0.5")


def test_sampling_defaults_survive_rewrites_and_bad_ones_are_refused(cli, tiny_dir, tmp_path):
    import dataclasses
    import json

    from bidiffuser.model_dir import read_config, write_config
    model = _with_defaults(tiny_dir, tmp_path / "m", steps=20, scale=0.2)
    write_config(dataclasses.replace(read_config(model)))  # e.g. train_autoencoder rewriting the config
    assert json.loads((model / "bidiffuser.json").read_text())["sampling_defaults"] == {"steps": 20, "scale": 0.2}
    assert "sampling_defaults" not in json.loads((tiny_dir / "bidiffuser.json").read_text())  # optional
    doc = json.loads((model / "bidiffuser.json").read_text())
    for bad, message in (({"steps": 0}, "steps must be an integer >= 1"), ({"scale": "x"}, "scale must be a number"),
                         ({"modes": {"x2y": {}}}, "unknown mode 'x2y'"), ({"step": 3}, "unknown key 'step'")):
        (model / "bidiffuser.json").write_text(json.dumps({**doc, "sampling_defaults": bad}))
        r = cli("sample", "--model", model, "--mode", "t", "--quiet")
        assert r.returncode == 2 and "bidiffuser.json: bad sampling_defaults: " + message in r.stderr, r.stderr
