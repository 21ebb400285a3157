"""Data mixtures: a config file names the datasets, and ``load_mixture`` turns it into examples.

Config (JSON, or YAML when PyYAML is installed; relative paths are relative to the config file)::

    {"seed": 0,                      # subsampling and shuffling
     "eval_fraction": 0.0,           # hold out this fraction of every training dataset's images
     "datasets": [
       {"name": "cc", "format": "tsv", "path": "captions.tsv", "image_root": "images",
        "weight": 1.0, "max_samples": null},
       {"name": "coco_val", "format": "karpathy", "path": "dataset_coco.json",
        "image_root": "coco", "split": "val", "eval": true}]}

``weight`` scales a dataset's share: 2.0 repeats every example twice, 0.5 keeps a seeded half,
1.5 one copy plus a seeded half. ``max_samples`` first caps the dataset (a seeded subset).
``eval: true`` sends the whole dataset to the evaluation set instead. ``eval_fraction`` holds out
whole images (every caption of a held-out image), so no evaluation image is seen in training.
The result is the same for the same config and seed, in every run and on every rank.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from easygen.errors import EasyGenError

from .readers import READERS, BadRows

DATASET_KEYS = {"name", "format", "path", "image_root", "weight", "split", "max_samples", "eval"}
CONFIG_KEYS = {"seed", "eval_fraction", "datasets"}


@dataclass
class Mixture:
    """Examples ready for training (seeded shuffle) and evaluation (file order), with counts."""
    train: list[dict]
    eval: list[dict]
    skipped: int = 0                   # malformed rows left out (on_error="skip")
    skipped_examples: list[str] = field(default_factory=list)  # the first few, for the report
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> read/train/eval counts

    def images(self) -> list[str]:
        """Every image the mixture uses (training and evaluation), once, sorted."""
        return sorted({im for ex in self.train + self.eval for im in ex["images"]})

    def summary(self) -> str:
        parts = [f"{name}: {s['read']} read, {s['train']} train, {s['eval']} eval" for name, s in self.stats.items()]
        skipped = f"; {self.skipped} malformed row(s) skipped" if self.skipped else ""
        return f"{len(self.train)} train / {len(self.eval)} eval examples ({'; '.join(parts)}){skipped}"


# ------------------------------------------------------------------------------- the config file
def read_config(path: str | os.PathLike) -> dict:
    """The parsed config file (``.yaml``/``.yml`` as YAML, anything else as JSON)."""
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "not found"
        raise EasyGenError(f"data config {problem}: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise EasyGenError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); "
                               "or write the config as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise EasyGenError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EasyGenError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None


def _check_keys(entry: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise EasyGenError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _number(entry: Mapping, key: str, default, where: str, low: float, integer: bool = False, high=None):
    value = entry.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or value < low or (high is not None and value >= high):
        bound = f"at least {low}" + (f" and below {high}" if high is not None else "")
        kind = "an integer" if integer else "a number"
        raise EasyGenError(f"{where}: '{key}' should be {kind} {bound}, got {value!r}")
    return value


def _datasets(config: Any, base: Path, where: str) -> list[dict]:
    """The validated dataset entries, paths made absolute."""
    if not isinstance(config, dict) or not isinstance(config.get("datasets"), list) or not config["datasets"]:
        raise EasyGenError(f"{where}: expected an object with a non-empty 'datasets' list")
    _check_keys(config, CONFIG_KEYS, where)
    specs, names = [], set()
    for i, entry in enumerate(config["datasets"]):
        at = f"{where} datasets[{i}]"
        if not isinstance(entry, dict):
            raise EasyGenError(f"{at}: expected an object, got {type(entry).__name__}")
        _check_keys(entry, DATASET_KEYS, at)
        fmt, path = entry.get("format"), entry.get("path")
        if fmt not in READERS:
            raise EasyGenError(f"{at}: 'format' should be one of {', '.join(READERS)}, got {fmt!r}")
        if not isinstance(path, str) or not path:
            raise EasyGenError(f"{at}: 'path' should be a file path")
        name = entry.get("name", Path(path).stem)
        if not isinstance(name, str) or not name or name in names:
            raise EasyGenError(f"{at}: 'name' should be a unique non-empty string, got {name!r}")
        names.add(name)
        split = entry.get("split")
        if split is not None and (fmt != "karpathy" or not isinstance(split, str)):
            raise EasyGenError(f"{at}: 'split' is a string, for the karpathy format only")
        root = entry.get("image_root")
        if root is not None and not isinstance(root, str):
            raise EasyGenError(f"{at}: 'image_root' should be a folder path")
        if not isinstance(entry.get("eval", False), bool):
            raise EasyGenError(f"{at}: 'eval' should be true or false")
        specs.append({"name": name, "format": fmt, "path": base / path,
                      "image_root": None if root is None else base / root,
                      "weight": _number(entry, "weight", 1.0, at, 0),
                      "max_samples": _number(entry, "max_samples", None, at, 1, integer=True),
                      "split": split, "eval": entry.get("eval", False)})
    return specs


# ------------------------------------------------------------------------------- building the mixture
def _seeded(seed: int, *parts: str) -> random.Random:
    """A generator of its own per use, so adding a dataset never changes another one's sample."""
    return random.Random(hashlib.sha256(":".join([str(seed), *parts]).encode()).digest())


def _subset(examples: list[dict], k: int, rng: random.Random) -> list[dict]:
    """``k`` examples drawn without replacement, kept in file order."""
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), k))]


def _held_out(example: dict, seed: int, fraction: float) -> bool:
    """Whether the example's image group goes to evaluation: a hash of the image's file name, so it
    is stable per image and does not change when the data set moves to another folder."""
    group = os.path.basename(example["images"][0]) if example["images"] else example["id"]
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _weighted(examples: list[dict], weight: float, rng: random.Random) -> list[dict]:
    """floor(weight) copies of every example plus a seeded subset for the fractional part; copies
    get ids ending in ``#k`` so ids stay unique."""
    whole, part = int(math.floor(weight)), weight - math.floor(weight)
    out = []
    for k in range(whole):
        out += examples if k == 0 else [{**ex, "id": f"{ex['id']}#{k}"} for ex in examples]
    extra = _subset(examples, round(part * len(examples)), rng)
    out += extra if whole == 0 else [{**ex, "id": f"{ex['id']}#{whole}"} for ex in extra]
    return out


def _missing_images(examples: list[dict], bad_rows: BadRows) -> list[dict]:
    """The examples whose image files all exist; the others are malformed rows."""
    exists: dict[str, bool] = {}
    kept = []
    for ex in examples:
        missing = [im for im in ex["images"] if not exists.setdefault(im, os.path.isfile(im))]
        if missing:
            bad_rows.add(ex["source"], f"image not found: {missing[0]}")
        else:
            kept.append(ex)
    return kept


def load_mixture(config: str | os.PathLike | Mapping, on_error: str = "raise", check_images: bool = True,
                 base_dir: str | os.PathLike | None = None) -> Mixture:
    """The examples of a data config (a file, or an already parsed dict whose relative paths
    resolve against ``base_dir``, default the current folder).

    ``on_error="skip"`` leaves malformed rows out and counts them (``Mixture.skipped``) instead of
    raising an error naming the first one's file and line. ``check_images`` treats an example
    whose image file does not exist as malformed (one stat per image; turn off for slow storage).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error should be 'raise' or 'skip', got {on_error!r}")
    if isinstance(config, Mapping):
        doc, base, where = dict(config), Path(base_dir or "."), "data config"
    else:
        doc, base, where = read_config(config), Path(config).parent, str(config)
    specs = _datasets(doc, base, where)
    seed = _number(doc, "seed", 0, where, 0, integer=True)
    fraction = _number(doc, "eval_fraction", 0.0, where, 0, high=1)

    bad_rows = BadRows(skip=on_error == "skip")
    train, evaluation, stats = [], [], {}
    for spec in specs:
        reader = READERS[spec["format"]]
        extra = {"split": spec["split"]} if spec["split"] else {}
        examples = reader(spec["path"], spec["image_root"], bad_rows=bad_rows, **extra)
        if check_images:
            examples = _missing_images(examples, bad_rows)
        examples = [{**ex, "id": f"{spec['name']}/{ex['id']}", "dataset": spec["name"]} for ex in examples]
        read = len(examples)
        if spec["max_samples"] is not None and read > spec["max_samples"]:
            examples = _subset(examples, spec["max_samples"], _seeded(seed, spec["name"], "max_samples"))
        out = [spec["eval"] or (fraction > 0 and _held_out(ex, seed, fraction)) for ex in examples]
        held = [ex for ex, o in zip(examples, out) if o]
        kept = [ex for ex, o in zip(examples, out) if not o]
        kept = _weighted(kept, spec["weight"], _seeded(seed, spec["name"], "weight"))
        train += kept
        evaluation += held
        stats[spec["name"]] = {"read": read, "train": len(kept), "eval": len(held)}
    _seeded(seed, "shuffle").shuffle(train)
    return Mixture(train, evaluation, bad_rows.count, bad_rows.examples, stats)
