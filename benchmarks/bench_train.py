"""Training throughput: stage 1 (projector only), stage 2 full and stage 2 LoRA, with MFU.

    python benchmarks/bench_train.py [--configs tiny,mid] [--stages stage1,full,lora] [--batch 4]
                                     [--repeat 5] [--threads N] [--device cpu|cuda] [--mid-vocab 32000]
                                     [--no-loop-check] [--json results.json]

Single process, the real training code path: the model comes from ``easygen.train.loop.build_model``
(freezing, PEFT LoRA wrapping), the optimizer and schedule from the loop's own ``_wrap`` (AdamW,
cosine), batches from ``easygen.train.batches.Batcher``, and each timed optimizer step is the loop's
inner step: batch -> ``model(**batch).loss`` -> ``backward`` -> ``clip_grad_norm_`` -> AdamW step ->
scheduler step -> ``zero_grad``. Image features are precomputed into a feature store before timing,
as ``easygen features`` does (so every batch is a store hit and no BiDiffuser pass is timed; the store
read, file hash and ``decode_prefix`` are). With ``--loop-check`` (default on for tiny), the same
runs also go through ``easygen.train.loop.train`` itself and its ``log.jsonl`` tokens_per_s is shown.

Every example is the same one-image conversation (77 image positions + ~100 text tokens, labels on
the reply only) with a different image, so every micro-batch holds ``--batch`` x L tokens, no padding.

MFU: the matmul peak is measured in the same run (median GFLOP/s of a float32 ``torch.mm`` of two
2048 x 2048 matrices, before and after the training figures; the higher is the peak). Training
FLOPs per step count the ``nn.Linear`` weights (LLM layers, lm_head, projector, LoRA A/B; each
applied to every position, the projector to the image positions only):

    FLOPs = 2 N T  (forward)  +  2 N' T  (activation gradients)  +  2 N_train T  (weight gradients)

where N' is every Linear but the projector's first (its input, the image features, needs no
gradient: the trainable projector sits at the input, so stage 1 and LoRA back-propagate through all
layers too) and N_train the trainable Linears. Stage 2 full is thus ~6 N T, stage 1 and LoRA
~4 N T. Attention score matmuls (QK^T, AV), norms, the embedding lookup and the optimizer are not
counted. Each figure is the median of ``--repeat`` timed steps after a warm-up step (tiny: more, mid: fewer,
see ``Preset.repeat_scale``). Prints a Markdown table; it measures and reports, it never asserts a time.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from common import TIMING, median_seconds, machine_info, write_images, add_common_args, apply_common_args, report  # noqa: E402

from bidiffuser.cliutil import quiet_libraries  # noqa: E402

quiet_libraries()  # no weight-writing progress bars or advisory warnings between the figures
warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from transformers / peft

from bidiffuser.distributed import DistEnv  # noqa: E402
from bidiffuser.model_dir import init_tiny  # noqa: E402
from bidiffuser.pipeline import BiDiffuser  # noqa: E402
from easygen.constants import IMAGE_TOKEN_ID  # noqa: E402
from easygen.features import ImageFeatureExtractor  # noqa: E402
from easygen.tiny import init_tiny_easygen  # noqa: E402
from easygen.train.batches import Batcher, to_device  # noqa: E402
from easygen.train.config import TrainConfig  # noqa: E402
from easygen.train.loop import _wrap, build_model  # noqa: E402

N_IMAGES = 8            # distinct images the examples cycle through
N_EXAMPLES = 64
IMAGE_SIDE = 64         # pixels of the PNG files (resized to the BiDiffuser's resolution)
FEATURE_STEPS = 2       # BiDiffuser steps used to fill the store (the figures do not depend on it)
PEAK_N = 2048           # torch.mm side for the matmul peak
PEAK_REPEAT = 10        # timed torch.mm calls per peak measurement
STAGES = {  # name -> TrainConfig fields
    "stage1": dict(stage="pretrain"),
    "full": dict(stage="instruct"),
    "lora": dict(stage="instruct", lora=True),
}
STAGE_LABEL = {"stage1": "stage 1 (projector)", "full": "stage 2 full", "lora": "stage 2 LoRA r=8 (q,k,v,o)"}


@dataclass
class Preset:
    name: str
    overrides: dict = field(default_factory=dict)  # EasyGenConfig fields over init_tiny_easygen's
    repeat_scale: float = 1.0                       # fraction of --repeat this preset runs
    loop_check: bool = False                        # also run easygen.train.loop.train (--loop-check)


PRESETS = {
    # init_tiny_easygen's model: 2 layers x 64, 4 heads (2 KV heads), vocab = the tiny tokenizer's
    "tiny": Preset("tiny", {}, repeat_scale=4.0, loop_check=True),
    # a mid-size LLaMA: 8 layers x 1024, 16 heads of 64 (MHA), MLP 2816; vocab from --mid-vocab
    "mid": Preset("mid", dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                              num_key_value_heads=16, head_dim=64, intermediate_size=2816,
                              projector_hidden_size=1024), repeat_scale=0.6),
}


# -- timing ----------------------------------------------------------------------------------------


def fmt_count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


# -- peak ------------------------------------------------------------------------------------------
def matmul_peak(device, repeat: int, n: int = PEAK_N) -> float:
    """Median GFLOP/s of a float32 n x n x n ``torch.mm`` (2 n^3 FLOPs)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    out = torch.empty(n, n, device=device)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), repeat, warmup=2)
    return 2 * n ** 3 / seconds / 1e9


# -- data ------------------------------------------------------------------------------------------


def synthetic_examples(images: list[Path], n: int) -> list[dict]:
    """``n`` copies of one one-image conversation (~100 text tokens with the tiny tokenizer),
    cycling through ``images``: every example has the same length."""
    question = ("Describe the image in detail. What colour is the square, and how many shapes are there? "
                "Is there a red circle next to a tree, or a blue triangle on a wooden table?")
    answer = ("The image shows a green square on a plain background. There is one green square in the "
              "middle of the picture, next to a tree. There is no red circle and no blue triangle. "
              "It is a small picture of a square on a white background.")
    messages = [{"role": "user", "content": question, "num_images": 1}, {"role": "assistant", "content": answer}]
    return [{"id": f"ex{i}", "images": [str(images[i % len(images)])], "messages": messages} for i in range(n)]


# -- FLOPs ------------------------------------------------------------------------------------------
def linear_counts(model: torch.nn.Module) -> dict[str, int]:
    """Weights of the model's nn.Linear layers, split by where they apply and whether they train."""
    counts = {"llm": 0, "proj": 0, "proj_fc1": 0, "llm_train": 0, "proj_train": 0}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        n, proj = module.weight.numel(), ".projector." in f".{name}."
        counts["proj" if proj else "llm"] += n
        if proj and name.endswith("fc1"):
            counts["proj_fc1"] += n
        if module.weight.requires_grad:
            counts["proj_train" if proj else "llm_train"] += n
    return counts


def step_flops(c: dict[str, int], tokens: int, image_positions: int) -> float:
    """2 N T (forward) + 2 N' T (activation gradients) + 2 N_train T (weight gradients); the
    projector applies to image positions only, and its first layer needs no input gradient."""
    forward = 2 * (c["llm"] * tokens + c["proj"] * image_positions)
    activations = 2 * (c["llm"] * tokens + (c["proj"] - c["proj_fc1"]) * image_positions)
    weights = 2 * (c["llm_train"] * tokens + c["proj_train"] * image_positions)
    return forward + activations + weights


# -- one stage --------------------------------------------------------------------------------------
def make_config(model_dir: Path, workdir: Path, stage: str, batch: int) -> TrainConfig:
    return TrainConfig(model=str(model_dir), data="(synthetic)", features=str(workdir / "features"),
                       output_dir=str(workdir / "runs" / stage), micro_batch_size=batch, max_length=512,
                       feature_steps=FEATURE_STEPS, precision="fp32", **STAGES[stage]).validate()


def bench_stage(cfg: TrainConfig, examples: list[dict], repeat: int, device) -> dict:
    """Seconds per optimizer step (the loop's inner step), with the step's token counts."""
    torch.manual_seed(cfg.seed)
    model, loaded = build_model(cfg, device=device)
    features = ImageFeatureExtractor(loaded.bidiffuser, steps=cfg.feature_steps, scale=cfg.feature_scale,
                                     seed=cfg.feature_seed, cache_dir=cfg.features)
    batcher = Batcher(examples, loaded.processor, cfg.max_length, features)
    env = DistEnv(0, 1, 0, device)
    model, optimizer, scheduler, _ = _wrap(model, cfg, env, bf16=False, total_steps=10_000)
    trainable = [p for p in model.parameters() if p.requires_grad]
    order = itertools.cycle(range(0, len(examples) - cfg.micro_batch_size + 1, cfg.micro_batch_size))
    seen, optimizer_s = {}, []

    def step():
        start = next(order)
        batch = to_device(batcher(list(range(start, start + cfg.micro_batch_size))), device)
        seen["tokens"] = batch.pop("num_tokens")
        seen["positions"] = batch["input_ids"].numel()
        seen["image_positions"] = int((batch["input_ids"] == IMAGE_TOKEN_ID).sum())
        loss = model(**batch).loss / cfg.grad_accum
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        optimizer_s.append(time.perf_counter() - start)

    seconds = median_seconds(step, repeat)
    if features.misses:
        raise AssertionError(f"{features.misses} feature-store misses: BiDiffuser ran inside the timed steps")
    counts = linear_counts(model)
    total = sum(p.numel() for p in model.parameters())
    return {"seconds": seconds, "optimizer_s": statistics.median(optimizer_s[-repeat:]), **seen,
            "counts": counts, "params": total,
            "trainable": sum(p.numel() for p in trainable)}


def loop_check(cfg: TrainConfig, examples: list[dict], steps: int) -> float:
    """Median tokens_per_s that ``easygen.train.loop.train`` logs (log_every=1), first step left out."""
    from easygen.train.loop import train
    cfg.max_steps, cfg.log_every, cfg.save_every = steps + 1, 1, 10_000
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, examples)  # its progress bar, shard report and checkpoint notices are not ours
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return statistics.median(rates)


def fill_store(bidiffuser_dir: Path, store: Path, images: list[Path], device) -> None:
    """Compute the images' features into ``store`` with the training settings, as ``easygen features``
    does before training (not timed)."""
    defaults = TrainConfig()
    pipe = BiDiffuser.from_pretrained(bidiffuser_dir, device=device)
    ImageFeatureExtractor(pipe, steps=FEATURE_STEPS, scale=defaults.feature_scale, seed=defaults.feature_seed,
                          cache_dir=store)(images)


def run_preset(p: Preset, stages: list[str], batch: int, repeat: int, device, bidiffuser_dir: Path,
               workdir: Path, images: list[Path], mid_vocab: int, peak: float, check: bool) -> list[dict]:
    rows = []
    overrides = dict(p.overrides)
    if p.name != "tiny" and mid_vocab:
        overrides["vocab_size"] = mid_vocab
    model_dir = init_tiny_easygen(workdir / "model", bidiffuser_dir, seed=0, **overrides)
    c = json.loads((model_dir / "config.json").read_text())
    examples = synthetic_examples(images, N_EXAMPLES)
    print(f"\n[{p.name}] {c['num_hidden_layers']} layers x {c['hidden_size']}, {c['num_attention_heads']} heads "
          f"({c['num_key_value_heads']} KV) of {c['head_dim']}, MLP {c['intermediate_size']}, vocab "
          f"{c['vocab_size']}, projector {c['mm_hidden_size']}->{c['projector_hidden_size']}->{c['hidden_size']}; "
          f"micro-batch {batch}; {repeat} timed steps", flush=True)

    for stage in stages:
        cfg = make_config(model_dir, workdir, stage, batch)
        r = bench_stage(cfg, examples, repeat, device)
        tokens, t = r["tokens"], r["seconds"]
        flops = step_flops(r["counts"], r["positions"], r["image_positions"])
        gflops = flops / t / 1e9
        row = {"config": p.name, "stage": stage, "label": STAGE_LABEL[stage], "params": r["params"],
               "trainable": r["trainable"], "batch": batch, "tokens_per_step": tokens,
               "step_s": t, "optimizer_s": r["optimizer_s"], "tokens_per_s": tokens / t,
               "samples_per_s": batch / t, "flops_per_step": flops, "gflops": gflops, "mfu": gflops / peak,
               "loop_tokens_per_s": None, "other_load": TIMING.last_other_load}
        if check:
            loop_cfg = make_config(model_dir, workdir, stage, batch)
            loop_cfg.output_dir = str(workdir / "loop" / stage)
            row["loop_tokens_per_s"] = loop_check(loop_cfg, examples, repeat)
        rows.append(row)
        loop = f", loop {row['loop_tokens_per_s']:.0f} tok/s" if check else ""
        print(f"  {STAGE_LABEL[stage]:<28} trainable {fmt_count(r['trainable']):>6} of {fmt_count(r['params']):>6}: "
              f"{1e3 * t:8.1f} ms/step (optimizer {1e3 * r['optimizer_s']:.1f}), {tokens / t:8.1f} tok/s, "
              f"{batch / t:6.2f} samples/s, {gflops:6.1f} GFLOP/s{loop} (others: {row['other_load']:.2f} cores)",
              flush=True)
    return rows


# -- report -----------------------------------------------------------------------------------------


def markdown_table(rows: list[dict], peak: float) -> str:
    lines = ["| config | stage | trainable / params | tokens/step | ms/step | of which optimizer ms | tokens/s "
             "| samples/s | GFLOP/step | GFLOP/s | MFU | loop log tokens/s | other load (cores) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        loop = f"{r['loop_tokens_per_s']:.1f}" if r["loop_tokens_per_s"] else ""
        lines.append(f"| {r['config']} | {r['label']} | {fmt_count(r['trainable'])} / {fmt_count(r['params'])} "
                     f"| {r['tokens_per_step']} | {1e3 * r['step_s']:.1f} | {1e3 * r['optimizer_s']:.1f} "
                     f"| {r['tokens_per_s']:.1f} "
                     f"| {r['samples_per_s']:.2f} | {r['flops_per_step'] / 1e9:.1f} | {r['gflops']:.1f} "
                     f"| {100 * r['mfu']:.1f}% | {loop} | {r['other_load']:.2f} |")
    lines.append(f"\nMFU = GFLOP/s / measured float32 matmul peak ({peak:.1f} GFLOP/s, torch.mm {PEAK_N}x{PEAK_N}); "
                 "optimizer = clip_grad_norm_ + AdamW step + scheduler + zero_grad; loop log tokens/s = "
                 "easygen.train.loop.train's own log.jsonl figure for the same configuration (median, first "
                 "step left out).")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,mid", help="comma-separated presets: " + ", ".join(PRESETS))
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated: " + ", ".join(STAGES))
    ap.add_argument("--batch", type=int, default=4, help="micro-batch size (default 4)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="timed optimizer steps per figure (tiny runs 400%%, mid 60%% of them)")
    ap.add_argument("--mid-vocab", type=int, default=32000,
                    help="vocabulary of the mid LLaMA (default 32000, LLaMA's; 0: the tiny tokenizer's)")
    ap.add_argument("--loop-check", action=argparse.BooleanOptionalAction, default=None,
                    help="also run easygen.train.loop.train and show its logged tokens/s "
                         "(default: for tiny only)")
    add_common_args(ap)
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [n for n in names if n not in PRESETS] + [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown config(s) or stage(s): {', '.join(bad)}")
    device = apply_common_args(args)

    info = machine_info(device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    start, rows = time.perf_counter(), []
    peak_start = matmul_peak(device, PEAK_REPEAT)
    print(f"matmul peak: {peak_start:.1f} GFLOP/s (float32 torch.mm {PEAK_N}x{PEAK_N}, median of {PEAK_REPEAT})",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        bidiffuser_dir = Path(tmp) / "bidiffuser"
        init_tiny(bidiffuser_dir, seed=0)
        for name in names:
            p = PRESETS[name]
            workdir = Path(tmp) / name
            images = write_images(workdir / "images", N_IMAGES, IMAGE_SIDE)
            fill_store(bidiffuser_dir, workdir / "features", images, device)
            repeat = max(1, round(args.repeat * p.repeat_scale))
            check = p.loop_check if args.loop_check is None else args.loop_check
            rows += run_preset(p, stages, args.batch, repeat, device, bidiffuser_dir, workdir, images,
                               args.mid_vocab, peak_start, check)
    peak_end = matmul_peak(device, PEAK_REPEAT)
    peak = max(peak_start, peak_end)
    for r in rows:
        r["mfu"] = r["gflops"] / peak
    info.update(loadavg_1min_end=round(os.getloadavg()[0], 2), peak_gflops=round(peak, 2),
                peak_gflops_start=round(peak_start, 2), peak_gflops_end=round(peak_end, 2))
    print(f"matmul peak at the end: {peak_end:.1f} GFLOP/s; MFU below uses the higher, {peak:.1f}")
    report(markdown_table(rows, peak), info, start, args, rows)

if __name__ == "__main__":
    main()
