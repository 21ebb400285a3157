"""``easygen draw``: descriptions in, PNG files out, through any drawing backend (BiDiffuser, ELLA,
LaVi-Bridge, ParaDiffusion), the one EasyGen's image replies use. Import-light: argparse only."""
from __future__ import annotations

import argparse

from bidiffuser.cliutil import DTYPE_NAMES, positive_int

BACKEND_NAMES = ["bidiffuser", "ella", "lavi-bridge", "paradiffusion"]  # drawing.BACKENDS


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("draw", help="draw descriptions with BiDiffuser or a released LLM-to-diffusion bridge",
                       description="Draw each prompt (any length) with the chosen backend and write PNG files. "
                                   "Image k of prompt i gets seed SEED + i * N_SAMPLES + k.")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="bidiffuser",
                   help="bidiffuser (default), ella, lavi-bridge or paradiffusion (see docs/drawing-backends.md)")
    p.add_argument("--model", metavar="DIR",
                   help="the backend's files as downloaded (bidiffuser: a BiDiffuser model directory; default: "
                        "the shipped demo's)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a description to draw (repeatable)")
    src.add_argument("--prompt-file", metavar="FILE", help="a text file, one description per line")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
    p.add_argument("--n-samples", type=positive_int, default=1, metavar="N", help="images per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="first seed (default 0)")
    p.add_argument("--steps", type=positive_int, metavar="N", help="sampling steps (default: the backend's)")
    p.add_argument("--guidance", type=float, metavar="S", help="guidance scale (default: the backend's)")
    p.add_argument("--width", type=positive_int, metavar="PX", help="image width (default: the backend's)")
    p.add_argument("--height", type=positive_int, metavar="PX", help="image height (default: the backend's)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend option (repeatable), e.g. mode=flexible (ELLA), bridge=DIR (bidiffuser)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPE_NAMES,
                   help="one dtype for every part (default: each part as its reference code runs it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from pathlib import Path

    from bidiffuser.checkpoint import require_file
    from bidiffuser.cliutil import progress_bar
    from bidiffuser.images import save_png
    from drawing import draw_in_batches, load_backend

    from ..errors import EasyGenError
    from .engine_args import parse_options

    if args.prompt_file:
        text = require_file(args.prompt_file, "prompt file").read_text(encoding="utf-8")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise EasyGenError(f"{args.prompt_file}: no prompts (one per line)")
    else:
        prompts = [p.strip() for p in args.prompt]
        if not all(prompts):
            raise EasyGenError("--prompt must not be empty")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EasyGenError(f"--out {out} is a file; give a folder")
    model = args.model
    if model is None:
        if args.backend != "bidiffuser":
            raise EasyGenError(f"--backend {args.backend} needs --model DIR (its files as downloaded)")
        from ..demo.shipped import default_demo
        model = default_demo().bidiffuser
    backend = load_backend(args.backend, model, device=args.device, dtype=args.dtype,
                           **parse_options(args.option, "--option"))
    jobs = [(i, k, prompt, args.seed + i * args.n_samples + k)
            for i, prompt in enumerate(prompts) for k in range(args.n_samples)]
    update, close = progress_bar(f"drawing {len(jobs)} image{'s' * (len(jobs) > 1)}", disable=args.quiet)
    done = [0]

    def progress(step: int, total: int) -> None:  # one bar over every step of every batch
        update(done[0] * total + step, -(-len(jobs) // max(1, backend.max_batch)) * total)
        if step == total:
            done[0] += 1

    try:
        images = draw_in_batches(backend, [j[2] for j in jobs], [j[3] for j in jobs], progress=progress,
                                 steps=args.steps, guidance=args.guidance, width=args.width, height=args.height)
    finally:
        close()
    for (i, k, _, seed), image in zip(jobs, images, strict=True):
        print(save_png(image, out / f"{i:04d}-{k}-seed{seed}.png"))
    return 0
