"""Do two LLM engines give the same greedy tokens? Checked on the demo's own kinds of prompt.

Three kinds of case, from seeds the recipe never trained on: questions about one uploaded picture,
draw requests, and every turn of scripted conversations (several pictures, uploaded and drawn). A
conversation is played with the reference engine; at each turn both engines answer the very same
prompt (same history, same image features), so one differing turn cannot change the turns after it.
"""
from __future__ import annotations

import random
from pathlib import Path

from . import world
from .conversations import random_script
from .recipe import FEATURE_SEED

PARITY_SEED = 31  # scenes and scripts: not the training seed (0) nor the evals' (7, 2024, 2025)


def _settings(recipe, seed: int):
    from ..assistant import GenerationSettings
    return GenerationSettings(temperature=0.0, max_new_tokens=48, seed=seed, image_steps=recipe.image_steps,
                              image_scale=recipe.image_scale)


def _check(assistant, other, text: str, images=(), kind: str = "") -> dict:
    """One turn answered by both engines from the same prepared prompt; the reference's answer is
    then committed (pictures drawn), so the conversation goes on from it."""
    from ..generation import Row

    turn = assistant.prepare(text, images)
    twin = Row(list(turn.ids), turn.features, turn.row.max_new_tokens)
    s = assistant.settings
    assistant.llm.generate([turn.row], s.temperature, s.top_p, 1, s.seed)
    other.generate([twin], s.temperature, s.top_p, 1, s.seed)
    reply = assistant.complete(turn)
    return {"kind": kind, "text": text, "pictures": assistant.processor.count_images(turn.ids),
            "prompt_tokens": len(turn.ids),
            "equal": twin.tokens == turn.row.tokens and twin.finish_reason == turn.row.finish_reason,
            "reference": reply.text, "tokens": turn.row.tokens, "other_tokens": twin.tokens}


def engine_parity(loaded, recipe, other, out_dir: str | Path, questions: int = 80, draws: int = 40,
                  turns: int = 80, seed: int = PARITY_SEED) -> list[dict]:
    """Cases answered by ``loaded.llm`` (the reference) and by ``other``; one record per case."""
    from ..assistant import Assistant
    from ..features import ImageFeatureExtractor

    out_dir = Path(out_dir)
    rng = random.Random(seed)
    features = ImageFeatureExtractor(loaded.bidiffuser, steps=recipe.feature_steps, scale=recipe.feature_scale,
                                     seed=FEATURE_SEED)
    memo, records = {}, []

    def assistant(k: int, folder: Path) -> Assistant:
        folder.mkdir(parents=True, exist_ok=True)
        return Assistant(loaded, _settings(recipe, k), out_dir=folder, features=features, feature_memo=memo)

    asks = [q for q, _ in world.vqa_pairs(world.random_scene(rng))] + ["What is in the picture?", "Describe the image."]
    for k in range(questions):
        path = out_dir / "questions" / f"{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        world.draw(world.random_scene(rng)).save(path)
        records.append(_check(assistant(k, out_dir / "questions"), other, asks[k % len(asks)], [path], "question"))
    combos = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    for k in range(draws):
        colour, shape = combos[k % len(combos)]
        request = world.DRAW_REQUESTS[k % len(world.DRAW_REQUESTS)].format(colour=colour, shape=shape)
        records.append(_check(assistant(k, out_dir / "draws" / f"{k:03d}"), other, request, (), "draw"))
    played, c = 0, 0
    while played < turns:
        folder = out_dir / "conversations" / f"{c:03d}"
        a = assistant(c, folder)
        for t, turn in enumerate(random_script(rng)):
            if played >= turns:
                break
            uploads = []
            for j, scene in enumerate(turn.uploads):
                path = folder / f"upload-{t}-{j}.png"
                world.draw(scene).save(path)
                uploads.append(path)
            records.append(_check(a, other, turn.text, uploads, f"conversation:{turn.kind}"))
            played += 1
        c += 1
    return records


def parity_table(records: list[dict]) -> str:
    """Equal / all per kind of case, and in total."""
    groups = {"image questions": [r for r in records if r["kind"] == "question"],
              "draw requests": [r for r in records if r["kind"] == "draw"],
              "conversation turns": [r for r in records if r["kind"].startswith("conversation")]}
    groups["turns with 2+ pictures in the prompt"] = [r for r in groups["conversation turns"] if r["pictures"] >= 2]
    lines = ["| cases | equal greedy tokens |", "|---|---|"]
    for name, rows in groups.items():
        lines.append(f"| {name} | {sum(r['equal'] for r in rows)}/{len(rows)} |")
    lines.append(f"| **all** | **{sum(r['equal'] for r in records)}/{len(records)}** |")
    return "\n".join(lines)
