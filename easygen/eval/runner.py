"""The prediction loop both evaluations share: batched generation, resumable, split across ranks.

Predictions file (JSONL). Line 1 is a header naming everything the predictions depend on (model
and BiDiffuser fingerprints, prompt, decoding and feature settings); each further line is one
sample's record ``{"id": ..., ...}``, appended and flushed as soon as its batch is generated. A
rerun reads what is there and only generates the rest, so an interrupted run resumes where it
stopped; a header that does not match the current settings is an error rather than a silent mix
of two models' outputs. A last line cut off mid-write is dropped and redone.

Under torchrun every rank reads what exists, the remaining samples are split into contiguous
chunks (VQA questions about one image stay together, so its features are computed once), and
each rank appends to its own part file ``<predictions>.rank<R>``. At the end rank 0 gathers every
rank's records and rewrites the predictions file whole, in sample order, so a sharded run leaves
the same file as a single-process one; then the part files go. The process group is gloo even
on GPUs: it only carries a few small Python objects (ids and texts), and gloo needs no device setup.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Sequence

from bidiffuser.checkpoint import atomic_path, fingerprint_file
from bidiffuser.cliutil import progress_bar
from easygen.errors import EasyGenError

log = logging.getLogger(__name__)

HEADER_KEY = "easygen_eval"
# Ranks wait for the slowest one at the final gather; real BiDiffuser + 7B runs take hours.
DIST_TIMEOUT = timedelta(hours=12)

Predict = Callable[[list], list[dict]]  # a batch of samples -> one record (without "id") per sample


# ---------------------------------------------------------------------------------------- ranks
@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def init_distributed() -> Dist:
    """Join the torchrun job when there is one (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# ---------------------------------------------------------------------------------------- JSONL
def part_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.rank{rank}")


def _part_files(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.glob(f"{path.name}.rank*") if p.name[len(path.name) + 5:].isdigit())


def read_predictions(path: Path, header: dict) -> dict[str, dict]:
    """id -> record from one predictions file (empty if it does not exist)."""
    if not path.exists():
        return {}
    lines = path.read_bytes().split(b"\n")
    if lines[-1].strip():
        log.warning("%s: ignoring an incomplete last line (an interrupted write); it is redone", path)
    records: dict[str, dict] = {}
    for n, raw in enumerate(lines[:-1], 1):
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EasyGenError(f"{path}:{n}: not a JSON record ({e}); delete the file to start over") from None
        if n == 1:
            _check_header(path, rec, header)
        elif not isinstance(rec, dict) or "id" not in rec:
            raise EasyGenError(f"{path}:{n}: a record must be an object with an 'id'")
        else:
            records[str(rec["id"])] = rec
    return records


def _check_header(path: Path, rec, header: dict) -> None:
    found = rec.get(HEADER_KEY) if isinstance(rec, dict) else None
    if found is None:
        raise EasyGenError(f"{path}:1: not an easygen eval predictions file (no header line)")
    if found != header:
        diff = sorted(k for k in header.keys() | found.keys() if header.get(k) != found.get(k))
        raise EasyGenError(f"{path} holds predictions made with other settings ({', '.join(diff)} differ); "
                           "delete it or give another --predictions file")


@contextmanager
def _appender(path: Path, header: dict) -> Iterator[Callable[[list[dict]], None]]:
    """A function appending records to ``path`` (flushed per call); writes the header first when
    the file is new, and cuts off a partial last line left by an interrupted run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with open(path, "r+b") as f:
                f.truncate(keep)
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write(json.dumps({HEADER_KEY: header}, ensure_ascii=False) + "\n")

        def write(records: list[dict]) -> None:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()

        yield write


def write_predictions(path: Path, header: dict, records: Sequence[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({HEADER_KEY: header}, ensure_ascii=False) + "\n")
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# ---------------------------------------------------------------------------------------- the loop
@dataclass
class Predictions:
    records: dict[str, dict] | None  # every record, on rank 0 (None on other ranks)
    reused: int                      # samples whose prediction came from an earlier run


def run_predictions(samples: Sequence, path: str | os.PathLike, header: dict, make_predict: Callable[[], Predict],
                    batch_size: int, dist: Dist, desc: str = "predicting", progress: bool = True) -> Predictions:
    """Predict every sample that the predictions file (and its part files) does not hold yet.

    ``make_predict`` is called only on a rank that has work, so a finished run is rescored
    without loading the model.
    """
    path = Path(path)
    records: dict[str, dict] = {}
    for f in [path, *_part_files(path)]:
        for k, rec in read_predictions(f, header).items():
            records.setdefault(k, rec)
    # Ranks on other machines may see other part files: share which ids each rank holds.
    held = dist.all_gather(set(records))
    done = set().union(*held)
    todo = [s for s in samples if s.id not in done]
    reused = len(samples) - len(todo)
    mine = todo[dist.rank * len(todo) // dist.world:(dist.rank + 1) * len(todo) // dist.world]
    dist.barrier()  # nobody touches a file before every rank has read them all

    new: dict[str, dict] = {}
    if mine:
        predict = make_predict()
        update, close = progress_bar(desc, disable=not (progress and dist.main))
        own = path if dist.world == 1 else part_path(path, dist.rank)
        try:
            with _appender(own, header) as write:
                for start in range(0, len(mine), batch_size):
                    batch = mine[start:start + batch_size]
                    batch_records = [{"id": s.id, **r} for s, r in zip(batch, predict(batch), strict=True)]
                    write(batch_records)
                    new.update((r["id"], r) for r in batch_records)
                    update(start + len(batch), len(mine))
        finally:
            close()

    # Rank 0 receives the new records and any old ones it could not see itself.
    gathered = dist.gather({**{k: v for k, v in records.items() if k not in held[0]}, **new})
    if dist.main:
        for part in gathered:
            records.update(part)
        order = {s.id: i for i, s in enumerate(samples)}  # sample order; records of other samples last
        merged = sorted(records.values(), key=lambda r: order.get(str(r["id"]), len(order)))
        write_predictions(path, header, merged)
        for stale in _part_files(path):
            stale.unlink(missing_ok=True)
    dist.barrier()  # the merged file is safe: now each rank may drop its part
    part_path(path, dist.rank).unlink(missing_ok=True)
    return Predictions(records if dist.main else None, reused)


# ---------------------------------------------------------------------------------------- provenance
def model_fingerprint(*paths: str | None) -> str:
    """sha256 over ``fingerprint_file`` of every file that shapes the LLM's outputs: the files at
    the top of each model/adapter directory (weights, config, tokenizer; ``bidiffuser/`` has its
    own fingerprint) and single files such as a projector. Paths themselves are left out, so a
    moved model keeps its fingerprint."""
    entries = []
    for i, p in enumerate(paths):
        if not p:
            continue
        p = Path(p)
        if not p.exists():
            raise EasyGenError(f"not found: {p}")
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
        entries.append([i, [(f.name, fingerprint_file(f)) for f in files]])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def tree_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over every file under ``path`` (relative names and ``fingerprint_file``): a released
    drawing system's folders of subfolders, where ``model_fingerprint`` reads only the top."""
    root = Path(path)
    if not root.exists():
        raise EasyGenError(f"not found: {root}")
    files = sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith(".")) if root.is_dir() else [root]
    entries = [(str(f.relative_to(root)) if root.is_dir() else f.name, fingerprint_file(f)) for f in files]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- generation
class ImageQA:
    """Images + one user message -> the model's reply, batched: BiDiffuser features, the EasyGen
    prompt, left-padded batched ``generate``."""

    def __init__(self, loaded, features, generate_kwargs: dict):
        self.loaded = loaded  # for callers that also hold a conversation (lmms-eval's multi-round)
        self.model, self.processor, self.features = loaded.model, loaded.processor, features
        self.kwargs = {"pad_token_id": self.processor.pad_token_id, **generate_kwargs}
        self.context = getattr(self.model.config, "max_position_embeddings", None)

    def prompt_ids(self, text: str, where: str = "", num_images: int = 1, max_new_tokens: int | None = None) -> list[int]:
        prompt = self.processor.build_prompt([{"role": "user", "content": text, "num_images": num_images}])
        ids = self.processor.tokenize_prompt(prompt)
        budget = self.kwargs.get("max_new_tokens", 0) if max_new_tokens is None else max_new_tokens
        if self.context and len(ids) + budget > self.context:
            raise EasyGenError(f"{where or 'prompt'}: the prompt ({len(ids)} tokens) plus --max-new-tokens "
                               f"exceeds the model's context of {self.context}")
        return ids

    def _features(self, per_sample: Sequence[list]):
        flat = [im for images in per_sample for im in images]
        return self.features(flat) if flat else None

    @staticmethod
    def _image_lists(images: Sequence) -> list[list]:
        # one image per sample (the benchmarks' case), or a list of images (lmms-eval's visuals: 0..n)
        return [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]

    def __call__(self, texts: Sequence[str], images: Sequence, where: Sequence[str] | None = None,
                 generate_kwargs: dict | None = None, stop: Sequence[str] = ()) -> list[str]:
        """The reply to each (text, image) pair; ``where`` names the samples in errors.
        ``generate_kwargs`` override the loader's for this call; a reply ends before the first ``stop``
        string."""
        import torch

        kwargs = {**self.kwargs, **(generate_kwargs or {})}
        where = where or [""] * len(texts)
        per_sample = self._image_lists(images)
        batch = self.processor.pad_batch([self.prompt_ids(t, w, len(ims), kwargs.get("max_new_tokens", 0))
                                          for t, w, ims in zip(texts, where, per_sample)], side="left")
        feats = self._features(per_sample)
        device = self.model.device
        with torch.inference_mode():
            out = self.model.generate(batch["input_ids"].to(device),
                                      image_features=None if feats is None else feats.to(device),
                                      attention_mask=batch["attention_mask"].to(device), **kwargs)
        replies = []
        for row in out:
            text = self.processor.decode(row)
            cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
            # One line, single spaces: a reply is a caption or a short answer.
            replies.append(" ".join(text[:cut].split()))
        return replies


def load_image_qa(model_path: str, model_base: str | None, lora: str | None, projector: str | None,
                  bidiffuser: str | None, device: str | None, dtype: str, dist: Dist, feature_steps: int,
                  feature_scale: float, feature_seed: int, feature_cache: str | None, batch_size: int,
                  generate_kwargs: dict, bidiffuser_dtype: str = "auto", quantization: str | None = None) -> ImageQA:
    """Load the model with the one builder, on this rank's GPU under torchrun."""
    import torch

    from bidiffuser.cliutil import resolve_device
    from easygen.builder import load_pretrained
    from easygen.features import ImageFeatureExtractor

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and dist.world > 1:
        dev = torch.device("cuda", dist.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    loaded = load_pretrained(model_path, model_base=model_base, lora=lora, projector=projector,
                             bidiffuser=bidiffuser, device=dev, dtype=dtype, bidiffuser_dtype=bidiffuser_dtype,
                             quantization=quantization)
    if loaded.bidiffuser is None:
        raise EasyGenError("no BiDiffuser directory: give --bidiffuser")
    features = ImageFeatureExtractor(loaded.bidiffuser, steps=feature_steps, scale=feature_scale, seed=feature_seed,
                                     cache_dir=feature_cache, batch_size=batch_size)
    return ImageQA(loaded, features, generate_kwargs)
