"""`bidiffuser train --bridge-stage`: every flag it accepts does what it says (or is refused in one
line): the lavi-bridge preset in both stages, --bridge-init keeping the init bridge's LoRA, --dtype for
the frozen text model, --activation-checkpointing, --ema-decay (checked against the EMA arithmetic)."""
from collections import Counter

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from bidiffuser.bridge import read_bridge
from bidiffuser.cli import main
from bidiffuser.errors import BiDiffuserError
from bidiffuser.train_bridge import BridgeTrainConfig, train_bridge

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
SMALL = dict(width=32, depth=2, heads=2)


def _train(tiny_dir, tiny_easygen_dir, captions, out, **kw):
    settings = dict(model=str(tiny_dir), data=str(captions), out=str(out), text_model=str(tiny_easygen_dir),
                    batch_size=4, seed=0, **kw)
    return read_bridge(train_bridge(BridgeTrainConfig(**settings)))


def _cli(tiny_dir, tiny_easygen_dir, captions, out, stage, *extra):
    shape = [] if "--bridge-init" in extra else ["--bridge-width", 32, "--bridge-depth", 2, "--bridge-heads", 2]
    argv = ["train", "--bridge-stage", stage, "--model", tiny_dir, "--data", captions, "--out", out,
            "--text-model", tiny_easygen_dir, "--batch-size", 4, "--seed", 0, *shape, *extra]
    code = main([str(a) for a in argv])
    assert code == 0
    return read_bridge(out)


def _weights(files, part="weights") -> dict:
    return getattr(files, part)()


def test_the_lavi_bridge_preset_distils_then_keeps_its_lora_through_init(tiny_dir, tiny_easygen_dir, captions,
                                                                         tmp_path, capsys):
    # stage distill: the preset's LM LoRA belongs to stage t2i, the LM stays frozen
    a = _train(tiny_dir, tiny_easygen_dir, captions, tmp_path / "a", preset="lavi-bridge", stage="distill", steps=2)
    assert a.config.kind == "per_token" and a.lm_lora is None and a.uvit_lora is None
    with pytest.raises(BiDiffuserError, match="LM LoRA trains in stage t2i"):
        _train(tiny_dir, tiny_easygen_dir, captions, tmp_path / "x", stage="distill", steps=2, lm_lora_rank=2)
    b = _train(tiny_dir, tiny_easygen_dir, captions, tmp_path / "b", preset="lavi-bridge", stage="t2i", steps=2,
               init=str(a.root), uvit_lora_rank=2, lm_lora_rank=2, lm_lr=1e-2)
    assert b.lm_lora.rank == 2 and any(v.abs().max() > 0 for k, v in b.lm_lora_weights().items() if "lora_B" in k)
    # from b, its LoRAs carry on at their own ranks: a rank flag would do nothing, so it is refused
    code = main(["train", "--bridge-stage", "t2i", "--model", str(tiny_dir), "--data", str(captions), "--out",
                 str(tmp_path / "x"), "--text-model", str(tiny_easygen_dir), "--bridge-init", str(b.root),
                 "--lm-lora-rank", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "--lm-lora-rank: the --bridge-init bridge's LoRA trains on at its own rank" in err
    # t2i from b at a vanishing learning rate: b's LoRA is where it starts (not a fresh one)
    c = _train(tiny_dir, tiny_easygen_dir, captions, tmp_path / "c", preset="lavi-bridge", stage="t2i", steps=1,
               init=str(b.root), lr=1e-12, lm_lr=1e-12)
    assert c.lm_lora == b.lm_lora and c.uvit_lora == b.uvit_lora
    for part in ("lm_lora_weights", "uvit_lora_weights", "weights"):
        want, got = _weights(b, part), _weights(c, part)
        assert want.keys() == got.keys(), part
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-8)
    # distilling again from b keeps both LoRAs as they were (the LM reads through its LoRA, frozen)
    d = _train(tiny_dir, tiny_easygen_dir, captions, tmp_path / "d", preset="lavi-bridge", stage="distill", steps=1,
               init=str(b.root))
    assert d.lm_lora == b.lm_lora and d.uvit_lora == b.uvit_lora
    for part in ("lm_lora_weights", "uvit_lora_weights"):
        assert all(torch.equal(_weights(d, part)[k], v) for k, v in _weights(b, part).items())


def _lm_dtypes(run) -> set:
    """The dtype of the text model's weights whenever it runs (a causal LM has an lm_head)."""
    seen = set()

    def hook(module, args):
        if hasattr(module, "lm_head"):
            seen.add(module.lm_head.weight.dtype)
    handle = register_module_forward_pre_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_dtype_bfloat16_loads_the_frozen_text_model_in_bfloat16(tiny_dir, tiny_easygen_dir, captions, tmp_path):
    seen = _lm_dtypes(lambda: _cli(tiny_dir, tiny_easygen_dir, captions, tmp_path / "bf16", "distill", "--steps", 2,
                                   "--dtype", "bfloat16"))
    assert seen == {torch.bfloat16}
    files = read_bridge(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in files.weights().values())  # trained weights stay float32
    assert _lm_dtypes(lambda: _cli(tiny_dir, tiny_easygen_dir, captions, tmp_path / "fp32", "distill",
                                   "--steps", 1)) == {torch.float32}


def _calls(run) -> Counter:
    """How often modules of each class run (recomputation in backward counts again)."""
    calls = Counter()
    handle = register_module_forward_hook(lambda m, args, out: calls.update([type(m).__name__]))
    try:
        run()
    finally:
        handle.remove()
    return calls


def test_activation_checkpointing_recomputes_and_trains_the_same(tiny_dir, tiny_easygen_dir, captions, tmp_path):
    runs, calls = {}, {}
    for name, extra in (("plain", []), ("ckpt", ["--activation-checkpointing"])):
        calls[name] = _calls(lambda: runs.__setitem__(name, _cli(
            tiny_dir, tiny_easygen_dir, captions, tmp_path / name, "t2i", "--steps", 2, "--uvit-lora-rank", 2,
            "--lm-lora-rank", 2, *extra)))
    # the bridge's blocks, the U-ViT's blocks and the LM's layers each run again in backward (counted by
    # their inner modules: a recomputation stops once it has what backward needs)
    for cls in ("AdaLayerNorm", "Attention", "LlamaAttention"):
        assert calls["ckpt"][cls] > calls["plain"][cls] > 0, cls
    for part in ("weights", "uvit_lora_weights", "lm_lora_weights"):
        a, b = _weights(runs["plain"], part), _weights(runs["ckpt"], part)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_ema_decay_writes_the_moving_average(tiny_dir, tiny_easygen_dir, captions, tmp_path):
    """From a known start w0 (an init bridge): after 2 steps at decay 0.5, EMA = w0/4 + w1/4 + w2/2."""
    init = _cli(tiny_dir, tiny_easygen_dir, captions, tmp_path / "init", "distill", "--steps", 1)
    common = ["--bridge-init", init.root, "--lr", "1e-2", "--lr-schedule", "constant", "--warmup-ratio", "0"]
    one = _cli(tiny_dir, tiny_easygen_dir, captions, tmp_path / "one", "distill", "--steps", 1, *common)
    two = _cli(tiny_dir, tiny_easygen_dir, captions, tmp_path / "two", "distill", "--steps", 2, *common)
    ema = _cli(tiny_dir, tiny_easygen_dir, captions, tmp_path / "ema", "distill", "--steps", 2, *common,
               "--ema-decay", "0.5")
    w0, w1, w2, got = (f.weights() for f in (init, one, two, ema))
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)
    for k in w0:
        torch.testing.assert_close(got[k], w0[k] / 4 + w1[k] / 4 + w2[k] / 2, rtol=1e-5, atol=1e-6)
