"""``python -m easygen.eval.lmms_tasks DIR``: write the shapes_vqa task (YAML + parquet) under DIR,
for ``python -m lmms_eval ... --tasks shapes_vqa --include_path DIR``."""
from __future__ import annotations

import argparse
import sys

from bidiffuser.cliutil import positive_int

from . import write_shapes_vqa


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m easygen.eval.lmms_tasks", description=__doc__.split("\n")[0])
    p.add_argument("out", metavar="DIR", help="folder to write shapes_vqa/ into (give it to --include_path)")
    p.add_argument("--images", type=positive_int, default=120, metavar="N",
                   help="held-out images, two questions each (default 120, as `easygen demo eval`)")
    p.add_argument("--seed", type=int, default=2024, help="seed of the held-out images (default 2024, as the demo eval)")
    args = p.parse_args(argv)
    folder = write_shapes_vqa(args.out, args.images, args.seed)
    print(f"wrote {folder}: {2 * args.images} questions; run lmms-eval with --include_path {args.out} --tasks shapes_vqa")
    return 0


if __name__ == "__main__":
    sys.exit(main())
