"""``easygen`` command line. Subcommands arrive with their capabilities (chat, features, train, eval,
demo); until then this entry point only reports its version."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from bidiffuser.cliutil import run_main


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="easygen", description="EasyGen multimodal assistant")
    p.add_argument("--version", action="version", version="easygen 0.1.0")
    p.parse_args(argv)
    p.print_help()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("easygen", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
