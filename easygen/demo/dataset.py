"""Shapes-world data on disk, in the formats the normal commands read.

``write_training_data`` writes, under one folder:

    images/00000.png ...     the training images (``world.draw`` of seeded random scenes)
    captions.tsv             image<TAB>caption, two paraphrases per image: BiDiffuser training, stage 1
    drawings/00000.png ...   pictures as the assistant should draw them (``world.drawing_scene``)
    draw_captions.tsv        their captions: the text-to-image term of the U-ViT's training
    instruct.json            LLaVA conversations: captions, colour and shape questions (stage 2)
    draw.json                LLaVA conversations without images: draw requests answered with <Img>...</Img>
    conversations.json       LLaVA conversations of 2 to 6 turns (``conversations.random_script``): several
                             images, follow-ups, drawings and questions about them (stage 2)
    pretrain_data.json       data config of stage 1 (see easygen/data/mixture.py)
    instruct_data.json       data config of stage 2

``write_eval_data`` writes held-out images with a Karpathy-format ``dataset_coco.json`` (captioning)
and VQAv2-format question/annotation files, which ``easygen eval`` reads as it reads COCO.
"""
from __future__ import annotations

import random
from pathlib import Path

from bidiffuser.checkpoint import atomic_path, write_json

from fastchat_ext.conversation import user_message

from ..eval.prompts import PROMPT_STYLES
from . import world
from .conversations import ScriptTurn, random_script
from .world import Scene

# The evaluation prompts of `easygen eval` (both --prompt-style choices) are among the training prompts,
# so the demo model answers them the way the benchmark asks.
EVAL_CAPTION_PROMPTS = tuple(style.caption for style in PROMPT_STYLES.values())
VQA_TEMPLATES = ("{question}",) + tuple(style.vqa for style in PROMPT_STYLES.values())


def write_images(root: Path, n: int, seed: int) -> list[tuple[str, Scene]]:
    """``n`` seeded random scenes drawn to root/images/NNNNN.png; returns (relative path, scene)."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        scene = world.random_scene(rng)
        rel = f"images/{i:05d}.png"
        world.draw(scene).save(root / rel)
        out.append((rel, scene))
    return out


def _turn(who: str, value: str) -> dict:
    return {"from": who, "value": value}


def _human(text: str, num_images: int) -> dict:
    """A user turn as the chat writes it (images first, "<Img>...</Img> question"), so training and
    chat tokenize it the same way."""
    return _turn("human", user_message(text, num_images))


def llava_conversation(example_id: str, script: list[ScriptTurn], upload_paths: list[list[str]],
                       drawn_path) -> dict:
    """A script as one LLaVA entry. ``upload_paths[i]`` are turn i's uploads as files; a drawing is
    shown as ``drawn_path(colour, shape)``, placed before the next turn's uploads, as the chat
    ``Assistant`` shows the pictures it drew to the model in the next user turn."""
    images, turns, pending = [], [], []
    for turn, uploads in zip(script, upload_paths):
        shown = pending + list(uploads)
        images += shown
        turns += [_human(turn.text, len(shown)), _turn("gpt", turn.answer)]
        pending = [drawn_path(*turn.target)] if turn.draws else []
    return {"id": example_id, "image": images, "conversations": turns}


def write_drawings(root: Path, n: int, seed: int) -> dict[tuple[str, str], list[str]]:
    """``n`` pictures as the assistant should draw them, every colour and shape in turn, to
    root/drawings/NNNNN.png, with draw_captions.tsv (two paraphrases each); returns the relative
    paths by (colour, shape)."""
    rng = random.Random(seed)
    (root / "drawings").mkdir(parents=True, exist_ok=True)
    kinds = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    by_kind: dict[tuple[str, str], list[str]] = {}
    tsv = ["image\tcaption"]
    for i in range(n):
        colour, shape = kinds[i % len(kinds)]
        rel = f"drawings/{i:05d}.png"
        world.draw(world.drawing_scene(rng, colour, shape)).save(root / rel)
        by_kind.setdefault((colour, shape), []).append(rel)
        tsv += [f"{rel}\t{c}" for c in rng.sample(world.captions(colour, shape), 2)]
    with atomic_path(root / "draw_captions.tsv") as tmp:
        tmp.write_text("\n".join(tsv) + "\n")
    return by_kind


def write_bridge_captions(root: Path, seed: int) -> Path:
    """root/bridge_captions.tsv: every drawing of draw_captions.tsv with its canonical caption first
    ("a red circle": what stage A's ``distill_teacher="first"`` has CLIP read for all of the image's
    rows), its two captions and two long descriptions (``world.LONG_TRAIN``): the LLM bridge's data."""
    rng = random.Random(seed)
    by_image: dict[str, list[str]] = {}
    for row in (root / "draw_captions.tsv").read_text().splitlines()[1:]:
        image, caption = row.split("\t")
        by_image.setdefault(image, []).append(caption)
    lines = ["image\tcaption"]
    for image, texts in by_image.items():
        colour, shape = world.parse_description(texts[0])
        long = [t.format(colour=colour, shape=shape) for t in rng.sample(world.LONG_TRAIN, 2)]
        canonical = world.captions(colour, shape)[0]
        lines += [f"{image}\t{t}" for t in dict.fromkeys([canonical, *texts, *long])]
    path = root / "bridge_captions.tsv"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def write_conversations(items: list[tuple[str, Scene]], drawings: dict[tuple[str, str], list[str]], n: int,
                        seed: int, earlier_per_picture: int = 0) -> list[dict]:
    """``n`` scripted conversations: uploads drawn at random from the images ``items``, a drawing shown
    as one of ``drawings`` of the scene asked for."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        picked: list[str] = []

        def upload(r: random.Random) -> Scene:
            rel, scene = r.choice(items)
            picked.append(rel)
            return scene

        script = random_script(rng, upload, earlier_per_picture=earlier_per_picture)
        queue = iter(picked)
        uploads = [[next(queue) for _ in turn.uploads] for turn in script]
        out.append(llava_conversation(f"conversation:{k}", script, uploads,
                                      lambda colour, shape: rng.choice(drawings[(colour, shape)])))
    return out


def write_training_data(root: str | Path, n_images: int, seed: int = 0, draw_copies: int = 20,
                        n_conversations: int = 4000, conversation_weight: float = 1.0,
                        n_drawings: int = 540, earlier_per_picture: int = 0) -> dict[str, Path]:
    """The training files (see the module docstring); returns their paths by name."""
    root = Path(root)
    items = write_images(root, n_images, seed)
    rng = random.Random(seed + 1)
    tsv = ["image\tcaption"]
    instruct = []
    for rel, scene in items:
        paraphrases = world.captions(scene.colour, scene.shape)
        tsv += [f"{rel}\t{c}" for c in rng.sample(paraphrases, 2)]
        # Captions are answered with the canonical caption: one right answer makes greedy decoding reliable.
        prompt = rng.choice(world.CAPTION_PROMPTS + EVAL_CAPTION_PROMPTS)
        instruct.append({"id": f"{rel}:caption", "image": rel,
                         "conversations": [_human(prompt, 1), _turn("gpt", scene.caption)]})
        n_colour = len(world.COLOUR_QUESTIONS)
        for kind, (question, answer) in (("colour", rng.choice(world.vqa_pairs(scene)[:n_colour])),
                                         ("shape", rng.choice(world.vqa_pairs(scene)[n_colour:]))):
            asked = rng.choice(VQA_TEMPLATES).format(question=question)
            instruct.append({"id": f"{rel}:{kind}", "image": rel,
                             "conversations": [_human(asked, 1), _turn("gpt", answer)]})
    draw = [{"id": f"draw:{colour}:{shape}:{k}",
             "conversations": [_turn("human", request.format(colour=colour, shape=shape)),
                               _turn("gpt", world.draw_reply(colour, shape))]}
            for colour in world.COLOURS for shape in world.SHAPES
            for k, request in enumerate(world.DRAW_REQUESTS)]
    drawings = write_drawings(root, n_drawings, seed + 3)
    conversations = write_conversations(items, drawings, n_conversations, seed + 2, earlier_per_picture)
    paths = {name: root / name for name in ("captions.tsv", "draw_captions.tsv", "instruct.json", "draw.json",
                                            "conversations.json", "pretrain_data.json", "instruct_data.json")}
    with atomic_path(paths["captions.tsv"]) as tmp:
        tmp.write_text("\n".join(tsv) + "\n")
    write_json(paths["instruct.json"], instruct)
    write_json(paths["draw.json"], draw)
    write_json(paths["conversations.json"], conversations)
    write_json(paths["pretrain_data.json"], {"seed": seed, "datasets": [
        {"name": "shapes_captions", "format": "tsv", "path": "captions.tsv"}]})
    # draw.json is small (one request per phrasing, colour and shape): repeated so single-message draw
    # requests stay a fair share of stage 2.
    write_json(paths["instruct_data.json"], {"seed": seed, "datasets": [
        {"name": "shapes_instruct", "format": "llava", "path": "instruct.json"},
        {"name": "shapes_draw", "format": "llava", "path": "draw.json", "weight": float(draw_copies)},
        {"name": "shapes_conversations", "format": "llava", "path": "conversations.json",
         "weight": float(conversation_weight)}]})
    return paths


def write_eval_data(root: str | Path, n_images: int, seed: int) -> tuple[Path, Path, Path, list[tuple[str, Scene]]]:
    """Held-out images + (dataset_coco.json, questions.json, annotations.json, [(relative path, scene)])."""
    root = Path(root)
    items = write_images(root, n_images, seed)
    karpathy = {"dataset": "shapes", "images": [
        {"filename": rel, "split": "test", "imgid": i,
         "sentences": [{"raw": c} for c in world.captions(s.colour, s.shape)]}
        for i, (rel, s) in enumerate(items)]}
    questions, annotations = [], []
    for i, (rel, scene) in enumerate(items):
        for kind, question, answer in (("color", world.COLOUR_QUESTIONS[0], scene.colour),
                                       ("shape", world.SHAPE_QUESTIONS[0], scene.shape)):
            qid = 2 * i + (kind == "shape")
            questions.append({"question_id": qid, "image": rel, "question": question})
            annotations.append({"question_id": qid, "answer_type": kind, "question_type": kind,
                                "answers": [{"answer": answer, "answer_id": k + 1} for k in range(10)]})
    paths = root / "dataset_coco.json", root / "questions.json", root / "annotations.json"
    write_json(paths[0], karpathy)
    write_json(paths[1], {"questions": questions})
    write_json(paths[2], {"annotations": annotations})
    return (*paths, items)
