"""``easygen train-lavi-bridge`` on tiny bases in the released layouts (drawing.tiny_layouts_lavi): the
written layout loads through the lavi-bridge backend and draws, the LoRAs and adapter move, a run
stopped by --steps and resumed equals an uninterrupted one bit for bit, 2 torchrun processes equal one
process with the global batch, and bad input is a one-line error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bidiffuser.errors import BiDiffuserError
from bidiffuser.train_checkpoint import complete_checkpoints
from drawing import load_backend
from drawing.lavi_bridge import COMBOS
from drawing.lavi_lora import LLAMA_TARGETS, TRANSFORMER_TARGETS, reference_order
from drawing.lavi_train import LaviTrainConfig, _optimizer, build, train_lavi
from drawing.lavi_train_data import resize_center_crop
from drawing.tiny_layouts_lavi import write_tiny_lavi

REPO = Path(__file__).resolve().parent.parent
CAPTIONS = ["a red circle", "a blue square on the city", "a green triangle", "a small cat with tea"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Path:
    return write_tiny_lavi(tmp_path_factory.mktemp("lavi_bases"))


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    """Four images of different sizes and aspect ratios (resized and cropped to --resolution)."""
    d = tmp_path_factory.mktemp("lavi_data")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(48, 40), (40, 56), (36, 36), (64, 40)]):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{i}.png")
    (d / "captions.tsv").write_text("".join(f"{i}.png\t{c}\n" for i, c in enumerate(CAPTIONS)))
    return d / "captions.tsv"


def base_args(bases: Path, combo: str) -> dict:
    spec = COMBOS[combo]
    return {"diffusion": str(bases / spec.diffusion_dir), "text_model": str(bases / spec.text_dirs[0])}


def config(bases, captions, out, combo="t5_unet", **kw) -> LaviTrainConfig:
    kw = {"resolution": 32, "steps": 4, "batch_size": 2, "seed": 0, "log_every": 1, **kw}
    return LaviTrainConfig(combo=combo, data=str(captions), out=str(out), **base_args(bases, combo), **kw)


def cli(*args) -> int:
    from easygen.cli import main
    return main(["train-lavi-bridge", *map(str, args)])


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "checkpoints" / "log.jsonl").read_text().splitlines()]


def written(out: Path) -> dict[str, torch.Tensor]:
    """Every weight the run wrote, by file and position/name."""
    got = {}
    for name in ("lora_vis.pt", "lora_text.pt"):
        got.update({f"{name}/{i}": t for i, t in enumerate(torch.load(out / name, weights_only=True))})
    for name in ("lora_vis.safetensors", "lora_text.safetensors", "adapter/diffusion_pytorch_model.safetensors"):
        if (out / name).exists():
            got.update({f"{name}/{k}": t for k, t in load_file(out / name).items()})
    return got


def test_resize_center_crop_is_torchvisions():
    # torchvision: shorter side to the size (long side int(size * long / short)), crop offsets rounded
    image = Image.new("RGB", (50, 30))
    assert resize_center_crop(image, 16).size == (16, 16)
    wide = Image.fromarray(np.arange(30 * 50 * 3, dtype=np.uint8).reshape(30, 50, 3) % 251)
    want = wide.resize((int(16 * 50 / 30), 16), Image.BILINEAR).crop((5, 0, 21, 16))
    assert np.array_equal(np.asarray(resize_center_crop(wide, 16)), np.asarray(want))


def test_the_scripts_recipe(bases, captions, tmp_path):
    """t5_transformer.py's optimizer groups and lrs, cloneofsimo-lora's init and dropout, train mode."""
    cfg = config(bases, captions, tmp_path / "x", combo="t5_transformer").resolved()
    torch.manual_seed(0)
    parts = build(cfg, torch.device("cpu"))
    t = parts.trainee
    opt = _optimizer(parts, cfg)
    assert [g["lr"] for g in opt.param_groups] == [2e-5, 5e-6, 2e-5]  # vision LoRA, LM LoRA, adapter
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and g["weight_decay"] == 1e-2 for g in opt.param_groups)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in t.parameters() if p.requires_grad)
    from diffusers import PixArtTransformer2DModel
    fresh = PixArtTransformer2DModel.from_pretrained(bases / "PixArt-XL-2-512x512" / "transformer")
    assert [s.name for s in parts.vis_sites] == [s.name for s in reference_order(fresh, TRANSFORMER_TARGETS)]
    modules = dict(t.vis.named_modules())
    downs = torch.cat([modules[s.name].lora_A["default"].weight.flatten() for s in parts.vis_sites])
    assert all(not modules[s.name].lora_B["default"].weight.any() for s in parts.vis_sites)
    assert downs.std().item() == pytest.approx(1 / 32, rel=0.05)
    assert all(modules[s.name].lora_B["default"]._forward_hooks for s in parts.vis_sites)  # output dropout
    assert t.adapter.ff1.net[1].p == t.adapter.ff2.net[1].p == 0.1
    assert t.vis.training and t.lm.training and t.adapter.training
    assert (t.adapter.in_dim, t.adapter.int_dim, t.adapter.out_dim) == (32, 40, 48)  # (32 + 48) / 2


def test_cli_trains_writes_both_layouts_and_the_backend_draws_it(bases, captions, tmp_path, capsys):
    out = tmp_path / "t5_unet"
    args = base_args(bases, "t5_unet")
    assert cli("--combo", "t5_unet", "--data", captions, "--out", out, "--diffusion", args["diffusion"],
               "--text-model", args["text_model"], "--resolution", 32, "--steps", 3, "--batch-size", 2,
               "--seed", 0, "--log-every", 1, "--lr", 1e-3, "--lm-lr", 1e-3) == 0
    assert "wrote LaVi-Bridge t5_unet layout" in capsys.readouterr().out
    records = log(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in records)
    assert json.loads((out / "adapter" / "config.json").read_text())["in_dim"] == 32

    # positional lists as save_lora_weight writes them: fp16 [up0, down0, ...] in the reference's order,
    # the same values as the named float32 files
    cfg = config(bases, captions, out).resolved()
    torch.manual_seed(0)
    init = build(cfg, torch.device("cpu"))  # what the run started from (same seed)
    for name, model, sites in (("lora_vis", init.trainee.vis, init.vis_sites),
                               ("lora_text", init.text.model, init.text_sites)):
        tensors = torch.load(out / f"{name}.pt", weights_only=True)
        named = load_file(out / f"{name}.safetensors")
        assert type(tensors) is list and len(tensors) == 2 * len(sites) and len(named) == 2 * len(sites)
        modules = dict(model.named_modules())
        for k, site in enumerate(sites):
            up, down = tensors[2 * k], tensors[2 * k + 1]
            assert up.dtype == down.dtype == torch.float16
            assert torch.equal(up, named[f"{site.name}.lora_B.weight"].half())
            assert torch.equal(down, named[f"{site.name}.lora_A.weight"].half())
            assert up.abs().max() > 0  # up starts at zero: the LoRA trained
            assert not torch.equal(down.float(), modules[site.name].lora_A["default"].weight.half().float())
    adapter = load_file(out / "adapter" / "diffusion_pytorch_model.safetensors")
    for key, t in init.trainee.adapter.state_dict().items():
        assert not torch.equal(adapter[key], t), key

    backend = load_backend("lavi-bridge", out, combo="t5_unet", **args)
    images = backend.draw(["a red circle"], [0], steps=2, width=32, height=32)
    assert images[0].size == (32, 32)
    # the trained files change the drawing: the released tiny combo on the same bases draws otherwise
    other = load_backend("lavi-bridge", bases / "t5_unet").draw(["a red circle"], [0], steps=2, width=32, height=32)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))
    # the training record names the combo and the bases: the output loads without options
    again = load_backend("lavi-bridge", out).draw(["a red circle"], [0], steps=2, width=32, height=32)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))


def test_resume_after_steps_k_equals_a_straight_run_bit_for_bit(bases, captions, tmp_path):
    """PixArt (the mask, learned-sigma half) with every dropout on: RNG of the rank restored."""
    straight = train_lavi(config(bases, captions, tmp_path / "straight", combo="t5_transformer", lr=1e-3))
    resumed = tmp_path / "resumed"
    train_lavi(config(bases, captions, resumed, combo="t5_transformer", lr=1e-3, steps=2))
    assert [c.name for c in complete_checkpoints(resumed / "checkpoints")] == ["step-00000002"]
    train_lavi(config(bases, captions, resumed, combo="t5_transformer", lr=1e-3))
    assert [r["step"] for r in log(resumed)] == [1, 2, 3, 4]
    a, b = written(straight), written(resumed)
    assert a.keys() == b.keys() and len(a) > 100
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in log(straight)] == [r["loss"] for r in log(resumed)]

    with pytest.raises(BiDiffuserError, match=r"lr 0.001 -> 0.002"):
        train_lavi(config(bases, captions, resumed, combo="t5_transformer", lr=2e-3, steps=6))
    with pytest.raises(BiDiffuserError, match=r"at step 4, past --steps 3"):
        train_lavi(config(bases, captions, resumed, combo="t5_transformer", lr=1e-3, steps=3))


def test_frozen_language_model_writes_a_zero_lora_text_of_full_length(bases, captions, tmp_path):
    out = train_lavi(config(bases, captions, tmp_path / "frozen", combo="llama2_unet", text_lora=False, steps=2))
    assert [r["lr"] for r in log(out)] == [1e-4, 1e-4]  # the scripts' lr, constant from the first step
    tensors = torch.load(out / "lora_text.pt", weights_only=True)
    from transformers import LlamaForCausalLM
    sites = reference_order(LlamaForCausalLM.from_pretrained(bases / "Llama-2-7b-hf"), LLAMA_TARGETS)
    assert len(tensors) == 2 * len(sites) and all(not t.any() for t in tensors)
    assert not (out / "lora_text.safetensors").exists()
    backend = load_backend("lavi-bridge", out, combo="llama2_unet", **base_args(bases, "llama2_unet"))
    assert backend.draw(["a cat"], [1], steps=1, width=32, height=32)[0].size == (32, 32)


@pytest.mark.parametrize("args,message", [
    (["--data", "bad.tsv"], "bad.tsv:2: expected 'image_path<TAB>caption', got 1 tab-separated field(s)"),
    (["--data", "missing_image.tsv"], "missing_image.tsv:1: image not found"),
    (["--data", "nothing.tsv"], "captions TSV not found"),
    (["--data", "corrupt.tsv"], "not an image file (or an unsupported format):"),
    (["--dropout", "1.5"], "dropout must lie in [0, 1)"),
    (["--resolution", "36", "--combo", "t5_transformer"], "resolution must be a positive multiple of 8 (PixArt: 16)"),
    (["--diffusion", "nowhere"], "--diffusion: no folder "),
    (["--text-model", "nowhere"], "--text-model: no folder "),
    (["--combo", "unknown"], "invalid choice: 'unknown'"),
])
def test_bad_input_is_one_line_and_exit_2(bases, captions, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "bad.tsv").write_text("a.png\tfine\njust one field\n")
    (tmp_path / "missing_image.tsv").write_text("gone.png\ta caption\n")
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "corrupt.tsv").write_text("b.png\ta caption\nb.png\tanother\n")
    flags = {"--combo": "t5_unet", "--data": str(captions), "--out": "new", **{
        f"--{k.replace('_', '-')}": v for k, v in base_args(bases, "t5_unet").items()}}
    for flag, value in zip(args[::2], args[1::2]):
        flags[flag] = value
    try:
        code = cli("--steps", 1, "--resolution", 32, *[x for kv in flags.items() for x in kv])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_the_global_batch(bases, captions, tmp_path):
    """scripts/train_lavi_bridge.sh with 2 gloo processes: each example's draws come from its own
    generator, so 2 ranks x batch 1 reproduce 1 process x batch 2 (dropout off: it draws per rank)."""
    args = base_args(bases, "llama2_unet")
    two = tmp_path / "two"
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "BATCH_SIZE": "1", "STEPS": "3", "RESOLUTION": "32",
           "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
    proc = subprocess.run(["bash", REPO / "scripts" / "train_lavi_bridge.sh", "llama2_unet", captions, two,
                           args["diffusion"], args["text_model"], "--dropout", "0", "--seed", "0", "--lr", "1e-3",
                           "--lm-lr", "1e-3", "--log-every", "1"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = complete_checkpoints(two / "checkpoints")[-1]
    assert json.loads((last / "trainer_state.json").read_text())["world_size"] == 2
    assert len(list(last.glob("*.distcp"))) == 2

    one = train_lavi(config(bases, captions, tmp_path / "one", combo="llama2_unet", dropout=0.0, lr=1e-3,
                            lm_lr=1e-3, steps=3, batch_size=2))
    for x, y in zip(log(two), log(one), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    # Adam's first steps move each weight by about lr * sign(gradient): a weight whose gradient is at
    # rounding level (two examples summed in another order) may go either way, so a few of the LoRA
    # matrices' elements (~0.5% here) differ by up to lr; every other element agrees to 1e-3 relative.
    # (One process run with 1 thread and with 2 differs from itself in the same way.)
    a, b = written(two), written(one)
    assert a.keys() == b.keys()
    off = {key: ((a[key].float() - b[key].float()).abs() > 1e-5 + 1e-3 * b[key].float().abs()).sum().item()
           for key in a}
    assert sum(off.values()) < 0.01 * sum(t.numel() for t in a.values()), sorted(off.items(), key=lambda kv: -kv[1])[:5]
    assert max(off[k] for k in a if k.startswith("adapter")) == 0
    assert load_backend("lavi-bridge", two, combo="llama2_unet", **args).draw(["a cat"], [0], steps=1, width=32,
                                                                               height=32)
