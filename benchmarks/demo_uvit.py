"""The shapes demo's U-ViT recipe: training time against drawing quality.

Trains the demo's two U-ViT stages (UniDiffuser warm-up, then the EasyGen objective) with the
given recipe changes, starting from a built demo's trained CLIP, VAE and caption decoder and its
training data, then draws every colour and shape ``--samples`` times (the recipe's drawing
settings) and reads each picture back with ``world.analyse_image``. Prints seconds per stage and
colour / shape counts. The LLM is not involved: this isolates what drawing costs.

    python benchmarks/demo_uvit.py --demo ~/.cache/easygen/demo-shapes-v4 --set easygen_steps=2000 --set uvit_width=96
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bidiffuser.model_dir import read_config
from bidiffuser.pipeline import BiDiffuser
from easygen.demo import recipe as demo_recipe
from easygen.demo import world


def _value(field: dataclasses.Field, text: str):
    kind = field.type if isinstance(field.type, type) else type(field.default)
    return None if text == "none" else kind(text)


def fresh_init(demo: Path, root: Path, r: demo_recipe.Recipe) -> None:
    """``root/bidiffuser-init``: the demo's trained CLIP, VAE and caption decoder with a random U-ViT of
    the recipe's size (written by the recipe's own init stage, then given the trained components)."""
    demo_recipe._stage_bidiffuser_init(root, r, print)
    for name in ("autoencoder_kl.pth", "caption_decoder.pth", "clip_image", "clip_text", "gpt2_tokenizer"):
        target = root / "bidiffuser-init" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        source = demo / "bidiffuser-init" / name
        shutil.copytree(source, target) if source.is_dir() else shutil.copy2(source, target)
    fresh = json.loads((root / "bidiffuser-init" / "bidiffuser.json").read_text())
    config = json.loads((demo / "bidiffuser-init" / "bidiffuser.json").read_text())
    config["uvit"] = fresh["uvit"]  # everything else (VAE scale factor, vocabulary) as trained
    (root / "bidiffuser-init" / "bidiffuser.json").write_text(json.dumps(config, indent=1))


def draw_all(model: Path, r: demo_recipe.Recipe, samples: int) -> tuple[int, int, int]:
    pipe = BiDiffuser(read_config(model), device=torch.device("cpu"))
    colour_ok = shape_ok = total = 0
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            for k in range(samples):
                image = pipe.text_to_image(f"a {colour} {shape}", steps=r.image_steps, scale=r.image_scale,
                                           seed=k).images[0]
                found = world.analyse_image(image)
                colour_ok += found.colour == colour
                shape_ok += found.shape == shape
                total += 1
    return colour_ok, shape_ok, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, required=True, help="a built demo directory (its data and trained encoders)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="recipe change (repeatable)")
    p.add_argument("--samples", type=int, default=4, help="drawings per colour and shape (default 4: 72)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the trained U-ViT here (default: a temp dir)")
    args = p.parse_args(argv)

    fields = {f.name: f for f in dataclasses.fields(demo_recipe.Recipe)}
    changes = {}
    for item in args.set:
        name, _, text = item.partition("=")
        if name not in fields:
            p.error(f"unknown recipe field {name!r}")
        changes[name] = _value(fields[name], text)
    built = json.loads((args.demo / "demo.json").read_text())["recipe"]
    r = dataclasses.replace(demo_recipe.Recipe(**built), **changes)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="demo-uvit-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").unlink(missing_ok=True)
    (root / "data").symlink_to((args.demo / "data").resolve())
    fresh_init(args.demo, root, r)
    seconds = {}
    for name, run in (("unidiffuser", demo_recipe._stage_unidiffuser),
                      ("easygen-objective", demo_recipe._stage_easygen_objective)):
        t0 = time.perf_counter()
        run(root, r, print)
        seconds[name] = round(time.perf_counter() - t0, 1)
    colour, shape, total = draw_all(root / "bidiffuser", r, args.samples)
    result = {"changes": changes, "seconds": seconds, "drawings": total, "colour_ok": colour, "shape_ok": shape}
    print(json.dumps(result))
    print(f"U-ViT {r.uvit_width}x{r.uvit_depth}, {r.unidiffuser_steps}+{r.easygen_steps} steps (batch {r.uvit_batch}): "
          f"{sum(seconds.values()):.0f} s; colour {colour}/{total} ({100 * colour / total:.1f}%), "
          f"shape {shape}/{total} ({100 * shape / total:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
