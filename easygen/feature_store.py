"""A directory of safetensors shards mapping keys to tensors: the precomputed image-feature store.

Layout: ``STORE/<prefix>-<writer>-<counter>.safetensors``, each shard holding many entries (tensor
name = key) and, as metadata, the settings its entries were computed with. Nothing else is stored:
the index (key -> shard) is rebuilt at open from the shard headers, which is cheap (no tensor data
is read), so there is no index file that concurrent writers would have to agree on.

Shards are written atomically (temp file + rename) and never modified, and every writer names its
shards with its rank and a random id, so several processes (torchrun ranks) can fill one store at
once, and a killed run leaves only complete shards behind. An entry written twice (two ranks, or a
rerun) is harmless: the first shard that holds the key wins.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open

from bidiffuser.checkpoint import save_safetensors
from bidiffuser.errors import first_line
from easygen.errors import EasyGenError

log = logging.getLogger(__name__)

STORE_FORMAT = "easygen-feature-store-v1"
SHARD_SUFFIX = ".safetensors"


class FeatureStore:
    """Key -> tensor store in safetensors shards; see the module docstring for the layout.

    ``put`` buffers entries and writes a shard every ``shard_size`` entries, when the metadata of
    the entries changes, on ``flush()`` and on ``close()`` (also on leaving a ``with`` block, even
    by an exception, so finished work is kept). ``get`` sees buffered entries too. A shard that
    cannot be read is skipped with a warning: its keys are simply missing, so they get recomputed.
    """

    def __init__(self, root: str | os.PathLike, shard_size: int = 256, writer: str | None = None,
                 prefix: str = "latents"):
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise EasyGenError(f"feature store is not a directory: {self.root}")
        self.shard_size = shard_size
        # Unique per store object: ranks, reruns and several stores in one process never collide.
        self.writer = f"{writer or 'w'}-{uuid.uuid4().hex[:8]}"
        self.prefix = prefix
        self._counter = 0
        self._index: dict[str, Path] = {}
        self._metadata: dict[Path, dict[str, str]] = {}  # readable shards
        self._unreadable: set[Path] = set()  # remembered, so each is warned about once
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_metadata: dict[str, str] = {}
        self.refresh()

    # -- reading -----------------------------------------------------------------------------------
    def refresh(self) -> int:
        """Index shards not seen yet (e.g. written by other ranks since open); returns how many."""
        if not self.root.is_dir():
            return 0
        new = 0
        # Temp files of writers in progress are ".<name>.<random>.tmp": the glob skips them.
        for path in sorted(self.root.glob(f"*{SHARD_SUFFIX}")):
            if path in self._metadata or path in self._unreadable:
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys, metadata = list(f.keys()), f.metadata() or {}
            except Exception as e:  # empty, truncated or foreign file: the store must never stop a run
                log.warning("skipping unreadable feature shard %s: %s", path, first_line(e))
                self._unreadable.add(path)
                continue
            self._metadata[path] = metadata
            for key in keys:
                self._index.setdefault(key, path)
            new += 1
        return new

    def __contains__(self, key: str) -> bool:
        return key in self._buffer or key in self._index

    def __len__(self) -> int:
        return len(self._index.keys() | self._buffer.keys())

    def keys(self) -> Iterator[str]:
        yield from self._index
        yield from (k for k in self._buffer if k not in self._index)

    @property
    def shards(self) -> list[Path]:
        """The readable shard files indexed so far."""
        return sorted(self._metadata)

    def metadata(self, key: str) -> dict[str, str] | None:
        """The metadata of the shard holding ``key`` (the settings it was computed with)."""
        if key in self._buffer:
            return dict(self._buffer_metadata)
        path = self._index.get(key)
        return None if path is None else dict(self._metadata[path])

    def settings(self) -> list[dict[str, str]]:
        """The distinct shard metadata in the store (usually one: the settings of one extraction)."""
        seen = {tuple(sorted(m.items())) for m in self._metadata.values()}
        return [dict(s) for s in sorted(seen)]

    def get(self, key: str) -> torch.Tensor | None:
        """The tensor stored under ``key``, or None when absent (or its shard turns out unreadable)."""
        if key in self._buffer:
            return self._buffer[key]
        path = self._index.get(key)
        if path is None:
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as e:  # the shard was damaged after open: forget all of it
            log.warning("skipping unreadable feature shard %s: %s", path, first_line(e))
            self._unreadable.add(path)
            del self._metadata[path]
            self._index = {k: p for k, p in self._index.items() if p != path}
            return None

    # -- writing -----------------------------------------------------------------------------------
    def put(self, entries: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
        """Buffer ``entries`` (keys already stored are ignored); ``metadata`` describes all of them
        and goes into their shard, so entries with different metadata never share a shard."""
        metadata = {**(metadata or {}), "store_format": STORE_FORMAT}
        if self._buffer and metadata != self._buffer_metadata:
            self.flush()
        self._buffer_metadata = metadata
        for key, tensor in entries.items():
            if key not in self:
                self._buffer[key] = tensor.detach().cpu().contiguous()
            if len(self._buffer) >= self.shard_size:
                self.flush()

    def flush(self) -> Path | None:
        """Write the buffered entries as one new shard (atomically); returns its path, if any."""
        if not self._buffer:
            return None
        path = self.root / f"{self.prefix}-{self.writer}-{self._counter:05d}{SHARD_SUFFIX}"
        self._counter += 1
        save_safetensors(self._buffer, path, metadata=self._buffer_metadata)
        self._metadata[path] = self._buffer_metadata
        for key in self._buffer:
            self._index.setdefault(key, path)
        self._buffer = {}
        return path

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, {len(self)} entries, {len(self.shards)} shards)"
