"""``easygen init``: a random-initialised tiny EasyGen directory, to try every command without weights."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("init", help="write a random tiny EasyGen model directory (for trying the tools)")
    p.add_argument("out", help="directory to create")
    p.add_argument("--preset", choices=["tiny"], default="tiny",
                   help="sizes (only 'tiny': real models come from Vicuna + training, or EasyGen's release)")
    p.add_argument("--bidiffuser", required=True,
                   help="BiDiffuser directory (e.g. from `bidiffuser init`); linked as OUT/bidiffuser")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args) -> int:
    from bidiffuser.model_dir import read_config

    from ..tiny import init_tiny_easygen

    read_config(args.bidiffuser)  # a clear error before anything is written
    out = init_tiny_easygen(args.out, args.bidiffuser, seed=args.seed)
    print(f"wrote a random tiny EasyGen directory to {out}")
    return 0
