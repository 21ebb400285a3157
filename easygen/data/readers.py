"""Readers of training data files, each giving a list of examples in one format.

An example is a conversation about images::

    {"id": str, "images": [absolute image path, ...],
     "messages": [{"role": "user", "content": str, "num_images": int},
                  {"role": "assistant", "content": str}, ...],
     "source": "file:line" or "file [entry]"}

``messages`` is what ``EasyGenProcessor.tokenize_conversation`` takes: a user turn's images go
where its content marks them (``<image>`` / ``<ImageHere>``), else first (``user_message``).
A caption becomes one exchange: a brief-description prompt and the caption as the answer.

Malformed rows go to a ``BadRows``: by default an error naming the file and line (TSV) or entry
(JSON); with ``skip=True`` they are counted and left out. Image files are not opened here.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bidiffuser.captions import iter_caption_tsv
from bidiffuser.errors import BiDiffuserError
from easygen.constants import IMAGE_PLACEHOLDER, IMG_CLOSE, IMG_OPEN
from easygen.json_fields import BadRow, json_field, json_list
from easygen.errors import EasyGenError
from easygen.eval.data import read_json, read_karpathy
from easygen.eval.prompts import DESCRIBE_INSTRUCTIONS
from fastchat_ext.conversation import user_message

# Caption data gets one of the original EasyGen's brief-description instructions, chosen from the
# example's id, so the choice is the same in every run and on every rank.
CAPTION_PROMPTS = DESCRIBE_INSTRUCTIONS

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class BadRows:
    """Where malformed rows go: an EasyGenError (default), or, with ``skip``, a count."""
    skip: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)  # the first few, for the report

    def add(self, where: str, problem: str) -> None:
        if not self.skip:
            raise EasyGenError(f"{where}: {problem}")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {problem}")


def caption_prompt(example_id: str) -> str:
    digest = hashlib.sha256(example_id.encode()).digest()
    return CAPTION_PROMPTS[int.from_bytes(digest[:4], "big") % len(CAPTION_PROMPTS)]


def caption_example(example_id: str, image: Path, caption: str, source: str) -> dict:
    """A one-exchange conversation: a brief-description prompt about ``image``, ``caption`` the answer."""
    return {"id": example_id, "images": [os.path.abspath(image)],
            "messages": [{"role": "user", "content": caption_prompt(example_id), "num_images": 1},
                         {"role": "assistant", "content": caption.strip()}],
            "source": source, "caption": caption.strip()}


def caption_text_example(example: dict) -> dict:
    """A caption example whose image features come from the caption's own text (CLIP text encoder,
    then the caption decoder's prefix), as the original EasyGen's stage 1 adds them: the LLM learns
    to read BiDiffuser's text space from both sides."""
    return {**example, "id": f"{example['id']}#text", "images": [], "feature_texts": [example["caption"]]}


def _resolve(root: Path, image: Any) -> Path:
    if not isinstance(image, str) or not image.strip():
        raise BadRow(f"image path should be a non-empty string, got {image!r}")
    return root / image.strip()  # an absolute path stays itself


def _root(path: Path, image_root: str | os.PathLike | None) -> Path:
    """Relative image paths resolve against ``image_root``, by default the data file's folder."""
    return Path(image_root) if image_root is not None else path.parent


# ------------------------------------------------------------------------------- captions TSV
def read_tsv(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
             bad_rows: BadRows | None = None) -> list[dict]:
    """``image_path<TAB>caption`` per line (LaVi-Bridge style), parsed by BiDiffuser's reader (the one
    reader of this format): blank lines and a header line are ignored."""
    path, bad_rows = Path(path), bad_rows or BadRows()
    examples = []
    try:
        for lineno, image, caption, problem in iter_caption_tsv(path, image_root):
            where = f"{path}:{lineno}"
            if problem is not None:
                bad_rows.add(where, problem)
            else:
                examples.append(caption_example(f"{path.name}:{lineno}", Path(image), caption, where))
    except BiDiffuserError as e:
        raise EasyGenError(str(e)) from None
    return examples


# ------------------------------------------------------------------------------- COCO captions
def read_coco(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
              bad_rows: BadRows | None = None) -> list[dict]:
    """COCO ``captions_*.json``: ``images[] {id, file_name}`` and ``annotations[] {image_id, caption}``;
    one example per annotation (every caption of an image trains on it)."""
    path, bad_rows = Path(path), bad_rows or BadRows()
    root = _root(path, image_root)
    doc = read_json(path, "COCO captions")
    files: dict[str, Path] = {}
    for i, entry in enumerate(json_list(doc, "images", path)):
        try:
            image_id = str(json_field(entry, "id", (int, str)))
            files[image_id] = _resolve(root, json_field(entry, "file_name", str))
        except BadRow as e:
            bad_rows.add(f"{path} images[{i}]", str(e))
    examples = []
    for i, ann in enumerate(json_list(doc, "annotations", path)):
        where = f"{path} annotations[{i}]"
        try:
            image_id = str(json_field(ann, "image_id", (int, str)))
            caption = json_field(ann, "caption", str)
            if image_id not in files:
                raise BadRow(f"image_id {image_id} is not in 'images'")
            if not caption.strip():
                raise BadRow("empty caption")
            ann_id = ann.get("id", i)
            examples.append(caption_example(f"{path.name}:{ann_id}", files[image_id], caption, where))
        except BadRow as e:
            bad_rows.add(where, str(e))
    return examples


# ------------------------------------------------------------------------------- LLaVA conversations
def _marks(text: str) -> int:
    """How many images a user text marks (``<image>`` or ``<ImageHere>``), as ``user_message`` counts."""
    return user_message(text).count(IMAGE_PLACEHOLDER)


def llava_messages(turns: Any, num_images: int) -> list[dict]:
    """LLaVA ``conversations`` -> messages; ``num_images`` images go to the marked user turns, or
    all to the first user turn when no turn marks them."""
    if not isinstance(turns, list) or not turns:
        raise BadRow("'conversations' should be a non-empty list")
    messages = []
    for j, turn in enumerate(turns):
        who, value = json_field(turn, "from", str), json_field(turn, "value", str)
        role = _LLAVA_ROLES.get(who.lower())
        if role is None:
            raise BadRow(f"conversations[{j}]: unknown speaker '{who}' (expected human or gpt)")
        if not messages and role == "assistant":
            continue  # LLaVA's own preprocessing drops an answer that opens a conversation
        if messages and messages[-1]["role"] == role:
            raise BadRow(f"conversations[{j}]: two {who} turns in a row (turns must alternate)")
        if role == "user":
            messages.append({"role": "user", "content": value, "num_images": _marks(value)})
        else:
            if _marks(value):
                raise BadRow(f"conversations[{j}]: an answer cannot hold input images")
            if value.count(IMG_OPEN) != value.count(IMG_CLOSE):
                raise BadRow(f"conversations[{j}]: unbalanced {IMG_OPEN}...{IMG_CLOSE} image reply")
            messages.append({"role": "assistant", "content": value})
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRow("the conversation should end with an answer (gpt turn)")
    marked = sum(m.get("num_images", 0) for m in messages)
    if marked == 0 and num_images:
        messages[0]["num_images"] = num_images  # user_message puts the slots first
    elif marked != num_images:
        raise BadRow(f"the turns mark {marked} image(s) but the entry has {num_images}")
    return messages


def read_llava(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
               bad_rows: BadRows | None = None) -> list[dict]:
    """LLaVA-style JSON list of ``{"id", "image" (optional; a path or a list of paths),
    "conversations": [{"from": "human"|"gpt", "value"}]}``; answers may ask for images
    with ``<Img>description</Img>``, kept verbatim (the model learns to write them)."""
    path, bad_rows = Path(path), bad_rows or BadRows()
    root = _root(path, image_root)
    doc = read_json(path, "LLaVA conversations")
    if not isinstance(doc, list):
        raise EasyGenError(f"{path}: expected a JSON list of conversations")
    examples = []
    for i, entry in enumerate(doc):
        where = f"{path} [{i}]"
        try:
            json_field(entry, "conversations", list)
            image = entry.get("image")
            listed = [] if image is None else image if isinstance(image, list) else [image]
            images = [_resolve(root, im) for im in listed]
            messages = llava_messages(entry["conversations"], len(images))
            example_id = f"{path.name}:{entry.get('id', i)}"
            examples.append({"id": example_id, "images": [os.path.abspath(im) for im in images],
                             "messages": messages, "source": where})
        except BadRow as e:
            bad_rows.add(where, str(e))
    return examples


# ------------------------------------------------------------------------------- Karpathy split
def read_karpathy_captions(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                           split: str = "train", bad_rows: BadRows | None = None) -> list[dict]:
    """Karpathy ``dataset_coco.json``, the images of ``split`` (``"train+restval"`` joins splits);
    one example per reference sentence. Entries are checked by the evaluation reader
    (``easygen.eval.data.read_karpathy``), which always raises on a malformed one: ``bad_rows``
    cannot skip them."""
    path = Path(path)
    root = _root(path, image_root)
    doc = read_json(path, "Karpathy dataset")  # once, however many splits are joined
    examples = []
    for part in split.split("+"):
        for sample in read_karpathy(path, root, part.strip(), doc):
            for j, sentence in enumerate(sample.references):
                if sentence.strip():
                    examples.append(caption_example(f"{path.name}:{sample.id}:{j}", sample.image, sentence,
                                                    f"{path} {sample.where.split(' ', 1)[-1]}"))
    return examples


READERS = {"tsv": read_tsv, "coco": read_coco, "llava": read_llava, "karpathy": read_karpathy_captions}
