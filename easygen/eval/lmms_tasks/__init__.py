"""Local lmms-eval tasks that run offline: task folders (``TASKS_DIR/<task>/<task>.yaml``) and the
parquet data they read, written in the schema of the benchmark whose lmms-eval functions score them.

``shapes_vqa``: the held-out VQA questions of ``easygen demo eval`` (``demo.dataset.write_eval_data``,
same images, same seed), as rows of lmms-lab's VQAv2 schema with each image embedded the way the HF
datasets ``Image`` feature stores it (PNG bytes + path). Through lmms-eval's VQAv2 functions it
gives the accuracy of ``easygen demo eval``'s VQA row.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent


def vqav2_features():
    """lmms-lab/VQAv2's columns (the dataset lmms-eval's vqav2 tasks read)."""
    from datasets import Features, Image, List, Value

    answer = {"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}
    return Features({"question_type": Value("string"), "multiple_choice_answer": Value("string"),
                     "answers": List(answer), "image_id": Value("int64"), "answer_type": Value("string"),
                     "question_id": Value("int64"), "question": Value("string"), "image": Image()})


def write_parquet(rows: list[dict], features, path: str | Path) -> Path:
    """``rows`` as one parquet file whose schema carries the HF ``features`` (images decode as PIL)."""
    from datasets import Dataset

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def shapes_vqa_rows(root: Path, n_images: int, seed: int) -> list[dict]:
    """VQAv2 rows of ``easygen demo eval``'s questions, from the files ``write_eval_data`` writes."""
    from ...demo.dataset import write_eval_data

    _, questions, annotations, _ = write_eval_data(root, n_images, seed)
    answers = {a["question_id"]: a for a in json.loads(annotations.read_text())["annotations"]}
    rows = []
    for q in json.loads(questions.read_text())["questions"]:
        a = answers[q["question_id"]]
        rows.append({"question_type": a["question_type"], "multiple_choice_answer": a["answers"][0]["answer"],
                     "answers": [{"answer_confidence": "yes", **h} for h in a["answers"]],
                     "image_id": int(Path(q["image"]).stem), "answer_type": a["answer_type"],
                     "question_id": q["question_id"], "question": q["question"],
                     "image": {"bytes": (root / q["image"]).read_bytes(), "path": q["image"]}})
    return rows


def write_shapes_vqa(out: str | Path, n_images: int = 120, seed: int = 2024) -> Path:
    """OUT/shapes_vqa/: the task's YAML and its parquet. Returns the task folder."""
    folder = Path(out) / "shapes_vqa"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TASKS_DIR / "shapes_vqa" / "shapes_vqa.yaml", folder / "shapes_vqa.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        write_parquet(shapes_vqa_rows(Path(tmp), n_images, seed), vqav2_features(), folder / "shapes_vqa.parquet")
    return folder
