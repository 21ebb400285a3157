"""``easygen`` command line: one subcommand per use (chat, eval, ...).

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and ``run(args)``;
those modules import only argparse at the top, so ``easygen --help`` stays instant and the heavy
imports happen in ``run``.
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module
from typing import Sequence

from bidiffuser.cliutil import run_main

# subcommand -> module (each capability adds its line)
SUBCOMMANDS: dict[str, str] = {
    "init": "easygen.cli.init",
    "chat": "easygen.cli.chat",
    "eval": "easygen.cli.eval",
    "features": "easygen.cli.features",
    "train": "easygen.cli.train",
    "export": "easygen.cli.export",
    "export-llm": "easygen.cli.export_llm",
    "draw": "easygen.cli.draw",
    "demo": "easygen.cli.demo",
    "serve": "easygen.cli.serve",
    "worker": "easygen.cli.worker",
    "train-lavi-bridge": "easygen.cli.train_lavi_bridge",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="easygen", description="EasyGen multimodal assistant")
    p.add_argument("--version", action="version", version="easygen 0.1.0")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        mod = import_module(module)
        mod.add_parser(sub).set_defaults(_run=mod.run)
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # the command as typed, for records of what ran
    return args._run(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("easygen", _main, argv)

