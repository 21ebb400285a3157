"""The real-size dry run (benchmarks/real_size.py) at a reduced width: the same official-format
files (U-ViT .pth, caption decoder .pth with DDP keys, LDM VAE .pth, HF CLIP towers, a diffllama
directory in pytorch_model-0000N-of-0000M.bin fp16 shards with only LLaMA's tokenizer.model) and
the same `easygen chat --prompt --force-image --profile` turn, so the script keeps working."""
from __future__ import annotations

import json
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
