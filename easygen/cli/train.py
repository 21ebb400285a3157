"""``easygen train``: stage 1 / stage 2, under torchrun or plain python; exports OUTPUT_DIR/final at the end."""
from __future__ import annotations

import argparse

from ..train.config import PRESETS


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train stage 1 (pretrain: projector) or stage 2 (instruct: LLM + projector)",
                       description="Launch with torchrun --nproc_per_node=N (or plain python for one process). "
                                   "Settings come from --config, then KEY=VALUE overrides (see easygen/train/config.py).")
    p.add_argument("--stage", choices=["pretrain", "instruct"], help="required unless --preset sets it")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from a named recipe: ours (stage1, lora) or the original EasyGen's "
                        "(original-stage1, original-lora); docs/training.md compares them")
    p.add_argument("--config", help="training config (JSON or YAML)")
    p.add_argument("--strategy", choices=["ddp", "fsdp", "deepspeed"], help="overrides the config's strategy")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (stage instruct)")
    p.add_argument("--no-export", action="store_true", help="skip writing OUTPUT_DIR/final at the end")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="leave malformed data rows out (and count them) instead of stopping at the first")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. lr=1e-4 max_steps=100")
    return p


def run(args) -> int:
    import os
    from pathlib import Path

    from bidiffuser.distributed import shutdown

    from ..data import load_mixture
    from ..train.config import load_config
    from ..train.export import export
    from ..train.loop import train

    from ..errors import EasyGenError

    if args.stage is None and args.preset is None:
        raise EasyGenError("give --stage (pretrain or instruct) or a --preset")
    # the flags win over the config file
    overrides = ([f"stage={args.stage}"] if args.stage else []) + list(args.overrides)
    if args.strategy:
        overrides.append(f"strategy={args.strategy}")
    if args.lora:
        overrides.append("lora=true")
    cfg = load_config(args.config, overrides, preset=args.preset)
    mixture = load_mixture(cfg.data, on_error="skip" if args.skip_bad_rows else "raise")
    if int(os.environ.get("RANK", "0")) == 0:
        print(mixture.summary())
    last = train(cfg, mixture.train, mixture.eval)
    shutdown()
    if int(os.environ.get("RANK", "0")) == 0 and not args.no_export:
        out = export(last, Path(cfg.output_dir) / "final")
        print(f"exported {out}")
    return 0
