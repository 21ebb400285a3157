"""Where the shapes demo's drawings go wrong: BiDiffuser alone (no LLM) draws every colour and shape
from its canonical caption under each sampling setting, through CLIP or (``--bridge``) its LLM bridge,
reads each picture back with ``world.analyse_image``, and prints colour / shape counts per setting and
the colour confusions (asked -> read). Also the VAE's colour round trip on the pictures the assistant
should draw, and (``--data``) how often each colour occurs in a build's training captions.

    python benchmarks/demo_draw.py --model easygen/demo/model/bidiffuser --scales 0,0.2,0.5 --steps 20,50
    python benchmarks/demo_draw.py --model easygen/demo/model/bidiffuser --bridge easygen/demo/model/bridge

Every drawing has a seed of its own, sampled at random (``--seed`` repeats a sample, printed), so a
setting chosen here is checked on other samples by ``easygen demo eval``.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path

import torch

from bidiffuser.pipeline import BiDiffuser
from easygen.demo import world


def draw_grid(backend, steps: int, scale: float, samples: int, seed: int, caption: str) -> dict:
    counts, confusion = collections.Counter(), collections.Counter()
    asks = [(c, s) for c in world.COLOURS for s in world.SHAPES for _ in range(samples)]
    # a seed of its own per drawing: one noise shared by all would be one sample
    seeds = random.Random(seed).sample(range(1_000_000, 2**31 - 1), len(asks))
    images = backend.draw([caption.format(colour=c, shape=s) for c, s in asks], seeds, steps=steps, guidance=scale)
    for (colour, shape), image in zip(asks, images):
        found = world.analyse_image(image)
        counts["colour"] += found.colour == colour
        counts["shape"] += found.shape == shape
        counts["both"] += (found.colour, found.shape) == (colour, shape)
        counts["total"] += 1
        if found.colour != colour:
            confusion[f"{colour}->{found.colour}"] += 1
    return {"counts": counts, "confusion": confusion}


def colour_balance(data: Path) -> str:
    """How many training captions (image-text pairs and draw captions) name each colour."""
    counts = collections.Counter()
    for name in ("captions.tsv", "draw_captions.tsv"):
        for line in (data / name).read_text().splitlines()[1:]:
            counts[world.parse_description(line.split("\t")[1])[0]] += 1
    total = sum(counts.values())
    return ", ".join(f"{c} {counts[c]} ({100 * counts[c] / total:.1f}%)" for c in list(world.COLOURS) + [None]
                     if counts[c])


def vae_round_trip(pipe: BiDiffuser, n: int, seed: int) -> tuple[int, int]:
    """Drawing-style scenes through the VAE (posterior mean, decoded): (colour right, shape right) of ``n``."""
    rng = random.Random(seed)
    colour_ok = shape_ok = 0
    for _ in range(n):
        scene = world.drawing_scene(rng, rng.choice(list(world.COLOURS)), rng.choice(world.SHAPES))
        mean, _, _ = pipe.encode_image_posteriors([world.draw(scene)])
        found = world.analyse_image(pipe.decode_images(mean)[0])
        colour_ok += found.colour == scene.colour
        shape_ok += found.shape == scene.shape
    return colour_ok, shape_ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a demo BiDiffuser directory")
    p.add_argument("--scales", default="0,0.2,0.5", help="guidance scales, comma-separated")
    p.add_argument("--steps", default="20", help="sampling steps, comma-separated")
    p.add_argument("--samples", type=int, default=4, help="drawings per colour and shape and setting")
    p.add_argument("--seed", type=int, default=None, help="the seed sample to repeat (default: a fresh one)")
    p.add_argument("--bridge", type=Path, default=None, help="draw through this LLM bridge directory instead of CLIP")
    p.add_argument("--data", type=Path, default=None, help="a build's data/ folder: count colours in its captions")
    p.add_argument("--caption", default="a {colour} {shape}", help="the text drawn (default: the <Img> description)")
    p.add_argument("--vae", type=int, default=200, help="VAE round trips (0: skip)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    from drawing.registry import load_backend
    seed = random.randrange(2**31) if args.seed is None else args.seed
    print(f"seed sample {seed} (--seed {seed} repeats it); drawing through {'the bridge' if args.bridge else 'CLIP'}")
    backend = load_backend("bidiffuser", args.model, device="cpu", bridge=args.bridge,
                           draw_with="bridge" if args.bridge else "clip")
    pipe = backend.pipe
    if args.data:
        print(f"training captions per colour: {colour_balance(args.data)}")
    if args.vae:
        c, s = vae_round_trip(pipe, args.vae, seed)
        print(f"VAE round trip of {args.vae} drawings: colour {c} ({100 * c / args.vae:.1f}%), shape {s}")
    for steps in map(int, args.steps.split(",")):
        for scale in map(float, args.scales.split(",")):
            t0 = time.perf_counter()
            r = draw_grid(backend, steps, scale, args.samples, seed, args.caption)
            n = r["counts"]["total"]
            worst = ", ".join(f"{k} {v}" for k, v in r["confusion"].most_common(4))
            print(f"steps {steps:>3} scale {scale:<4}: colour {r['counts']['colour']:>3}/{n} "
                  f"({100 * r['counts']['colour'] / n:5.1f}%), shape {r['counts']['shape']:>3}/{n} "
                  f"({100 * r['counts']['shape'] / n:5.1f}%), both {r['counts']['both']:>3}; "
                  f"{time.perf_counter() - t0:.0f} s; wrong colours: {worst or '-'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
