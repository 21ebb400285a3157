"""Which dtype each BiDiffuser component runs in.

The original EasyGen (and UniDiffuser's sampling scripts) run the U-ViT in half precision under
CUDA autocast and keep the VAE and the caption decoder (``decode_prefix``, caption generation) in
float32, whatever the LLM's dtype. ``Precision.named`` gives that policy by name:

* ``auto``: ``float16`` on CUDA (the original's), ``float32`` elsewhere;
* ``float16`` / ``bfloat16``: U-ViT and CLIP encoders stored in that dtype and run under
  ``torch.autocast`` of it (ops autocast keeps in float32, such as softmax and layer norm on CUDA,
  stay there); VAE and caption decoder in float32;
* ``float32``: everything in float32.

``Precision.uniform`` (every component in one dtype, no autocast) is what BiDiffuser training uses
for its frozen encoders.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .cliutil import PRECISION_NAMES
from .errors import BiDiffuserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    uvit: torch.dtype = torch.float32
    clip: torch.dtype = torch.float32
    autoencoder: torch.dtype = torch.float32
    caption_decoder: torch.dtype = torch.float32
    autocast: bool = False  # run the half-precision U-ViT and CLIP under torch.autocast too

    @classmethod
    def uniform(cls, dtype: torch.dtype) -> "Precision":
        return cls(dtype, dtype, dtype, dtype)

    @classmethod
    def named(cls, name: str, device: str | torch.device = "cpu") -> "Precision":
        if name == "auto":
            name = "float16" if torch.device(device).type == "cuda" else "float32"
        if name not in _DTYPES:
            raise BiDiffuserError(f"unknown BiDiffuser precision {name!r} (choose from {', '.join(PRECISION_NAMES)})")
        half = _DTYPES[name]
        if half == torch.float32:
            return cls()
        return cls(uvit=half, clip=half, autocast=True)

    @property
    def name(self) -> str:
        """Short description, for caches and results files (e.g. "float32", "uvit+clip bfloat16 autocast")."""
        dtypes = {self.uvit, self.clip, self.autoencoder, self.caption_decoder}
        short = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        if len(dtypes) == 1 and not self.autocast:
            return short(self.uvit)
        if self.uvit == self.clip and self.autoencoder == self.caption_decoder == torch.float32:
            return f"uvit+clip {short(self.uvit)}{' autocast' if self.autocast else ''}"
        return (f"uvit {short(self.uvit)}, clip {short(self.clip)}, vae {short(self.autoencoder)}, "
                f"caption decoder {short(self.caption_decoder)}{', autocast' if self.autocast else ''}")

    def compute(self, dtype: torch.dtype, device: torch.device):
        """The context a component stored in ``dtype`` runs in."""
        if self.autocast and dtype != torch.float32:
            return torch.autocast(device_type=device.type, dtype=dtype)
        return contextlib.nullcontext()
