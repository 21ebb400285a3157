"""Seconds and peak memory per phase of a turn (``easygen chat --profile``).

Peak resident memory is the kernel's high-water mark (``VmHWM``), reset at the start of each phase
through ``/proc/self/clear_refs`` (Linux); elsewhere only the whole run's peak is known. Each phase
also records the bytes of model weights resident at its end, so memory can be read against them.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

GIB = 1024 ** 3


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start a new high-water mark; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def module_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of ``modules`` (shared tensors once; meta tensors not)."""
    seen, total = set(), 0
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.device.type == "meta":
                continue
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


@dataclass
class Phase:
    name: str
    seconds: float
    peak_rss: int | None
    weights: int | None
    cuda_peak: int | None = None

    def to_json(self) -> dict:
        return {"phase": self.name, "seconds": round(self.seconds, 2), "peak_rss_bytes": self.peak_rss,
                "weights_bytes": self.weights, "cuda_peak_bytes": self.cuda_peak}


@dataclass
class Profiler:
    """``with profiler.phase("generate"): ...`` records one row; ``weights`` says what is loaded."""
    weights: Callable[[], int] | None = None
    phases: list[Phase] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        per_phase = reset_peak_rss()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda or (torch.cuda.is_available() and torch.cuda.is_initialized()):
                torch.cuda.synchronize()
            self.phases.append(Phase(
                name, time.perf_counter() - start, peak_rss_bytes() if per_phase else None,
                self.weights() if self.weights else None,
                torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None))

    def table(self) -> str:
        rows = ["phase        seconds  peak RSS GiB  weights GiB  peak/weights" +
                ("  CUDA peak GiB" if any(p.cuda_peak for p in self.phases) else "")]
        for p in self.phases:
            ratio = f"{p.peak_rss / p.weights:11.2f}x" if p.peak_rss and p.weights else f"{'':>12}"
            peak = f"{p.peak_rss / GIB:12.2f}" if p.peak_rss else f"{'n/a':>12}"
            weights = f"{p.weights / GIB:11.2f}" if p.weights is not None else f"{'':>11}"
            cuda = f"  {p.cuda_peak / GIB:13.2f}" if p.cuda_peak else ""
            rows.append(f"{p.name:<12} {p.seconds:7.1f}  {peak}  {weights}  {ratio}{cuda}")
        return "\n".join(rows)


def resident_weight_bytes(loaded) -> int:
    """Bytes of the weights a ``LoadedModel`` holds now: the LLM and the BiDiffuser components
    loaded so far (they load on first use)."""
    modules = [loaded.model]
    pipe = loaded.bidiffuser
    if pipe is not None:
        for name in ("uvit", "caption_decoder", "autoencoder", "clip_image", "clip_text", "bridge"):
            part = pipe.__dict__.get(name)  # a cached_property not yet read is absent
            if isinstance(part, torch.nn.Module):
                modules.append(part)
            elif part is not None:
                modules += [v for v in vars(part).values() if isinstance(v, torch.nn.Module)]
    drawer = getattr(loaded.drawer, "backend", loaded.drawer)  # (an offloaded one: the backend inside)
    if drawer is not None and getattr(drawer, "name", None) != "bidiffuser":  # a released system's backend
        modules += _modules_of(drawer)
    return module_bytes(*modules)


def _modules_of(obj) -> list[torch.nn.Module]:
    """The torch modules an object holds as attributes (or in tuples of them, as ELLA's CLIP pair)."""
    found = []
    for value in vars(obj).values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, torch.nn.Module):
                found.append(v)
            elif hasattr(v, "model") and isinstance(v.model, torch.nn.Module):  # a text-encoder wrapper
                found.append(v.model)
    return found
