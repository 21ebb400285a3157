"""``easygen demo build|eval``: the built-in shapes-world model (see easygen/demo/recipe.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from bidiffuser.cliutil import positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="build or evaluate the built-in shapes-world demo model (CPU, no downloads)",
        description="A tiny EasyGen trained end to end on a synthetic world of coloured shapes: every "
                    "component (CLIP, VAE, caption decoder, U-ViT, LLaMA, projector) is trained by the normal "
                    "training code. `easygen chat` with no --model-path uses it.")
    tasks = p.add_subparsers(dest="demo_task", required=True, metavar="TASK")
    from ..demo.recipe import BUILD_MINUTES, VERSION
    b = tasks.add_parser("build", help=f"generate the data and train every stage (resumable; about {BUILD_MINUTES} "
                                       f"min on 2 CPU cores)")
    b.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help=f"where to build (default $EASYGEN_DEMO_DIR, else ~/.cache/easygen/demo-shapes-v{VERSION})")
    b.add_argument("--recipe", choices=["full", "ci"], default="full",
                   help="full (the default) or ci: a few steps of everything, to test the plumbing")
    e = tasks.add_parser("eval", help="caption, VQA and image-reply accuracy and CIDEr on held-out images, "
                                      "and accuracy per turn in held-out conversations")
    e.add_argument("--model", type=Path, default=None, metavar="DIR", help="a built demo directory (default: as build)")
    e.add_argument("--images", type=positive_int, default=120, metavar="N", help="held-out images (default 120)")
    e.add_argument("--draws", type=positive_int, default=4, metavar="N",
                   help="image replies per colour and shape (default 4: 72 drawings)")
    e.add_argument("--conversations", type=positive_int, default=120, metavar="N",
                   help="held-out scripted conversations of 2 to 6 turns, scored per kind of turn (default 120)")
    e.add_argument("--seed", type=int, default=2024, help="seed of the held-out images (training uses 0)")
    e.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where the eval data, predictions, drawings and results.json go (default MODEL/eval)")
    return p


def run(args) -> int:
    import sys
    from contextlib import redirect_stdout

    from ..demo.recipe import BUILD_MINUTES, DemoModel, build, default_dir

    if args.demo_task == "build":
        root = args.out or default_dir()
        if args.recipe == "full" and not DemoModel(root).is_built():
            print(f"building the shapes demo model in {root} (about {BUILD_MINUTES} minutes on 2 CPU cores)",
                  file=sys.stderr, flush=True)
        with redirect_stdout(sys.stderr):  # the training commands' status lines are progress here
            demo = build(root, args.recipe, log=lambda s: print(s, flush=True))
        print(f"EasyGen directory: {demo.easygen}\nBiDiffuser directory: {demo.bidiffuser}")
        return 0

    from ..demo.evaluate import evaluate, format_results
    from ..errors import EasyGenError
    demo = DemoModel(args.model or default_dir())
    if not demo.is_built():
        raise EasyGenError(f"no built demo model in {demo.root}: run `easygen demo build` first")
    results = evaluate(demo, args.out or demo.root / "eval", n_images=args.images, draws=args.draws, seed=args.seed,
                       conversations=args.conversations)
    print(format_results(results))
    return 0
