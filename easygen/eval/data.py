"""Benchmark readers: COCO Karpathy captions and VQAv2 questions.

Accepted files:

- Karpathy ``dataset_coco.json``: ``{"images": [{"filepath", "filename", "cocoid", "split",
  "sentences": [{"raw"}]}]}`` (``filepath``/``cocoid`` optional, as in the Flickr variants);
- LAVIS ``coco_karpathy_test.json`` (a list of ``{"image": "val2014/COCO_val2014_<id>.jpg",
  "caption": [...]}``) with, optionally, ``coco_karpathy_test_gt.json`` (COCO caption format:
  ``{"annotations": [{"image_id", "caption"}]}``), the references LAVIS scores against;
- VQAv2 questions ``{"data_subtype", "questions": [{"image_id", "question", "question_id"}]}`` and
  annotations ``{"annotations": [{"question_id", "answers": [{"answer"}], "answer_type",
  "question_type"}]}``. A question may carry its own ``"image"`` path (relative to the image root);
  otherwise the official COCO name ``COCO_<data_subtype>_<image_id:012d>.jpg`` is looked up in
  the image root and in ``<image root>/<data_subtype>/``.

Every sample keeps ``where`` (file and entry) so a malformed entry or a missing image is reported
as one line naming both. Ids are strings: they key the prediction file and the scorers alike.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bidiffuser.checkpoint import read_json as _read_json
from bidiffuser.errors import BiDiffuserError
from easygen.json_fields import BadRow, json_field, json_list
from easygen.errors import EasyGenError


@dataclass(frozen=True)
class CaptionSample:
    id: str                        # COCO image id (Karpathy ``cocoid``)
    image: Path
    references: tuple[str, ...]    # the human captions, raw (the scorer tokenizes them)
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class VQASample:
    id: str                        # question id
    image: Path
    question: str
    answers: tuple[str, ...]       # the human answers (10 in VQAv2)
    answer_type: str = ""          # "yes/no", "number", "other"
    question_type: str = ""
    where: str = field(default="", compare=False)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """``bidiffuser.checkpoint.read_json``, with EasyGen's error type."""
    try:
        return _read_json(path, what)
    except BiDiffuserError as e:
        raise EasyGenError(str(e)) from None


def _get(entry: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    """``json_field`` with the problem as a one-line error at ``where``."""
    try:
        return json_field(entry, key, types)
    except BadRow as e:
        raise EasyGenError(f"{where}: {e}") from None


def _locate(root: Path, *candidates: str) -> Path:
    """The first candidate that exists under ``root``; the first one when none does (so the
    missing-image error names the path the user most likely meant)."""
    paths = [root / c for c in candidates]
    return next((p for p in paths if p.is_file()), paths[0])


def _unique(samples: list) -> list:
    """``samples``, after checking that no id is used twice (scores are keyed by id)."""
    seen: dict[str, str] = {}
    for s in samples:
        if s.id in seen:
            raise EasyGenError(f"{s.where}: id {s.id} already used by {seen[s.id]}")
        seen[s.id] = s.where
    return samples


# ---------------------------------------------------------------------------------------- captions
def read_captions(path: str | os.PathLike, image_root: str | os.PathLike, split: str | None = None,
                  gt: str | os.PathLike | None = None) -> tuple[str, list[CaptionSample]]:
    """("karpathy", the images of ``split``) from a Karpathy ``dataset_coco.json``, or ("lavis",
    every entry) from a LAVIS annotation list (one split already; ``gt`` gives the references).
    ``split`` defaults to "test"."""
    path = Path(path)
    doc = read_json(path, "caption annotations")
    if isinstance(doc, list):
        if split is not None:
            raise EasyGenError(f"--split applies to dataset_coco.json; {path} is a LAVIS file (one split already)")
        return "lavis", read_lavis(path, image_root, gt, doc)
    if gt is not None:
        raise EasyGenError(f"--gt goes with a LAVIS annotation list; {path} is a Karpathy dataset file")
    return "karpathy", read_karpathy(path, image_root, split or "test", doc)


def read_karpathy(path: str | os.PathLike, image_root: str | os.PathLike, split: str = "test",
                  doc: Any = None) -> list[CaptionSample]:
    """The images of ``split`` in a Karpathy dataset file (``doc``: its parsed JSON, if already read)."""
    path, root = Path(path), Path(image_root)
    images = json_list(read_json(path, "Karpathy dataset") if doc is None else doc, "images", path)
    samples, splits = [], set()
    for i, entry in enumerate(images):
        where = f"{path.name} images[{i}]"
        entry_split = _get(entry, "split", str, where)
        splits.add(entry_split)
        if entry_split != split:
            continue
        filename = _get(entry, "filename", str, where)
        sentences = _get(entry, "sentences", list, where)
        refs = tuple(_get(s, "raw", str, f"{where} sentences[{j}]") for j, s in enumerate(sentences))
        if not refs:
            raise EasyGenError(f"{where}: no reference sentences")
        image_id = entry.get("cocoid", entry.get("imgid", Path(filename).stem))
        # filepath (val2014/...) may be absent (Flickr) or already part of --image-root.
        rel = [f"{entry['filepath']}/{filename}", filename] if entry.get("filepath") else [filename]
        samples.append(CaptionSample(str(image_id), _locate(root, *rel), refs, where))
    if not samples:
        present = ", ".join(sorted(splits)) or "none"
        raise EasyGenError(f"{path}: no images in split '{split}' (splits present: {present})")
    return _unique(samples)


def lavis_image_id(image: str) -> str:
    """LAVIS's image id: the number ending the file name (``.../COCO_val2014_000000391895.jpg`` ->
    ``391895``), or the bare stem for names that do not end in a number."""
    stem = Path(image).stem
    tail = stem.rsplit("_", 1)[-1]
    return str(int(tail)) if tail.isdigit() else stem


def read_lavis(path: str | os.PathLike, image_root: str | os.PathLike, gt: str | os.PathLike | None = None,
               doc: Any = None) -> list[CaptionSample]:
    """Every entry of a LAVIS annotation list, with the references of ``gt`` when given (what LAVIS
    scores against), else each entry's own captions."""
    path, root = Path(path), Path(image_root)
    entries = read_json(path, "LAVIS annotations") if doc is None else doc
    if not isinstance(entries, list):
        raise EasyGenError(f"{path}: expected a JSON list of {{'image', 'caption'}} entries")
    refs_by_id: dict[str, list[str]] | None = None
    if gt is not None:
        gt = Path(gt)
        refs_by_id = {}
        for j, ann in enumerate(json_list(read_json(gt, "LAVIS ground truth"), "annotations", gt)):
            where = f"{gt.name} annotations[{j}]"
            image_id = _get(ann, "image_id", (int, str), where)
            refs_by_id.setdefault(str(image_id), []).append(_get(ann, "caption", str, where))
    samples = []
    for i, entry in enumerate(entries):
        where = f"{path.name} [{i}]"
        image = _get(entry, "image", str, where)
        image_id = lavis_image_id(image)
        if refs_by_id is not None:
            if image_id not in refs_by_id:
                raise EasyGenError(f"{where}: image id {image_id} (from {image}) has no caption in {gt}")
            refs = tuple(refs_by_id[image_id])
        else:
            caption = _get(entry, "caption", (list, str), where)
            refs = tuple([caption] if isinstance(caption, str) else caption)
            if not refs or not all(isinstance(c, str) for c in refs):
                raise EasyGenError(f"{where}: 'caption' should be a non-empty list of strings")
        samples.append(CaptionSample(image_id, _locate(root, image), refs, where))
    if not samples:
        raise EasyGenError(f"{path}: no entries")
    return _unique(samples)


# ---------------------------------------------------------------------------------------- VQA
def read_vqa(questions: str | os.PathLike, annotations: str | os.PathLike,
             image_root: str | os.PathLike) -> list[VQASample]:
    """VQAv2 questions joined with their annotations (every question must have one)."""
    qpath, apath, root = Path(questions), Path(annotations), Path(image_root)
    qdoc = read_json(qpath, "VQA questions")
    qs = json_list(qdoc, "questions", qpath)
    adoc = read_json(apath, "VQA annotations")
    anns: dict[str, tuple[dict, str]] = {}
    for j, ann in enumerate(json_list(adoc, "annotations", apath)):
        where = f"{apath.name} annotations[{j}]"
        anns[str(_get(ann, "question_id", (int, str), where))] = (ann, where)
    subtype = qdoc.get("data_subtype") or (adoc.get("data_subtype") if isinstance(adoc, dict) else None)

    samples = []
    for i, q in enumerate(qs):
        where = f"{qpath.name} questions[{i}]"
        qid = str(_get(q, "question_id", (int, str), where))
        question = _get(q, "question", str, where)
        if "image" in q:
            image = _locate(root, _get(q, "image", str, where))
        elif subtype:
            image_id = _get(q, "image_id", int, where)
            name = f"COCO_{subtype}_{image_id:012d}.jpg"
            image = _locate(root, name, f"{subtype}/{name}")
        else:
            raise EasyGenError(f"{where}: no 'image' path, and {qpath.name} has no 'data_subtype' "
                               "to name the COCO image file")
        if qid not in anns:
            raise EasyGenError(f"{where}: question_id {qid} has no annotation in {apath}")
        ann, awhere = anns[qid]
        answers = tuple(_get(a, "answer", str, f"{awhere} answers[{k}]")
                        for k, a in enumerate(_get(ann, "answers", list, awhere)))
        if not answers:
            raise EasyGenError(f"{awhere}: no answers")
        samples.append(VQASample(qid, image, question, answers, str(ann.get("answer_type", "")),
                                 str(ann.get("question_type", "")), where))
    if not samples:
        raise EasyGenError(f"{qpath}: no questions")
    return _unique(samples)


def check_images(samples: Sequence[CaptionSample | VQASample], image_root: str | os.PathLike) -> None:
    """Fail before any model work if an image is missing (reporting how many, and the first)."""
    missing = [s for s in samples if not s.image.is_file()]
    if missing:
        first = missing[0]
        raise EasyGenError(f"{len(missing)} of {len(samples)} images not found under --image-root "
                           f"{image_root}; first: {first.image} ({first.where})")
