"""Reading and writing weight files safely.

Every weight file a user hands us is untrusted: pickles are read with ``weights_only=True``,
safetensors are preferred for what we write, and writes are atomic (temp file + rename) so a crash
never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import BiDiffuserError, CheckpointError, first_line

StateDict = dict[str, torch.Tensor]


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parsed JSON, or a one-line error naming the file (and the line of a syntax error)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BiDiffuserError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise BiDiffuserError(f"{what} is a directory, not a JSON file: {path}") from None
    except json.JSONDecodeError as e:
        raise BiDiffuserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise BiDiffuserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise BiDiffuserError(f"{path}: cannot read: {e.strerror or e}") from None


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    """Write ``obj`` as UTF-8 JSON, atomically (readers never see half a file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(path)


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise a one-line error if it is not an existing file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{what} is not a file: {path}")
    return path


def read_state_dict(path: str | os.PathLike, what: str = "checkpoint", dtype: torch.dtype | None = None) -> StateDict:
    """Load a flat name -> tensor mapping from ``.safetensors`` or a torch pickle (``.pth/.pt/.bin``).

    Pickles go through ``torch.load(weights_only=True)``, memory-mapped when the file allows it; a
    checkpoint nested under ``state_dict`` / ``model`` / ``module`` is unwrapped. ``dtype`` converts
    floating-point tensors one at a time as they are read, so a file is never held twice (a 7B
    fp16 shard read as bf16 costs one tensor more than the result, not a whole shard). Anything
    unreadable is a CheckpointError.
    """
    path = require_file(path, what)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: _as(f.get_tensor(k), dtype) for k in f.keys()}
        mapped = True
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a legacy (pre-zip) pickle cannot be mapped
            if "mmap" not in str(e):
                raise
            mapped = False
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a weight file at all
        raise CheckpointError(f"cannot read {what} {path}: {first_line(e)}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{what} {path} does not hold a state dict of tensors")
    return {k: _as(v, dtype, release=mapped) for k, v in sd.items()}


def _as(t: torch.Tensor, dtype: torch.dtype | None, release: bool = False) -> torch.Tensor:
    """``t`` in ``dtype`` (floating point only). With ``release``, the source's pages of a
    memory-mapped file are handed back to the kernel once converted (they would stay resident
    until the whole file is unmapped)."""
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    out = t.to(dtype)
    if release:
        release_pages(t)
    return out


def release_pages(t: torch.Tensor) -> None:
    """Best effort (Linux): drop ``t``'s whole pages from this process's memory. Only for tensors
    backed by a private file mapping that nothing reads again (a later read would load the file
    again, so it stays correct)."""
    try:
        import ctypes
        import mmap

        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        start = t.data_ptr()
        end = start + t.untyped_storage().nbytes() - (start - t.untyped_storage().data_ptr())
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
    except (OSError, AttributeError, ValueError):
        pass


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str = "module.") -> StateDict:
    """Drop ``prefix`` from every key that has it (DDP checkpoints save as ``module.*``)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _summarise(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
                     source: str | os.PathLike) -> None:
    """Raise a CheckpointError naming missing, unexpected and mis-shaped keys, if there are any."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    misshaped = [f"{k} {tuple(got[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in got and tuple(got[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_summarise(misshaped, 3)}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the model config: " + "; ".join(problems))


def load_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str | os.PathLike,
                assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` with a readable error listing every mismatch.
    ``assign=True`` adopts the tensors themselves (for modules built on the meta device)."""
    check_state_dict(module.state_dict(), sd, source)
    module.load_state_dict(sd, strict=True, assign=assign)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, marker: str = "config.json") -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``, else it is
    deleted. Readers never see a half-written directory. An existing non-empty directory is only
    replaced when it holds ``marker`` (i.e. looks like an earlier output), never a user's folder."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink() and any(path.iterdir()) and not (path / marker).exists():
        raise BiDiffuserError(f"{path} exists and is not a model directory (no {marker}); not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(sd: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors, atomically (tensors made contiguous, shared storage split)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save`` atomically: used only to write files in the official ``.pth`` formats."""
    with atomic_path(path) as tmp:
        torch.save(obj, str(tmp))


# Content fingerprints. Cache keys and result files name "the checkpoint they came from", so they
# must change whenever a weight file changes; but hashing every byte of the ~5 GB of BiDiffuser
# weights at each start-up takes tens of seconds. Any real change of a weight file (retraining,
# fine-tuning, a different download, truncation) changes its size or touches bytes all over the
# file, so hashing the size, both ends and evenly spaced blocks catches it for a few MiB of reading.
_FP_EDGE = 4 * 2**20            # bytes hashed at each end of a large file
_FP_BLOCK, _FP_BLOCKS = 64 * 2**10, 16  # evenly spaced blocks in between
_FP_EXACT_BELOW = 16 * 2**20    # smaller files are hashed whole (the result is their plain sha256)


def fingerprint_file(path: str | os.PathLike) -> str:
    """A fast content fingerprint (hex) of a file: its sha256 when under 16 MiB; for larger files
    the sha256 of its size, its first and last 4 MiB and 16 evenly spaced 64 KiB blocks."""
    path = require_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < _FP_EXACT_BELOW:
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256(f"sampled-v1 size={size}\n".encode())
        step = (size - _FP_BLOCK) // (_FP_BLOCKS - 1)
        spans = [(0, _FP_EDGE), (size - _FP_EDGE, _FP_EDGE)] + [(i * step, _FP_BLOCK) for i in range(_FP_BLOCKS)]
        for offset, length in spans:
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest()
