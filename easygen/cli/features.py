"""``easygen features``: compute the BiDiffuser latents of every image of a data mixture, once.

The BiDiffuser pass is the expensive part of training input (a full reverse diffusion per image),
so it runs here, ahead of training, into a ``FeatureStore``. Under ``torchrun`` every rank takes
its share of the images (no process group needed: the split is a function of the image path and
RANK/WORLD_SIZE) and writes its own shards into the same store. Images already in the store are
skipped, so a killed run resumes where its last finished shard ended.
"""
from __future__ import annotations

import argparse
import hashlib
import os

from bidiffuser.cliutil import add_device_args, positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "features", help="precompute image features for a data mixture (resumable, torchrun-shardable)",
        description="Run the BiDiffuser image-to-text pass once per unique image of a data config and keep "
                    "the 77 x 64 latents in a feature store (safetensors shards). Launch with torchrun "
                    "--nproc_per_node=N to split the images across N processes; rerun after a kill to resume.")
    p.add_argument("--data", required=True, metavar="CONFIG", help="data config (JSON or YAML) listing the datasets")
    p.add_argument("--model", required=True, metavar="BIDIFFUSER_DIR", help="BiDiffuser model directory")
    p.add_argument("--out", required=True, metavar="STORE",
                   help="feature store directory (created; shared by all ranks)")
    p.add_argument("--steps", type=positive_int, default=50, help="sampling steps (default 50)")
    p.add_argument("--scale", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    p.add_argument("--seed", type=int, default=1234,
                   help="base seed; each image's noise derives from it (default 1234)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per BiDiffuser batch (default 8)")
    p.add_argument("--shard-size", type=positive_int, default=256, help="images per shard file (default 256)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="only the first N images of the mixture (sorted by path): a trial run; "
                        "rerun without it to finish")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed data rows and unreadable images (counted) instead of stopping at the first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_args(p)
    return p


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes, as torchrun sets them (else 0 of 1)."""
    from easygen.errors import EasyGenError
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise EasyGenError("RANK and WORLD_SIZE must be integers (as torchrun sets them)") from None
    if not 0 <= rank < world:
        raise EasyGenError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


def owner(image: str, world: int) -> int:
    """The rank that computes ``image``: a hash of its path, so every rank agrees without talking,
    and each rank reads only its own images (hashing contents would make every rank read them all)."""
    return int.from_bytes(hashlib.sha256(image.encode()).digest()[:8], "big") % world


def _device(name: str | None):
    import torch
    from bidiffuser.cliutil import resolve_device
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:  # one GPU per torchrun process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from tqdm import tqdm

    from bidiffuser.cliutil import torch_dtype
    from bidiffuser.errors import BiDiffuserError
    from bidiffuser.pipeline import BiDiffuser
    from easygen.data import load_mixture
    from easygen.feature_store import FeatureStore
    from easygen.features import ImageFeatureExtractor, image_bytes

    rank, world = _rank_and_world()
    who = f"rank {rank}/{world}: " if world > 1 else ""
    mixture = load_mixture(args.data, on_error="skip" if args.skip_bad_rows else "raise")
    if mixture.skipped and rank == 0:
        print(f"easygen features: skipped {mixture.skipped} malformed row(s); first: {mixture.skipped_examples[0]}",
              file=sys.stderr)
    images = mixture.images()[:args.limit]
    mine = [im for im in images if owner(im, world) == rank]

    pipe = BiDiffuser.from_pretrained(args.model, device=_device(args.device), dtype=torch_dtype(args.dtype))
    store = FeatureStore(args.out, shard_size=args.shard_size, writer=f"r{rank}")
    extractor = ImageFeatureExtractor(pipe, steps=args.steps, scale=args.scale, seed=args.seed,
                                      cache_dir=store, batch_size=args.batch_size)
    todo: dict[str, str] = {}  # key -> first path with those bytes: identical files are computed once
    present = bad = 0
    # Hashing reads every image of this rank: a bar of its own, as it takes a while on big data.
    for image in tqdm(mine, desc=f"{who}checking store", unit="img", file=sys.stderr, leave=False,
                      disable=args.quiet or rank != 0):
        try:
            key = extractor.key(image_bytes(image))
        except BiDiffuserError as e:
            if not args.skip_bad_rows:
                raise
            bad += 1
            tqdm.write(f"easygen features: {who}skipped: {e}", file=sys.stderr)
            continue
        if key in store:
            present += 1
        else:
            todo.setdefault(key, image)

    computed = 0
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"{who}features", unit="img", file=sys.stderr, dynamic_ncols=True,
               disable=args.quiet or rank != 0)  # one bar: several ranks' bars would garble one terminal
    pending = list(todo.values())
    with store:  # closing writes the last partial shard, also when a batch fails
        for i in range(0, len(pending), args.batch_size):
            batch = pending[i:i + args.batch_size]
            try:
                extractor.latents(batch)
                computed += len(batch)
            except BiDiffuserError:
                if not args.skip_bad_rows:
                    raise
                for image in batch:  # find the bad image(s); keep the good ones
                    try:
                        extractor.latents([image])
                        computed += 1
                    except BiDiffuserError as e:
                        bad += 1
                        tqdm.write(f"easygen features: {who}skipped: {e}", file=sys.stderr)
            bar.update(len(batch))
    bar.close()
    elapsed = time.perf_counter() - start
    rate = computed / elapsed if elapsed > 0 else 0.0
    skipped = f", {bad} unreadable skipped" if bad else ""
    # one write per line: torchrun ranks share stdout unbuffered, and print() writes the newline apart
    sys.stdout.write(f"easygen features: {who}{computed} computed, {present} already present{skipped}, "
                     f"{elapsed:.1f} s, {rate:.2f} images/s -> {store.root}\n")
    sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    """``python -m easygen.cli.features ...``: this subcommand alone (same flags as ``easygen features``)."""
    import sys

    from bidiffuser.cliutil import run_main

    def _main(argv):
        parser = argparse.ArgumentParser(prog="easygen")
        add_parser(parser.add_subparsers(dest="command", required=True))
        return run(parser.parse_args(["features", *argv]))

    return run_main("easygen", _main, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    raise SystemExit(main())
