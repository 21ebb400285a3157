"""The real-size dry run (benchmarks/real_size.py) at a reduced width: the same official-format
files (U-ViT .pth, caption decoder .pth with DDP keys, LDM VAE .pth, HF CLIP towers, a diffllama
directory in pytorch_model-0000N-of-0000M.bin fp16 shards with only LLaMA's tokenizer.model) and
the same `easygen chat --prompt --force-image --profile` turn, so the script keeps working; with
--bridge the picture is drawn through a random bridge directory (ELLA resampler + U-ViT LoRA); and
benchmarks/bridge_train_step.py times bridge training steps (stage t2i) on the same weights."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_size  # noqa: E402


@pytest.mark.slow
def test_reduced_dry_run_answers_with_a_picture_and_profiles_every_phase(tmp_path, capsys):
    results = tmp_path / "results.json"
    real_size.main(["--size", "reduced", "--workdir", str(tmp_path / "work"), "--json", str(results)])
    r = json.loads(results.read_text())
    llm = tmp_path / "work" / "diffllama"
    shards = sorted(p.name for p in llm.glob("pytorch_model-*.bin"))
    assert shards == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert not (llm / "tokenizer.json").exists() and (llm / "tokenizer.model").exists()
    assert {v.dtype for v in torch.load(llm / shards[0], weights_only=True).values()} == {torch.float16}
    # One turn: features, the LLM, a forced picture, saved as a PNG at the model's resolution.
    reply = r["reply"]
    [png] = reply["images"]
    from PIL import Image
    assert Image.open(png).size == (64, 64)
    phases = [p["phase"] for p in r["phases"]]
    assert phases[:3] == ["load", "features", "generate"] and phases[-1] == "draw"
    weights = [p["weights_bytes"] for p in r["phases"]]
    assert weights == sorted(weights) and weights[0] > 0  # BiDiffuser parts load on first use
    assert all(p["seconds"] >= 0 for p in r["phases"])
    assert "largest peak RSS / resident weights" in capsys.readouterr().out


def _numbers(pattern: str, text: str) -> list[float]:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in:\n{text}"
    return [float(g.replace(",", "")) for g in m.groups()]


@pytest.mark.slow
def test_reduced_dry_run_draws_the_forced_picture_through_a_random_bridge(tmp_path, capsys):
    from safetensors.torch import load_file

    work, results = tmp_path / "work", tmp_path / "results.json"
    real_size.main(["--size", "reduced", "--workdir", str(work), "--json", str(results), "--bridge"])
    r = json.loads(results.read_text())
    bridge = work / "bridge"
    assert {p.name for p in bridge.iterdir()} >= {"config.json", "bridge.safetensors", "uvit_lora.safetensors"}
    meta = json.loads((bridge / "config.json").read_text())
    uvit = real_size.read_config(work / "bidiffuser").uvit
    c = meta["bridge"]
    assert (c["kind"], c["timestep_aware"], c["lm_dim"], c["text_dim"], c["num_tokens"]) == \
        ("resampler", True, 64, uvit.text_dim, uvit.num_text_tokens)
    assert meta["uvit_lora"]["rank"] == 32 and meta["uvit_lora"]["targets"] == ["qkv", "proj", "fc1", "fc2"]
    lora = load_file(bridge / "uvit_lora.safetensors")
    assert any(".attn.qkv.lora_B." in k for k in lora) and any(".mlp.fc2.lora_A." in k for k in lora)
    assert all(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)  # the LoRA path computes
    # the turn ran with the bridge, and drew its picture
    assert "--bridge " + str(bridge) in r["command"] and "--draw-with bridge" in r["command"]
    [png] = r["reply"]["images"]
    from PIL import Image
    assert Image.open(png).size == (64, 64)
    assert [p["phase"] for p in r["phases"]][-1] == "draw"
    # the printed counts are the files' and the JSON's
    out = capsys.readouterr().out
    params, rank, lora_params = _numbers(r"bridge: ([\d,]+) parameters .*U-ViT LoRA rank (\d+): ([\d,]+) parameters",
                                         out)
    weights = load_file(bridge / "bridge.safetensors")
    assert params == r["bridge"]["parameters"] == sum(v.numel() for v in weights.values()) > 0
    assert rank == 32 and lora_params == r["bridge"]["lora_parameters"] == sum(v.numel() for v in lora.values())
    # a second run reuses the bridge directory as it reuses the other weights
    stamp = (bridge / "bridge.safetensors").stat().st_mtime_ns
    real_size.write_bridge(bridge, real_size.SIZES["reduced"], work / "bidiffuser", work / "diffllama")
    assert (bridge / "bridge.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_reduced_bridge_train_steps_are_timed_on_the_dry_run_weights(tmp_path, capsys):
    import bridge_train_step

    work, results = tmp_path / "work", tmp_path / "train.json"
    size = real_size.SIZES["reduced"]
    real_size.write_bidiffuser(work / "bidiffuser", size)  # already there: the script reuses them
    real_size.write_llm(work / "diffllama", size)
    r = bridge_train_step.main(["--size", "reduced", "--workdir", str(work), "--steps", "3", "--json", str(results)])
    assert json.loads(results.read_text()) == json.loads(json.dumps(r))
    assert r["weights_written_s"] == 0 and len(r["step_seconds"]) == 3 and r["warmup_excluded"]
    out = work / "bridge_train"
    assert {"config.json", "bridge.safetensors", "uvit_lora.safetensors"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "config.json").read_text())
    assert meta["info"]["steps"] == 3 and meta["uvit_lora"]["rank"] == 32 and meta["bridge"]["lm_dim"] == 64
    assert meta["text_model"] == str((work / "diffllama").resolve())
    tsv = (work / "bridge_train_data" / "captions.tsv").read_text().splitlines()[1:]
    assert len(tsv) >= 3 and all(25 <= len(line.split("\t")[1].split()) <= 40 for line in tsv)
    printed = capsys.readouterr().out
    params, rank, lora = _numbers(r"bridge: ([\d,]+) parameters .*U-ViT LoRA rank (\d+): ([\d,]+) parameters", printed)
    [trainable] = _numbers(r"trainable parameters: ([\d,]+)", printed)
    [seconds] = _numbers(r"seconds per optimizer step: ([\d.]+)", printed)
    peak, llm, uvit, bridge = _numbers(r"peak RSS: ([\d.]+) GiB; resident weights: LLM ([\d.]+) GiB, "
                                       r"U-ViT ([\d.]+) GiB, bridge ([\d.]+) GiB", printed)
    assert (params, lora, trainable) == (r["bridge_parameters"], r["uvit_lora_parameters"], r["trainable_parameters"])
    assert rank == 32 and trainable == params + lora and params > 0 and lora > 0
    assert seconds > 0 and abs(seconds - round(sum(r["step_seconds"][1:]) / 2, 2)) < 0.011
    assert peak > 0 and r["peak_rss_bytes"] >= sum(r["resident_bytes"].values())
    assert "peak RSS during train_bridge" in printed
    assert all(v > 0 for v in r["resident_bytes"].values())
    assert all(math.isfinite(x) for x in r["losses"])
