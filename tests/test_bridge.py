"""The LLM bridge (bidiffuser.bridge, bidiffuser.train_bridge): both kinds map LM states of any length
to the U-ViT's text slot, the directory format (named tensors), sampling through it (the CLIP path as
before the bridge existed: tests/test_bidiffuser_modes.py), both training stages and their "true
uncond" rows, kill-and-resume equal to an uninterrupted run, and 2 torchrun processes (FSDP2) equal to one."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bidiffuser.bridge import (Bridge, BridgeConfig, LoraSettings, add_lora, lora_state_dict, read_bridge,
                               save_bridge)
from bidiffuser.errors import BiDiffuserError
from bidiffuser.model_dir import read_config
from bidiffuser.pipeline import BiDiffuser
from bidiffuser.sampler import NoiseSchedule
from bidiffuser.train import sample_generator
from bidiffuser.train_bridge import BridgeTrainConfig, t2i_loss, train_bridge
from bidiffuser.uvit import UViT

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
SMALL = dict(width=32, depth=2, heads=2)
LONG = ("In the middle of a plain white background, taking about half of the picture, there is one shape, "
        "and it is a green square.")


def small_config(kind="resampler", timestep_aware=True, **kw) -> BridgeConfig:
    return BridgeConfig(kind=kind, lm_dim=24, text_dim=8, num_tokens=10, timestep_aware=timestep_aware,
                        max_length=32, **{**SMALL, **kw})


@pytest.mark.parametrize("kind,aware", [("resampler", True), ("resampler", False), ("per_token", False)])
def test_both_kinds_fill_the_text_slot_from_any_length(kind, aware):
    torch.manual_seed(0)
    bridge = Bridge(small_config(kind, aware))
    for length in (3, 10, 25):
        out = bridge(torch.randn(2, length, 24), torch.ones(2, length, dtype=torch.long), torch.tensor([5, 900]))
        assert out.shape == (2, 10, 8)


def test_resampler_ignores_padding_and_reads_the_timestep():
    torch.manual_seed(0)
    bridge = Bridge(small_config())
    states, t = torch.randn(1, 6, 24), torch.tensor([100])
    padded = torch.cat([states, torch.randn(1, 4, 24)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    alone = bridge(states, torch.ones(1, 6), t)
    torch.testing.assert_close(bridge(padded, mask, t), alone, rtol=1e-5, atol=1e-6)
    # the timestep reaches the latents from the start; the AdaLN modulations start at zero (ELLA's init)
    assert not torch.equal(bridge(states, torch.ones(1, 6), torch.tensor([900])), alone)
    modulations = [n for block in bridge.net.blocks
                   for n in (block.norm_latents, block.norm_states, block.norm_ff)]
    assert all(not m.modulation.weight.any() and not m.modulation.bias.any() for m in modulations)
    # a timestep-blind resampler gives the same condition at every timestep
    blind = Bridge(small_config(timestep_aware=False))
    torch.testing.assert_close(blind(states, torch.ones(1, 6), t), blind(states, torch.ones(1, 6), torch.tensor([900])))
    with pytest.raises(BiDiffuserError, match="needs the image timestep"):
        bridge(states, torch.ones(1, 6))


def test_per_token_cuts_and_pads_to_the_slot():
    torch.manual_seed(0)
    bridge = Bridge(small_config("per_token", False))
    long = torch.randn(1, 14, 24)
    torch.testing.assert_close(bridge(long, torch.ones(1, 14)), bridge(long[:, :10], torch.ones(1, 10)))


def test_bad_configs_are_one_line_errors():
    with pytest.raises(BiDiffuserError, match="kind must be one of resampler, per_token"):
        small_config("mlp", False).validate()
    with pytest.raises(BiDiffuserError, match="layer counts from the end"):
        small_config(layer=3).validate()
    with pytest.raises(BiDiffuserError, match="timestep_aware belongs to the resampler"):
        small_config("per_token", True).validate()


def test_directory_round_trip_with_named_lora_tensors(tiny_dir, tmp_path):
    cfg = read_config(tiny_dir)
    bcfg = BridgeConfig(lm_dim=64, text_dim=cfg.uvit.text_dim, num_tokens=cfg.uvit.num_text_tokens, **SMALL)
    bridge = Bridge(bcfg)
    uvit = add_lora(UViT(cfg.uvit), LoraSettings(rank=2, alpha=2, targets=["qkv", "proj", "fc1", "fc2"]))
    lora = lora_state_dict(uvit)
    assert "in_blocks.0.attn.qkv.lora_A.weight" in lora and "mid_block.mlp.fc2.lora_B.weight" in lora
    save_bridge(tmp_path / "b", bcfg, bridge.state_dict(), uvit_lora=(LoraSettings(rank=2, alpha=2), lora),
                text_model="/models/llm")
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta["format"] == "bidiffuser-bridge" and meta["uvit_lora"]["rank"] == 2 and meta["lm_lora"] is None
    assert set(load_file(tmp_path / "b" / "uvit_lora.safetensors")) == set(lora)
    files = read_bridge(tmp_path / "b")
    assert files.config == bcfg and files.text_model == "/models/llm"
    for k, v in bridge.state_dict().items():
        assert torch.equal(files.weights()[k], v)
    (tmp_path / "c").mkdir()
    with pytest.raises(BiDiffuserError, match="is not a bridge directory"):
        read_bridge(tmp_path / "c")


@pytest.fixture(scope="module")
def trained(tiny_dir, tiny_easygen_dir, captions, tmp_path_factory):
    """Stage A then stage B (LoRA on the U-ViT and on the LM) on the tiny models."""
    root = tmp_path_factory.mktemp("bridge")
    common = dict(model=str(tiny_dir), data=str(captions), text_model=str(tiny_easygen_dir), batch_size=4, seed=0,
                  log_every=1, save_every=2, **SMALL)
    a = train_bridge(BridgeTrainConfig(out=str(root / "a"), stage="distill", steps=12, lr=3e-3, **common))
    b = train_bridge(BridgeTrainConfig(out=str(root / "b"), stage="t2i", init=str(a), steps=4, uvit_lora_rank=2,
                                       lm_lora_rank=2, **common))
    return a, b


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_distillation_learns_the_clip_latents_and_t2i_adds_named_lora(trained, tiny_dir, tiny_easygen_dir):
    a, b = trained
    losses = [r["distill"] for r in _log(a / "checkpoints")]
    assert losses[-1] < 0.5 * losses[0]
    files = read_bridge(b)
    assert files.info["stage"] == "t2i" and files.info["init"] == str(a)
    assert files.uvit_lora.rank == 2 and files.lm_lora.rank == 2
    assert all(".lora_" in k and ".default" not in k for k in files.uvit_lora_weights())
    assert files.text_model == str(Path(tiny_easygen_dir).resolve())
    # the t2i rows' losses: image and CLIP noise terms, every one a number
    log_b = _log(b / "checkpoints")
    assert {"img", "clip", "loss"} <= set(log_b[0])
    for record in _log(a / "checkpoints") + log_b:
        assert all(math.isfinite(record[k]) for k in ("loss", "distill", "img", "clip") if k in record), record
    # the LoRAs trained: peft starts every lora_B at zero, so a B that is still all zeros never moved
    for name, weights in (("uvit", files.uvit_lora_weights()), ("lm", files.lm_lora_weights())):
        still = [k for k, v in weights.items() if "lora_B" in k and not v.any()]
        assert not still and any("lora_B" in k for k in weights), f"{name} LoRA B never trained: {still}"
    # and the bridge itself trained on from stage A's
    start = read_bridge(a).weights()
    assert any(not torch.equal(start[k], v) for k, v in files.weights().items())


def test_true_uncond_rows_are_noise_at_t_n_at_the_configured_rate(tiny_dir):
    """Stage t2i's "true uncond" rows (UniDiffuser's guidance): with probability uncond_prob a row's text
    slot is Gaussian noise at t_text = N instead of the bridge's condition, drawn from the row's own
    generator; the other rows get the bridge's condition at t_text = 0. What the U-ViT receives is read."""
    u = read_config(tiny_dir).uvit
    torch.manual_seed(0)
    uvit = UViT(u)
    bridge = Bridge(BridgeConfig(lm_dim=24, text_dim=u.text_dim, num_tokens=u.num_text_tokens, timestep_aware=False,
                                 max_length=32, **SMALL))
    seen = {}
    uvit.register_forward_pre_hook(lambda m, args: seen.update(text=args[2], t_text=args[4]))
    schedule, rows, rate = NoiseSchedule.stable_diffusion(), 400, 0.25
    states, mask = torch.randn(rows, 5, 24), torch.ones(rows, 5, dtype=torch.long)
    z, clip = torch.randn(rows, u.in_chans, u.img_size, u.img_size), torch.randn(rows, 1, u.clip_img_dim)

    def run(indices, uncond_prob):
        gens = [sample_generator(0, 0, i) for i in indices]
        with torch.no_grad():
            loss, terms = t2i_loss(uvit, bridge, schedule, states[indices], mask[indices], z[indices], clip[indices],
                                   gens, uncond_prob)
        assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in terms.values())
        return seen["text"], seen["t_text"]

    with torch.no_grad():
        condition = bridge(states, mask)
    text, t_text = run(list(range(rows)), rate)
    drop = t_text == schedule.N
    assert ((t_text == 0) | drop).all()
    # the rate on this fixed seed: within 3 standard deviations of a binomial(400, 0.25) (+-0.065)
    assert abs(drop.float().mean().item() - rate) < 3 * (rate * (1 - rate) / rows) ** 0.5, drop.float().mean()
    assert torch.equal(text[~drop], condition[~drop])
    noise = text[drop]
    assert (noise != condition[drop]).flatten(1).any(1).all()
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02  # N(0, 1), not zeros or a copy
    # each row's draw is its own: the same rows in another batch get the same condition and timestep
    some = [7, 3, 120, 399, 250]
    again, t_again = run(some, rate)
    assert torch.equal(again, text[some]) and torch.equal(t_again, t_text[some])
    # uncond_prob 0: every row keeps the bridge's condition
    text, t_text = run(list(range(40)), 0.0)
    assert torch.equal(text, condition[:40]) and not t_text.any()


def test_sampling_through_a_bridge_any_length_and_clip_unchanged(trained, tiny_dir):
    _, b = trained
    plain = BiDiffuser.from_pretrained(tiny_dir)
    bridged = BiDiffuser.from_pretrained(tiny_dir, bridge=b)  # the LM comes from the bridge's record
    clip = bridged.text_to_image("a red square", steps=3, seed=0, draw_with="clip").image_latents
    assert torch.equal(clip, plain.text_to_image("a red square", steps=3, seed=0).image_latents)
    out = bridged.text_to_image(["a red square", LONG * 3], steps=3, seed=0)
    assert out.image_latents.shape[0] == 2 and len(out.images) == 2
    assert not torch.equal(out.image_latents[:1], clip)
    # a timestep-aware bridge's condition is recomputed at every solver step
    calls = []
    bridged.bridge.register_forward_hook(lambda *a: calls.append(1))
    bridged.text_to_image("a red square", steps=3, seed=0)
    assert len(calls) >= 3
    with pytest.raises(BiDiffuserError, match="needs a bridge directory"):
        plain.text_to_image("a red square", steps=1, draw_with="bridge")


def test_bridge_sample_cli_and_its_errors(trained, tiny_dir, tiny_easygen_dir, tmp_path, capsys):
    from bidiffuser.cli import main
    _, b = trained
    code = main(["sample", "--model", str(tiny_dir), "--mode", "t2i", "--bridge", str(b), "--text-model",
                 str(tiny_easygen_dir), "--prompt", LONG, "--steps", "2", "--out", str(tmp_path), "--quiet"])
    assert code == 0 and len(list(tmp_path.glob("t2i-*.png"))) == 1
    for argv, message in ((["--mode", "i2t", "--image", "x.png", "--bridge", str(b)], "--bridge draws in --mode t2i"),
                          (["--mode", "t2i", "--prompt", "x", "--text-model", "y"], "go with --bridge")):
        assert main(["sample", "--model", str(tiny_dir), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert main(["train", "--bridge-stage", "distill", "--model", str(tiny_dir), "--data", "x.tsv", "--out", "o"]) == 2
    assert "needs --text-model" in capsys.readouterr().err


def test_bridge_sample_dtype_reaches_the_text_model(trained, tiny_dir, tmp_path):
    """`--dtype bfloat16` loads the bridge's language model in bfloat16 too (a 7B LLM: 13.5 GB, not 27)."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from bidiffuser.cli import main
    _, b = trained
    seen = set()
    handle = register_module_forward_pre_hook(
        lambda m, args: seen.add(m.lm_head.weight.dtype) if hasattr(m, "lm_head") else None)
    try:
        code = main(["sample", "--model", str(tiny_dir), "--mode", "t2i", "--bridge", str(b), "--prompt", "a red square",
                     "--steps", "1", "--dtype", "bfloat16", "--out", str(tmp_path), "--quiet"])
    finally:
        handle.remove()
    assert code == 0 and seen == {torch.bfloat16}


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "bidiffuser.cli", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env or {**os.environ, "OMP_NUM_THREADS": "1"})


def _args(tiny_dir, tiny_easygen_dir, captions, out, *extra):
    return ["--bridge-stage", "t2i", "--model", tiny_dir, "--data", captions, "--out", out, "--text-model",
            tiny_easygen_dir, "--steps", 4, "--batch-size", 2, "--save-every", 2, "--seed", 0, "--bridge-width", 32,
            "--bridge-depth", 2, "--bridge-heads", 2, "--uvit-lora-rank", 2, "--log-every", 1, "--ema-decay", 0.9,
            *extra]


def test_kill_and_resume_equals_uninterrupted(tiny_dir, tiny_easygen_dir, captions, tmp_path):
    """LoRA dropout draws from the global RNG and the EMA is kept: restored from the checkpoint, the resumed run
    is exact."""
    whole = _cli(*_args(tiny_dir, tiny_easygen_dir, captions, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _cli(*_args(tiny_dir, tiny_easygen_dir, captions, tmp_path / "resumed"),
                  env={**os.environ, "BIDIFFUSER_TEST_KILL_AT_STEP": "3", "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9
    resumed = _cli(*_args(tiny_dir, tiny_easygen_dir, captions, tmp_path / "resumed"))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    for name in ("bridge.safetensors", "uvit_lora.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "resumed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    changed = _cli(*_args(tiny_dir, tiny_easygen_dir, captions, tmp_path / "resumed", "--uncond-prob", "0.3"))
    assert changed.returncode == 2 and "belongs to a run with other settings" in changed.stderr


@pytest.mark.slow
def test_torchrun_fsdp_two_processes_equal_one(tiny_dir, tiny_easygen_dir, captions, tmp_path):
    """2 gloo ranks x batch 2 (FSDP2 over the bridge and the LoRA'd U-ViT) = 1 process x batch 4."""
    extra = ["--lora-dropout", "0"]  # dropout masks come from each rank's RNG, so layouts differ only there
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "bidiffuser.cli", "train",
           *map(str, _args(tiny_dir, tiny_easygen_dir, captions, tmp_path / "two", "--strategy", "fsdp", *extra))]
    proc = subprocess.run(two, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = _args(tiny_dir, tiny_easygen_dir, captions, tmp_path / "one", *extra)
    args[args.index("--batch-size") + 1] = 4
    one = _cli(*args)
    assert one.returncode == 0, one.stderr[-2000:]
    for name in ("bridge.safetensors", "uvit_lora.safetensors"):
        torch.testing.assert_close(load_file(tmp_path / "two" / name), load_file(tmp_path / "one" / name),
                                   rtol=1e-5, atol=1e-6)
