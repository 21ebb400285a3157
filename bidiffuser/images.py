"""Image files in and out: validation with one-line errors, UniDiffuser's crop/resize, tensors."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import atomic_path
from .errors import BiDiffuserError

ImageInput = Union[str, os.PathLike, Image.Image]

# Pillow refuses images above this many pixels (decompression-bomb guard); we say so plainly.
MAX_PIXELS = 8192 * 8192


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, or raise a one-line BiDiffuserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise BiDiffuserError(f"image not found: {path}")
    if not path.is_file():
        raise BiDiffuserError(f"not a file: {path}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise BiDiffuserError(f"image too large ({im.width}x{im.height} pixels): {path}")
            im.load()  # decode now so a truncated file fails here, not later
            return im.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise BiDiffuserError(f"not an image file (or an unsupported format): {path}") from None
    except OSError as e:
        raise BiDiffuserError(f"corrupt or truncated image {path}: {e}") from None


def as_pil(image: ImageInput) -> Image.Image:
    """A PIL RGB image from a path or a PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    raise BiDiffuserError(f"expected an image path or PIL image, got {type(image).__name__}")


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """UniDiffuser's preprocessing: the largest centred square, resized to ``resolution`` (Lanczos)."""
    w, h = image.size
    if min(w, h) < 1:
        raise BiDiffuserError(f"image has no pixels ({w}x{h})")
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((resolution, resolution), Image.LANCZOS)


def pil_to_tensor(images: Iterable[Image.Image]) -> torch.Tensor:
    """PIL images (same size) -> B x 3 x H x W float tensor in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """B x 3 x H x W tensor in [-1, 1] -> PIL images (values clamped, rounded)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
