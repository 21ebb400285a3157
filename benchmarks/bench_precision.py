"""U-ViT forward in bfloat16 (or float16) against float32, on the same random weights: speed ratio
and relative error of each output.

    python benchmarks/bench_precision.py [--configs mid,v1] [--dtype bfloat16] [--batch 2]
                                         [--repeat 5] [--device cpu|cuda] [--json results.json]

Three ways of running the same weights (``bidiffuser.precision`` uses the last):
  float32                fp32 weights, no autocast (the reference);
  autocast               fp32 weights under torch.autocast(dtype) (the original EasyGen on CUDA);
  half weights+autocast  weights cast to dtype and autocast (halves the U-ViT's memory).
Relative error is ||out - ref|| / ||ref|| per output (image noise, CLIP noise, text noise), at an
i2t step (t_img = 0, t_text = 500). Reports, never asserts.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from common import add_common_args, apply_common_args, machine_info, median_seconds, n_params, report  # noqa: E402

from bidiffuser.uvit import UViT, UViTConfig  # noqa: E402

CONFIGS = {
    "mid": UViTConfig(img_size=32, embed_dim=512, depth=12, num_heads=8, text_dim=64, clip_img_dim=512),
    "v1": UViTConfig.v1(),  # UniDiffuser-v1: 952M parameters, 64x64x4 latents (512 px)
}
OUTPUTS = ("img", "clip", "text")


def inputs(cfg: UViTConfig, batch: int, device) -> tuple:
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    t = torch.full((batch,), 500.0, device=device)
    return (r(batch, cfg.in_chans, cfg.img_size, cfg.img_size), r(batch, 1, cfg.clip_img_dim),
            r(batch, cfg.num_text_tokens, cfg.text_dim), torch.zeros_like(t), t)


def run(model: UViT, x: tuple, dtype: torch.dtype | None, device) -> list[torch.Tensor]:
    with torch.inference_mode():
        if dtype is None:
            return [o.float() for o in model(*x)]
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            wdt = next(model.parameters()).dtype
            return [o.float() for o in model(*(a.to(wdt) if a.is_floating_point() and i < 3 else a
                                                for i, a in enumerate(x)))]


def bench(name: str, cfg: UViTConfig, dtype: torch.dtype, batch: int, repeat: int, device) -> list[dict]:
    torch.manual_seed(0)
    model = UViT(cfg).to(device).eval()
    x = inputs(cfg, batch, device)
    ref = run(model, x, None, device)
    rows = []
    t32 = median_seconds(lambda: run(model, x, None, device), repeat, warmup=2)
    rows.append({"config": name, "params": n_params(model), "mode": "float32",
                 "s_per_forward": t32, "speedup": 1.0, **{f"rel_err_{k}": 0.0 for k in OUTPUTS}})
    half = copy.deepcopy(model).to(dtype)
    dt_name = str(dtype).removeprefix("torch.")
    for mode, m in ((f"{dt_name} autocast", model), (f"{dt_name} weights+autocast", half)):
        out = run(m, x, dtype, device)
        secs = median_seconds(lambda: run(m, x, dtype, device), repeat, warmup=2)
        errs = {f"rel_err_{k}": float((o - r).norm() / r.norm()) for k, o, r in zip(OUTPUTS, out, ref)}
        rows.append({"config": name, "params": n_params(model), "mode": mode,
                     "s_per_forward": secs, "speedup": t32 / secs, **errs})
    del half, model
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="mid,v1", help="comma-separated: " + ",".join(CONFIGS))
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--batch", type=int, default=2, help="rows per forward (2 = one guided i2t step for one image)")
    ap.add_argument("--repeat", type=int, default=5)
    add_common_args(ap)
    args = ap.parse_args(argv)
    device = apply_common_args(args)
    start, info = time.perf_counter(), machine_info(device)
    rows = []
    for name in args.configs.split(","):
        rows += bench(name, CONFIGS[name], getattr(torch, args.dtype), args.batch, args.repeat, device)
    lines = ["| config | params | mode | s / forward | speed vs fp32 | rel. err img | clip | text |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['params']} | {r['mode']} | {r['s_per_forward']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['rel_err_img']:.2e} | {r['rel_err_clip']:.2e} | {r['rel_err_text']:.2e} |")
    report("\n".join(lines), info, start, args, rows)


if __name__ == "__main__":
    main()
