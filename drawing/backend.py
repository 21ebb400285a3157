"""The drawing interface: descriptions and seeds in, images out.

Every way EasyGen can draw an ``<Img>description</Img>`` reply is a ``DrawingBackend``: BiDiffuser
(CLIP or its own LLM bridge) and the released text-to-image bridges (ELLA, LaVi-Bridge,
ParaDiffusion). A backend owns its text encoder: it gets the description as text.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from bidiffuser.errors import BiDiffuserError
from bidiffuser.pipeline import make_generator

Progress = Callable[[int, int], None]


class DrawingError(BiDiffuserError):
    """A drawing backend's files or arguments are wrong (one line, shown as is)."""


@dataclass(frozen=True)
class DrawingSettings:
    """How a backend draws unless told otherwise: the defaults of its reference inference code."""
    steps: int
    guidance: float
    width: int
    height: int

    def override(self, steps: int | None = None, guidance: float | None = None, width: int | None = None,
                 height: int | None = None) -> "DrawingSettings":
        given = {k: v for k, v in dict(steps=steps, guidance=guidance, width=width, height=height).items()
                 if v is not None}
        return replace(self, **given)


class DrawingBackend(Protocol):
    name: str                   # "bidiffuser", "ella", "lavi-bridge", "paradiffusion"
    defaults: DrawingSettings
    max_batch: int              # how many descriptions one call draws together (1: one by one)

    def draw(self, prompts: Sequence[str], seeds: Sequence[int | None], steps: int | None = None,
             guidance: float | None = None, width: int | None = None, height: int | None = None,
             progress: Progress | None = None) -> list[Image.Image]:
        """One image per prompt; image i depends only on prompt i and seeds[i] (None: a random seed),
        never on the other prompts of the batch. ``progress(step, total)`` after each step."""
        ...

    def describe(self) -> str:
        """One line for logs: what was loaded from where."""
        ...

    def to(self, device) -> "DrawingBackend":
        """Every weight to ``device`` (where the next ``draw`` runs); returns the backend."""
        ...


def generators(seeds: Sequence[int | None]) -> list[torch.Generator]:
    """One CPU generator per image, as diffusers pipelines take them (``generator=[...]``): a seed gives
    the noise ``torch.manual_seed(seed); torch.randn(...)`` would give on CPU; None a fresh random one."""
    return [make_generator(None if seed is None else int(seed)) for seed in seeds]


def initial_noise(shape: tuple[int, ...], seeds: Sequence[int | None], device, dtype) -> torch.Tensor:
    """The starting latents exactly as diffusers' pipelines draw them from ``generator=[...]``: row i
    from its own CPU generator (so a batch equals its images drawn one by one, on any device)."""
    return randn_tensor(tuple(shape), generator=generators(seeds), device=torch.device(device), dtype=dtype)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def part_dtype(name, device: torch.device, on_cuda: torch.dtype, what: str = "dtype") -> torch.dtype:
    """A part's dtype: ``name`` when given, else (None/"auto") ``on_cuda`` on CUDA, the part's dtype in
    its reference code there, and float32 elsewhere (half precision is slow or missing on a CPU)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return on_cuda if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DrawingError(f"{what}: unknown dtype {name!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def check_prompts(prompts: Sequence[str], seeds: Sequence[int | None]) -> None:
    if isinstance(prompts, str):
        raise DrawingError("prompts must be a list of strings (got one string)")
    if len(prompts) != len(seeds):
        raise DrawingError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed (or None) per prompt")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise DrawingError("every prompt must be a non-empty string")


def draw_in_batches(backend: DrawingBackend, prompts: Sequence[str], seeds: Sequence[int | None],
                    progress: Progress | None = None, **settings) -> list[Image.Image]:
    """``backend.draw`` over any number of prompts, ``backend.max_batch`` at a time."""
    check_prompts(prompts, seeds)
    size = max(1, backend.max_batch)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), size):
        images += backend.draw(list(prompts[i:i + size]), list(seeds[i:i + size]), progress=progress, **settings)
    return images


class Offloaded:
    """A backend whose weights wait on the CPU and visit ``device`` only while drawing, so a large
    LLM can have the GPU to itself between pictures (``--drawer-offload``)."""

    def __init__(self, backend: DrawingBackend, device):
        self.backend, self.device = backend.to("cpu"), torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.name, self.defaults, self.max_batch = backend.name, backend.defaults, backend.max_batch

    def draw(self, prompts, seeds, **settings) -> list[Image.Image]:
        self.backend.to(self.device)
        try:
            return self.backend.draw(prompts, seeds, **settings)
        finally:
            self.backend.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def describe(self) -> str:
        return f"{self.backend.describe()} (on the CPU between drawings, {self.device} while drawing)"

    def to(self, device) -> "Offloaded":
        self.device = torch.device(device)
        return self

    def __getattr__(self, name):  # the wrapped backend's extras (e.g. BiDiffuser's path)
        return getattr(self.backend, name)
