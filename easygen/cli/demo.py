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
    e.add_argument("--model", type=Path, default=None, metavar="DIR",
                   help="a demo directory, built or shipped (default: the one `easygen chat` uses: $EASYGEN_DEMO_DIR, "
                        "else the shipped model)")
    e.add_argument("--images", type=positive_int, default=120, metavar="N", help="held-out images (default 120)")
    e.add_argument("--draws", type=positive_int, default=None, metavar="N",
                   help="image replies per colour and shape on each drawing path (default 17: 306 drawings; "
                        "--quick: N in all, default 24)")
    e.add_argument("--draw-seed", type=int, default=None, metavar="N",
                   help="repeat the drawing seeds of an earlier run (default: a fresh random sample of seeds, each "
                        "picture its own, from a range no training or tuning run used; the table prints it)")
    e.add_argument("--conversations", type=positive_int, default=None, metavar="N",
                   help="held-out scripted conversations of 2 to 6 turns, scored per kind of turn (default 120; "
                        "--quick: 30)")
    e.add_argument("--seed", type=int, default=None,
                   help="seed of the held-out images (default 2024; --quick: 7; training uses 0)")
    e.add_argument("--quick", action="store_true",
                   help="the reduced check CI runs: 24 single drawings and 30 conversations (or --draws N in all, "
                        "--conversations N), no caption/VQA passes")
    e.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where the eval data, predictions, drawings and results.json go (default MODEL/eval; "
                        "for the shipped model ~/.cache/easygen/demo-eval-shipped)")
    from .engine_args import add_llm_engine_args
    add_llm_engine_args(e)  # (with --quick: the conversations and drawings are the LLM's part)
    from ..demo.world import COLOURS, IMAGE_SIZE, MAX_SIDE, MIN_SIDE, SHAPES
    d = tasks.add_parser("picture", help="draw a picture of the shapes world (something to upload in a chat)")
    d.add_argument("colour", choices=list(COLOURS))
    d.add_argument("shape", choices=list(SHAPES))
    d.add_argument("path", type=Path, help="the PNG to write")
    d.add_argument("--side", type=int, default=32, help=f"the shape's size in px, {MIN_SIDE} to {MAX_SIDE} (default 32)")
    d.add_argument("--left", type=int, default=None, help="its left edge (default: centred)")
    d.add_argument("--top", type=int, default=None, help="its top edge (default: centred)")
    d.add_argument("--size", type=positive_int, default=IMAGE_SIZE,
                   help=f"the picture's size in px (default {IMAGE_SIZE}, the world's; chat resizes)")
    s = tasks.add_parser("ship", help="(maintainers) copy a built demo into the package as the shipped model: "
                                      "safetensors, float16, sha256 manifest, eval table measured on the copy")
    s.add_argument("--model", type=Path, required=True, metavar="DIR", help="a built demo directory")
    s.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="storage dtype of the floating-point weights (default float16)")
    s.add_argument("--dest", type=Path, default=None, metavar="DIR",
                   help="where to write it (default: the package's easygen/demo/model)")
    s.add_argument("--no-eval", action="store_true",
                   help="skip the evals (a manifest of files and build record only, e.g. for a ci-recipe build)")
    v = tasks.add_parser("verify", help="rebuild a shipped demo's recipe and compare every file with its manifest's "
                                        "sha256 (the full recipe takes as long as a build)")
    v.add_argument("--manifest", type=Path, default=None, metavar="FILE",
                   help="a shipped demo's MANIFEST.json (default: the package's shipped model)")
    v.add_argument("--model", type=Path, default=None, metavar="DIR",
                   help="compare this existing build instead of rebuilding")
    v.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where to rebuild (default: a temporary folder, removed afterwards)")
    return p


def run(args) -> int:
    import sys
    from contextlib import redirect_stdout

    from ..demo.build_record import command_line
    from ..demo.recipe import BUILD_MINUTES, DemoModel, build, default_dir

    if args.demo_task == "picture":
        return _picture(args)
    if args.demo_task == "build":
        root = args.out or default_dir()
        if args.recipe == "full" and not DemoModel(root).is_built():
            print(f"building the shapes demo model in {root} (about {BUILD_MINUTES} minutes on 2 CPU cores)",
                  file=sys.stderr, flush=True)
        with redirect_stdout(sys.stderr):  # the training commands' status lines are progress here
            demo = build(root, args.recipe, log=lambda s: print(s, flush=True), command=command_line(args._argv))
        print(f"EasyGen directory: {demo.easygen}\nBiDiffuser directory: {demo.bidiffuser}")
        return 0

    from bidiffuser.user_cache import user_cache_dir
    from ..demo.evaluate import evaluate, format_results
    from ..demo.shipped import SHIPPED_DIR, default_demo, ship
    from ..errors import EasyGenError
    if args.demo_task == "verify":
        return _verify(args)
    if args.demo_task == "ship":
        with redirect_stdout(sys.stderr):
            doc = ship(DemoModel(args.model), args.dest or SHIPPED_DIR, dtype=args.dtype,
                       log=lambda s: print(s, flush=True), command=command_line(args._argv),
                       run_eval=not args.no_eval)
        print(f"shipped demo model: {args.dest or SHIPPED_DIR} ({len(doc['sha256'])} files)")
        return 0
    demo = DemoModel(args.model) if args.model else default_demo()
    if not demo.is_built():
        raise EasyGenError(f"no built demo model in {demo.root}: run `easygen demo build` first")
    shipped = demo.root.resolve() == SHIPPED_DIR
    out = args.out or (user_cache_dir() / "demo-eval-shipped" if shipped else demo.root / "eval")
    from .engine_args import use_vllm_from_args, wants_vllm
    on_vllm = wants_vllm(args)
    if args.quick:
        from ..demo.evaluate import QUICK_SEED, format_quick, quick_evaluate
        engines = []

        def use_llm(loaded):
            engines.append(use_vllm_from_args(loaded, args))
        try:
            results = quick_evaluate(demo, out / "quick", conversations=args.conversations or 30,
                                     drawings=args.draws or 24, seed=QUICK_SEED if args.seed is None else args.seed,
                                     use_llm=use_llm if on_vllm else None, draw_seed=args.draw_seed)
        finally:
            for engine in engines:
                engine.close()
        print(format_quick(results))
        return 0
    if on_vllm:
        raise EasyGenError("--llm-engine vllm goes with --quick (the full eval's caption and VQA passes run "
                           "`easygen eval`, in process)")
    results = evaluate(demo, out, n_images=args.images, draws=args.draws or 17,
                       seed=2024 if args.seed is None else args.seed, conversations=args.conversations or 120,
                       draw_seed=args.draw_seed)
    print(format_results(results))
    return 0


def _picture(args) -> int:
    from PIL import Image

    from ..demo import world
    from ..errors import EasyGenError
    centre = (world.IMAGE_SIZE - args.side) // 2
    scene = world.Scene(args.colour, args.shape, args.side, centre if args.left is None else args.left,
                        centre if args.top is None else args.top)
    if not (world.MIN_SIDE <= scene.side <= world.MAX_SIDE and 0 <= scene.left <= world.IMAGE_SIZE - scene.side
            and 0 <= scene.top <= world.IMAGE_SIZE - scene.side):
        raise EasyGenError(f"the shape must lie inside the {world.IMAGE_SIZE}x{world.IMAGE_SIZE} canvas with a side of "
                           f"{world.MIN_SIDE} to {world.MAX_SIDE} px")
    world.draw(scene).resize((args.size, args.size), Image.BICUBIC).save(args.path)
    print(args.path)
    return 0


def _verify(args) -> int:
    """Rebuild (or take --model) and compare the shipped form file by file; exit 1 when any file differs."""
    import sys
    import tempfile
    from contextlib import redirect_stdout

    from ..demo.build_record import differences, environment
    from ..demo.recipe import DemoModel, Recipe, build
    from ..demo.shipped import MANIFEST, SHIPPED_DIR, verify_build
    from bidiffuser.checkpoint import read_json

    path = args.manifest or SHIPPED_DIR / MANIFEST
    doc = read_json(path, "shipped demo manifest")
    recorded = doc.get("build") or {}
    for line in differences(recorded, environment()):  # each can change bytes; said before the long rebuild
        print(f"note: {line}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="easygen-verify-") as scratch:
        if args.model is None:
            root = args.out or Path(scratch) / "build"
            print(f"rebuilding recipe '{doc['recipe']['name']}' in {root}", file=sys.stderr, flush=True)
            with redirect_stdout(sys.stderr):
                built = build(root, Recipe(**doc["recipe"]), log=lambda s: print(s, flush=True))
        else:
            built = DemoModel(args.model)
        problems = verify_build(doc, built, Path(scratch) / "shipped-form")
    total = len(doc["sha256"])
    if problems:
        print(f"{len(problems)} of {total} files differ from {path}:\n" + "\n".join(f"  {p}" for p in problems))
        return 1
    print(f"all {total} files identical to {path} (sha256)")
    return 0
