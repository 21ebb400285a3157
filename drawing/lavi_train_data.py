"""Training examples for LaVi-Bridge: the project's captions TSV (``image_path<TAB>caption``, as
LaVi-Bridge's own ``--anno_path`` file) and the image transform of its ``train/*.py``::

    Resize(resolution, BILINEAR) -> CenterCrop(resolution) -> RandomHorizontalFlip() -> ToTensor -> Normalize(0.5, 0.5)

done here on PIL as torchvision does it on a PIL image (torchvision is not a dependency). The flip
comes from the example's own generator, so every draw is reproducible and resumable.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from bidiffuser.captions import read_caption_tsv
from bidiffuser.images import load_image


def read_rows(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
              skip_bad_rows: bool = False) -> tuple[list[tuple[str, str]], int]:
    """``([(absolute image path, caption), ...], rows skipped)``; a malformed row or a missing image is
    a ``file:line: problem`` error unless ``skip_bad_rows``. (The scripts instead resample another row
    whenever one fails, which hides a broken file for a whole run.)"""
    return read_caption_tsv(path, image_root, "skip" if skip_bad_rows else "raise", check_images=True)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's ``Resize(size)`` (shorter side to ``size``, bilinear) then ``CenterCrop(size)``."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def image_tensor(path: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """(3, size, size) in [-1, 1]; flipped left-right with probability 0.5 (one draw of ``generator``)."""
    image = resize_center_crop(load_image(path), size)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(-1)
    return x * 2 - 1
