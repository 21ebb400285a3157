"""`easygen train` on tiny models and the sample data in data/: stage 1 freezing, FSDP sharding,
LoRA under FSDP, DeepSpeed ZeRO-2, and kill-and-resume equal to an uninterrupted run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easygen.builder import load_pretrained
from easygen.cli import main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "mixture_sample.json"


def _config(tmp_path, tiny_easygen_dir, name="run", **overrides) -> Path:
    cfg = dict(model=str(tiny_easygen_dir), data=str(DATA), output_dir=str(tmp_path / name),
               features=str(tmp_path / "features"), feature_steps=2, micro_batch_size=2, max_length=256,
               lr=3e-3, warmup_ratio=0.0, log_every=1, save_every=2, max_steps=6, seed=0)
    cfg.update(overrides)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _launch(args, nproc=1, env=None, timeout=300):
    """`easygen train ...` in a fresh process: torchrun for several ranks, python for one."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               "-m", "easygen.cli", *args]
    else:
        cmd = [sys.executable, "-m", "easygen.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(l)["loss"] for l in lines if '"loss"' in l]


def test_stage1_changes_only_the_projector(tmp_path, tiny_easygen_dir, capsys, recwarn):
    # micro-batch 1: the sample mixture's one held-out example gives an eval loss
    cfg = _config(tmp_path, tiny_easygen_dir, max_steps=4, micro_batch_size=1, keep_last=1,
                  activation_checkpointing=True)
    assert main(["train", "--stage", "pretrain", "--config", str(cfg), "lr=1e-2"]) == 0
    before = load_file(tiny_easygen_dir / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith("projector.") for k in changed)
    assert "projector.fc1.weight" in changed and "projector.fc2.weight" in changed
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000004"]  # pruned to keep_last=1
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [4] and records[-1]["eval_loss"] > 0
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in records if "loss" in r)
    # one process is the intent: torch.distributed.checkpoint's notice says nothing to a user
    assert not [w for w in recwarn if "torch.distributed is disabled" in str(w.message)]


def test_original_stage1_preset_trains_lm_head_and_caption_text_features(tmp_path, tiny_easygen_dir, capsys):
    """--preset original-stage1: the projector and lm_head change, nothing else; each caption example
    is trained a second time on features of its own text."""
    cfg = _config(tmp_path, tiny_easygen_dir, max_steps=3, micro_batch_size=2, grad_accum=1, max_length=256,
                  lr=1e-2, activation_checkpointing=False)
    assert main(["train", "--preset", "original-stage1", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"caption_text_features: [1-9]\d* caption examples also trained", out)
    before = load_file(tiny_easygen_dir / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert "lm_head.weight" in changed and "projector.fc1.weight" in changed
    assert all(k.startswith("projector.") or k == "lm_head.weight" for k in changed)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["train_lm_head"], saved["caption_text_features"], saved["lr"]) == (True, True, 1e-2)


def test_presets_and_new_settings_are_checked(tmp_path, tiny_easygen_dir, capsys):
    from easygen.train.config import PRESETS, load_config

    lora = load_config(None, ["model=m", "data=d"], preset="original-lora")
    assert (lora.stage, lora.lora, lora.lora_alpha, lora.lora_targets, lora.train_projector, lora.lr) == \
        ("instruct", True, 32, ["q_proj", "v_proj"], False, 2e-5)
    assert set(PRESETS) == {"stage1", "lora", "original-stage1", "original-lora"}
    cfg = _config(tmp_path, tiny_easygen_dir)
    assert main(["train", "--stage", "instruct", "--config", str(cfg), "train_lm_head=true"]) == 2
    assert "train_lm_head applies to stage pretrain" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg)]) == 2
    assert "give --stage" in capsys.readouterr().err


def test_frozen_projector_under_lora(tmp_path, tiny_easygen_dir):
    from easygen.train.config import load_config
    from easygen.train.loop import build_model

    cfg = load_config(None, [f"model={tiny_easygen_dir}", "data=d"], preset="original-lora")
    model, _ = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}


def test_config_errors_are_one_line(tmp_path, tiny_easygen_dir, capsys):
    cfg = _config(tmp_path, tiny_easygen_dir)
    assert main(["train", "--stage", "instruct", "--config", str(cfg), "learning_rate=1"]) == 2
    assert "unknown training settings: learning_rate" in capsys.readouterr().err
    assert main(["train", "--stage", "pretrain", "--config", str(cfg), "--lora"]) == 2
    assert "lora applies to stage instruct" in capsys.readouterr().err
    assert main(["train", "--stage", "instruct", "--config", str(tmp_path / "nope.json")]) == 2
    assert "training config not found" in capsys.readouterr().err


@pytest.mark.slow
def test_group_by_length_batches_similar_lengths_and_stays_a_seeded_permutation():
    from bidiffuser.distributed import DistEnv, ResumableSampler

    lengths = [(i * 37) % 101 for i in range(1000)]
    ranks = [ResumableSampler(1000, 4, DistEnv(rank=r, world_size=2, local_rank=r, device=torch.device("cpu")), 7,
                              lengths=lengths) for r in range(2)]
    plain = ResumableSampler(1000, 4, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), 7)
    for epoch in (0, 1):
        batches = [b for r in ranks for b in r.epoch(epoch)]
        seen = sorted(i for b in batches for i in b)
        assert seen == sorted(i for b in plain.epoch(epoch) for i in b)  # the same examples as without grouping
        spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
        assert spread < 5  # vs ~60 for random batches of 4
        assert ranks[0].epoch(epoch) == ranks[0].epoch(epoch)
    assert ranks[0].epoch(0) != ranks[0].epoch(1)
    lens = [[lengths[i] for i in b] for b in ranks[0].epoch(0)[:20]]
    assert lens != sorted(lens)  # the batches themselves are shuffled, not served shortest first


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_easygen_dir):
    # lora_dropout > 0 makes the result depend on the RNG state too, which resume must restore;
    # grouping by length changes the data order, which resume must find again
    common = dict(lora=True, lora_dropout=0.1, keep_last=1, group_by_length=True)
    straight = _launch(["train", "--stage", "instruct", "--config",
                        str(_config(tmp_path, tiny_easygen_dir, "straight", **common))])
    assert straight.returncode == 0, straight.stderr[-3000:]
    cfg = _config(tmp_path, tiny_easygen_dir, "killed", **common)
    killed = _launch(["train", "--stage", "instruct", "--config", str(cfg)], env={"EASYGEN_TEST_KILL_AT_STEP": "3"})
    assert killed.returncode == -9
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert ckpts[-1] == "step-00000002"  # step 3 was never saved: the resume must redo it
    resumed = _launch(["train", "--stage", "instruct", "--config", str(cfg)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    assert _losses(tmp_path / "straight")[-1] == pytest.approx(_losses(tmp_path / "killed")[-1], rel=1e-5)


@pytest.mark.slow
def test_fsdp_on_two_ranks_shards_trains_and_exports(tmp_path, tiny_easygen_dir, red_image):
    cfg = _config(tmp_path, tiny_easygen_dir, max_steps=8, micro_batch_size=1)
    r = _launch(["train", "--stage", "instruct", "--strategy", "fsdp", "--config", str(cfg)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    shares = [float(x) for x in re.findall(r"\] holds [\d,]+ of [\d,]+ parameters \(([\d.]+)%\)", r.stdout)]
    assert len(shares) == 2 and all(40 <= s <= 60 for s in shares), r.stdout  # each rank holds ~half
    losses = _losses(tmp_path / "run")
    assert len(losses) == 8 and losses[-1] < losses[0]
    loaded = load_pretrained(tmp_path / "run" / "final")
    assert loaded.bidiffuser is not None
    from easygen.assistant import Assistant, GenerationSettings
    reply = Assistant(loaded, GenerationSettings(temperature=0, max_new_tokens=5), out_dir=tmp_path).send(
        "what is it?", images=[red_image])
    assert isinstance(reply.text, str)


@pytest.mark.slow
def test_lora_under_fsdp_through_the_launch_script(tmp_path, tiny_easygen_dir):
    """scripts/instruct_lora.sh (2 ranks, FSDP2) with tiny overrides; exports merged and as an adapter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC": "2", "MICRO_BATCH": "1", "GRAD_ACCUM": "1",
           "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
    r = subprocess.run(["bash", str(REPO / "scripts" / "instruct_lora.sh"), str(tiny_easygen_dir), str(DATA),
                        str(tmp_path / "run"), "max_steps=4", "max_length=256", "feature_steps=2",
                        f"features={tmp_path / 'features'}"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["lora"] is True
    merged = load_pretrained(tmp_path / "run" / "final", load_bidiffuser=False)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "adapter"), "--lora-adapter"]) == 0
    adapter = load_pretrained(tmp_path / "adapter", model_base=tiny_easygen_dir, load_bidiffuser=False)
    ids = torch.tensor([merged.processor.tokenize_prompt("USER: hello ASSISTANT:")])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(input_ids=ids).logits, adapter.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
        base = load_pretrained(tiny_easygen_dir, load_bidiffuser=False).model(input_ids=ids).logits
    assert not torch.allclose(base, merged.model(input_ids=ids).logits)  # the adapter learned something


@pytest.mark.slow
def test_deepspeed_zero2_on_two_ranks(tmp_path, tiny_easygen_dir):
    cfg = _config(tmp_path, tiny_easygen_dir, max_steps=4, micro_batch_size=1,
                  deepspeed_config=str(REPO / "scripts" / "zero2.json"))
    r = _launch(["train", "--stage", "instruct", "--strategy", "deepspeed", "--config", str(cfg)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _losses(tmp_path / "run")
    assert len(losses) == 4 and all(l == l for l in losses)  # finite, logged every step
    loaded = load_pretrained(tmp_path / "run" / "final", load_bidiffuser=False)
    before = load_file(tiny_easygen_dir / "model.safetensors")
    after = loaded.model.state_dict()
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_run_directory_and_feature_store_guards(tmp_path, tiny_easygen_dir, capsys):
    cfg = _config(tmp_path, tiny_easygen_dir, max_steps=2, stage="instruct")  # the flag must win
    assert main(["train", "--stage", "pretrain", "--config", str(cfg), "--no-export"]) == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["stage"] == "pretrain"
    capsys.readouterr()

    assert main(["train", "--stage", "pretrain", "--config", str(cfg), "micro_batch_size=1"]) == 2
    assert "cannot resume" in capsys.readouterr().err  # a different data order is not a resume
    assert main(["train", "--stage", "pretrain", "--config", str(cfg), "resume=false"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", "--stage", "pretrain", "--config", str(cfg), f"output_dir={tmp_path / 'other'}",
                 "feature_steps=3"]) == 2
    assert "was made with steps=2" in capsys.readouterr().err  # not a silent BiDiffuser rerun
    assert main(["train", "--stage", "pretrain", "--config", str(cfg), "max_grad_norm=-1"]) == 2
    assert "max_grad_norm must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_deepspeed_kill_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_easygen_dir):
    """DeepSpeed keeps its own checkpoint format; the RNG (for LoRA dropout) is saved beside it."""
    common = dict(lora=True, lora_dropout=0.1, micro_batch_size=1, max_steps=4,
                  deepspeed_config=str(REPO / "scripts" / "zero2.json"))
    args = ["train", "--stage", "instruct", "--strategy", "deepspeed", "--no-export", "--config"]
    straight = _launch(args + [str(_config(tmp_path, tiny_easygen_dir, "straight", **common))], nproc=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    cfg = str(_config(tmp_path, tiny_easygen_dir, "killed", **common))
    assert _launch(args + [cfg], nproc=2, env={"EASYGEN_TEST_KILL_AT_STEP": "3"}).returncode != 0
    resumed = _launch(args + [cfg], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    assert _losses(tmp_path / "straight")[-1] == pytest.approx(_losses(tmp_path / "killed")[-1], rel=1e-5)
    for run in ("straight", "killed"):
        assert main(["export", str(tmp_path / run), "--out", str(tmp_path / f"{run}-final")]) == 0
    a = load_file(tmp_path / "straight-final" / "model.safetensors")
    b = load_file(tmp_path / "killed-final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_easygen_dir):
    """2 micro-batches of 1 accumulate to the same update as 1 micro-batch of 2 (same examples per
    step): the loss is the token mean over the whole step, not a mean of per-micro-batch means."""
    finals = []
    for name, mbs, accum in [("big", 2, 1), ("accumulated", 1, 2)]:
        cfg = _config(tmp_path, tiny_easygen_dir, name, stage="instruct", max_steps=3, micro_batch_size=mbs,
                      grad_accum=accum, lr=1e-2)
        assert main(["train", "--stage", "instruct", "--config", str(cfg)]) == 0
        finals.append(load_file(tmp_path / name / "final" / "model.safetensors"))
    changed = [k for k in finals[0] if not torch.equal(finals[0][k], load_file(tiny_easygen_dir / "model.safetensors")[k])]
    assert changed
    for k in finals[0]:
        # atol 1e-4 against updates of ~1e-2: Adam divides by the gradient's size, so float noise in
        # near-zero gradients (rare tokens' embedding rows) shows up as differences of a few 1e-5.
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-4, msg=k)
