"""``easygen export``: a standalone model directory from a training run or checkpoint."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a standalone model directory from a training run or checkpoint")
    p.add_argument("run", help="a run's output directory (its last checkpoint) or one checkpoint directory")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--lora-adapter", action="store_true",
                   help="LoRA runs: write the adapter (+ projector) instead of the merged model")
    return p


def run(args) -> int:
    from ..train.export import export
    print(f"exported {export(args.run, args.out, lora_adapter=args.lora_adapter)}")
    return 0
