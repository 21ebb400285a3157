"""Where the shapes demo's drawings go wrong: BiDiffuser alone (no LLM) draws every colour and shape
from its canonical caption under each sampling setting, reads each picture back with
``world.analyse_image``, and prints colour / shape counts per setting and the colour confusions
(asked -> read). Also the VAE's colour round trip on the pictures the assistant should draw.

    python benchmarks/demo_draw.py --model easygen/demo/model/bidiffuser --scales 0,0.2,0.5 --steps 20,50

Every drawing has a seed of its own, from 1000 (``--seed``) on, away from the eval's, so a setting
chosen here is checked on other samples by ``easygen demo eval``.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path

import torch

from bidiffuser.model_dir import read_config
from bidiffuser.pipeline import BiDiffuser
from easygen.demo import world


def draw_grid(pipe: BiDiffuser, steps: int, scale: float, samples: int, seed: int, caption: str) -> dict:
    counts, confusion = collections.Counter(), collections.Counter()
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            prompt = caption.format(colour=colour, shape=shape)
            for k in range(samples):  # a seed of its own per drawing: one noise shared by all would be one sample
                found = world.analyse_image(pipe.text_to_image(prompt, steps=steps, scale=scale,
                                                               seed=seed + counts["total"]).images[0])
                counts["colour"] += found.colour == colour
                counts["shape"] += found.shape == shape
                counts["both"] += (found.colour, found.shape) == (colour, shape)
                counts["total"] += 1
                if found.colour != colour:
                    confusion[f"{colour}->{found.colour}"] += 1
    return {"counts": counts, "confusion": confusion}


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
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--caption", default="a {colour} {shape}", help="the text drawn (default: the <Img> description)")
    p.add_argument("--vae", type=int, default=200, help="VAE round trips (0: skip)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    pipe = BiDiffuser(read_config(args.model), device=torch.device("cpu"))
    if args.vae:
        c, s = vae_round_trip(pipe, args.vae, args.seed)
        print(f"VAE round trip of {args.vae} drawings: colour {c} ({100 * c / args.vae:.1f}%), shape {s}")
    for steps in map(int, args.steps.split(",")):
        for scale in map(float, args.scales.split(",")):
            t0 = time.perf_counter()
            r = draw_grid(pipe, steps, scale, args.samples, args.seed, args.caption)
            n = r["counts"]["total"]
            worst = ", ".join(f"{k} {v}" for k, v in r["confusion"].most_common(4))
            print(f"steps {steps:>3} scale {scale:<4}: colour {r['counts']['colour']:>3}/{n} "
                  f"({100 * r['counts']['colour'] / n:5.1f}%), shape {r['counts']['shape']:>3}/{n} "
                  f"({100 * r['counts']['shape'] / n:5.1f}%), both {r['counts']['both']:>3}; "
                  f"{time.perf_counter() - t0:.0f} s; wrong colours: {worst or '-'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
