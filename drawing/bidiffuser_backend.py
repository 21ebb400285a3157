"""BiDiffuser (UniDiffuser-v1's U-ViT) as a drawing backend: through CLIP-L, or through its own LLM
bridge when the pipeline has one."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from bidiffuser.model_dir import SamplingDefaults
from bidiffuser.pipeline import BiDiffuser

from .backend import DrawingError, DrawingSettings, Progress, check_prompts, generators


class BiDiffuserBackend:
    name = "bidiffuser"
    max_batch = 8

    def __init__(self, pipe: BiDiffuser, draw_with: str | None = None, steps: int | None = None,
                 guidance: float | None = None):
        self.pipe, self.draw_with = pipe, draw_with
        side = pipe.config.resolution
        # the model directory's own text-to-image defaults (bidiffuser.json), else UniDiffuser's 50 and 7
        own = pipe.config.sampling_defaults or SamplingDefaults()
        own_steps, own_scale = own.for_mode("t2i")
        self.defaults = DrawingSettings(steps=steps or own_steps, guidance=own_scale if guidance is None else guidance,
                                        width=side, height=side)

    @property
    def path(self) -> str:
        """"bridge" or "clip": how descriptions reach the U-ViT."""
        return "bridge" if self.pipe.has_bridge and self.draw_with != "clip" else "clip"

    def draw(self, prompts: Sequence[str], seeds: Sequence[int | None], steps: int | None = None,
             guidance: float | None = None, width: int | None = None, height: int | None = None,
             progress: Progress | None = None) -> list:
        check_prompts(prompts, seeds)
        s = self.defaults.override(steps, guidance, width, height)
        if (s.width, s.height) != (self.defaults.width, self.defaults.height):
            raise DrawingError(f"BiDiffuser draws {self.defaults.width}x{self.defaults.height} only "
                               f"(got {s.width}x{s.height})")
        return self.pipe.text_to_image(list(prompts), steps=s.steps, scale=s.guidance, generator=generators(seeds),
                                       progress=progress, draw_with=self.draw_with).images

    def to(self, device) -> "BiDiffuserBackend":
        # BiDiffuser also reads the user's images for the LLM: it stays where it was loaded
        if torch.device(device) != self.pipe.device:
            raise DrawingError(f"BiDiffuser stays on {self.pipe.device} (it also reads images); only a released "
                               f"system's backend moves between devices")
        return self

    def describe(self) -> str:
        return f"bidiffuser ({self.path}) from {self.pipe.config.root}"


def load(path: str | os.PathLike, device=None, dtype: str | None = None, bridge=None, draw_with: str | None = None,
         steps: int | None = None, guidance: float | None = None, **pipeline_options) -> BiDiffuserBackend:
    """A BiDiffuser model directory (optionally with a bridge directory) as a backend."""
    from bidiffuser.cliutil import resolve_device
    from bidiffuser.precision import Precision
    dev = resolve_device(device)
    pipe = BiDiffuser.from_pretrained(path, device=dev, precision=Precision.named(dtype or "auto", dev),
                                      bridge=bridge, **pipeline_options)
    return BiDiffuserBackend(pipe, draw_with, steps, guidance)
