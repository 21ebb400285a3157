"""``easygen demo eval``: how well the demo model sees and draws, on held-out images.

* captioning: ``easygen eval caption`` on a Karpathy-format file of held-out images (CIDEr etc.), and
  caption accuracy: the caption names the right colour and the right shape;
* VQA: ``easygen eval vqa`` on "What color is the shape?" / "What shape is it?" (VQA accuracy, which
  with ten identical reference answers is exact-match accuracy);
* image replies: the chat ``Assistant`` answers "Draw a {colour} {shape}." and the picture it draws is
  read back with ``world.analyse_image`` (dominant non-white colour nearest to the requested one; fill
  ratio of the shape's bounding box nearest to the requested shape's).
"""
from __future__ import annotations

import json
from pathlib import Path

from bidiffuser.checkpoint import write_json

from . import world
from .dataset import EVAL_CAPTION_PROMPT, write_eval_data
from .recipe import DemoModel

TARGETS = {"caption_accuracy": 90.0, "vqa_accuracy": 90.0, "image_colour_accuracy": 80.0,
           "image_shape_accuracy": 70.0}


def _eval_cli(*argv: str) -> dict:
    from ..cli import main
    from ..errors import EasyGenError
    from ..eval.metrics import java_available

    out = Path(argv[argv.index("--out") + 1])
    java = [] if argv[0] == "vqa" or java_available() else ["--no-java"]
    code = main(["eval", *argv, *java, "--quiet", "--device", "cpu"])
    if code:
        raise EasyGenError(f"`easygen eval {argv[0]}` failed (exit {code})")
    return json.loads(out.read_text())


def _predictions(results: dict) -> list[dict]:
    lines = Path(results["predictions"]).read_text().splitlines()
    return [r for r in map(json.loads, lines[1:]) if "id" in r]  # line 1 is the header


def evaluate(demo: DemoModel, out: str | Path, n_images: int = 120, draws: int = 4, seed: int = 2024) -> dict:
    """Run the three evaluations; write OUT/results.json and return the results."""
    out = Path(out)
    karpathy, questions, annotations, items = write_eval_data(out / "data", n_images, seed)
    truth = {str(i): (scene.colour, scene.shape) for i, (_, scene) in enumerate(items)}
    recipe = demo.recipe()
    # One feature cache: the VQA pass reuses the features the caption pass computed for the same images.
    model = ["--model-path", str(demo.easygen), "--feature-steps", str(recipe.feature_steps),
             "--feature-scale", str(recipe.feature_scale), "--feature-cache", str(out / "features")]

    caption = _eval_cli("caption", *model, "--karpathy", str(karpathy), "--image-root", str(out / "data"),
                        "--out", str(out / "caption.json"), "--prompt", EVAL_CAPTION_PROMPT, "--min-new-tokens", "1",
                        "--max-new-tokens", "16", "--predictions", str(out / "caption.predictions.jsonl"))
    preds = {p["id"]: p["caption"] for p in _predictions(caption)}
    right = sum(world.parse_description(preds[i]) == truth[i] for i in truth)
    vqa = _eval_cli("vqa", *model, "--questions", str(questions), "--annotations", str(annotations),
                    "--image-root", str(out / "data"), "--out", str(out / "vqa.json"),
                    "--predictions", str(out / "vqa.predictions.jsonl"))

    drawings = draw_requests(demo, out / "drawings", draws, recipe.image_steps, recipe.image_scale)
    results = {
        "model": str(demo.root), "held_out_images": n_images, "seed": seed,
        "caption_accuracy": 100 * right / len(truth),
        "cider": caption["metrics"]["CIDEr"], "caption_metrics": caption["metrics"],
        "vqa_accuracy": vqa["metrics"]["accuracy"],
        "vqa_by_type": vqa["per_answer_type"],
        "image_colour_accuracy": 100 * sum(d["colour_ok"] for d in drawings) / len(drawings),
        "image_shape_accuracy": 100 * sum(d["shape_ok"] for d in drawings) / len(drawings),
        "image_replies_with_a_picture": 100 * sum(d["picture"] is not None for d in drawings) / len(drawings),
        "drawings": drawings, "targets": TARGETS,
        "caption_examples": [{"truth": " ".join(truth[i]), "caption": preds[i]} for i in list(truth)[:8]],
    }
    write_json(out / "results.json", results)
    return results


def draw_requests(demo: DemoModel, out_dir: Path, draws: int, steps: int, scale: float) -> list[dict]:
    """Ask the chat assistant for ``draws`` pictures of every colour and shape; read each picture back."""
    from ..assistant import Assistant, GenerationSettings
    from ..builder import load_pretrained

    loaded = load_pretrained(demo.easygen, device="cpu")
    records = []
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            for k in range(draws):
                settings = GenerationSettings(temperature=0.0, max_new_tokens=32, seed=k, image_steps=steps,
                                              image_scale=scale)
                assistant = Assistant(loaded, settings, out_dir=out_dir / f"{colour}-{shape}-{k}")
                request = world.DRAW_REQUESTS[k % len(world.DRAW_REQUESTS)].format(colour=colour, shape=shape)
                reply = assistant.send(request)
                found = world.analyse_image(_open(reply.image_paths[0])) if reply.image_paths else None
                records.append({"request": request, "reply": reply.text,
                                "picture": str(reply.image_paths[0]) if reply.image_paths else None,
                                "colour": found.colour if found else None, "shape": found.shape if found else None,
                                "fill_ratio": round(found.fill_ratio, 3) if found else None,
                                "colour_ok": bool(found and found.colour == colour),
                                "shape_ok": bool(found and found.shape == shape)})
    return records


def _open(path):
    from PIL import Image
    with Image.open(path) as im:
        return im.convert("RGB")


def format_results(r: dict) -> str:
    rows = [("caption accuracy (colour and shape)", r["caption_accuracy"], TARGETS["caption_accuracy"]),
            ("VQA accuracy", r["vqa_accuracy"], TARGETS["vqa_accuracy"]),
            ("image replies: colour", r["image_colour_accuracy"], TARGETS["image_colour_accuracy"]),
            ("image replies: shape", r["image_shape_accuracy"], TARGETS["image_shape_accuracy"])]
    lines = [f"EasyGen shapes demo, {r['held_out_images']} held-out images (seed {r['seed']}), "
             f"{len(r['drawings'])} drawings"]
    lines += [f"  {name:<38} {value:6.1f}%   target >= {target:.0f}%  {'ok' if value >= target else 'MISSED'}"
              for name, value, target in rows]
    lines.append(f"  {'CIDEr (easygen eval caption)':<38} {r['cider']:6.1f}")
    return "\n".join(lines)
