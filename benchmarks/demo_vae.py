"""The shapes demo's VAE: training steps against what survives a round trip.

Trains a fresh demo-size VAE (the recipe's own init and training stages) for each ``--steps`` value
on a built demo's training images, then encodes and decodes held-out ground-truth images and
reads each one back with ``world.analyse_image``: a drawing can be no better than the VAE's
reconstructions. Prints seconds and colour / shape counts per step count.

    python benchmarks/demo_vae.py --demo ~/.cache/easygen/demo-shapes-v4 --steps 300 500 1000
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from bidiffuser.model_dir import read_config
from bidiffuser.pipeline import BiDiffuser
from easygen.demo import recipe as demo_recipe
from easygen.demo import world


def round_trip_readback(model: Path, n: int, seed: int) -> tuple[int, int]:
    pipe = BiDiffuser(read_config(model), device=torch.device("cpu"))
    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    colour = shape = 0
    for i in range(0, n, 50):
        batch = scenes[i:i + 50]
        mean, _, _ = pipe.encode_image_posteriors([world.draw(s) for s in batch])
        for scene, image in zip(batch, pipe.decode_images(mean)):
            found = world.analyse_image(image)
            colour += found.colour == scene.colour
            shape += found.shape == scene.shape
    return colour, shape


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, required=True, help="a built demo directory (its training images)")
    p.add_argument("--steps", type=int, nargs="+", default=[300, 500, 1000])
    p.add_argument("--images", type=int, default=200, help="held-out ground-truth images (seed 2024)")
    args = p.parse_args(argv)
    built = json.loads((args.demo / "demo.json").read_text())["recipe"]
    for steps in args.steps:
        r = dataclasses.replace(demo_recipe.Recipe(**built), vae_steps=steps)
        root = Path(tempfile.mkdtemp(prefix="demo-vae-"))
        (root / "data").symlink_to((args.demo / "data").resolve())
        demo_recipe._stage_bidiffuser_init(root, r, print)
        t0 = time.perf_counter()
        demo_recipe._stage_autoencoder(root, r, lambda line: None)
        seconds = time.perf_counter() - t0
        colour, shape = round_trip_readback(root / "bidiffuser-init", args.images, 2024)
        print(json.dumps({"vae_steps": steps, "seconds": round(seconds, 1), "images": args.images,
                          "colour_ok": colour, "shape_ok": shape}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
