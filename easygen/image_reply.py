"""Image replies: an answer holding ``<Img>description</Img>`` gets the description drawn by
BiDiffuser (CLIP text encoder -> encode_prefix -> text-to-image -> VAE) and saved as PNG."""
from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Callable

from bidiffuser.images import save_png
from bidiffuser.pipeline import BiDiffuser

from .constants import IMAGE_PLACEHOLDER, IMG_CLOSE, IMG_OPEN

_IMG_TAG = re.compile(re.escape(IMG_OPEN) + r"(.*?)" + re.escape(IMG_CLOSE), re.S)


def find_image_requests(text: str) -> list[str]:
    """Descriptions inside ``<Img>...</Img>`` (empty ones and image placeholders are skipped)."""
    found = (m.strip() for m in _IMG_TAG.findall(text))
    return [d for d in found if d and d != IMAGE_PLACEHOLDER]


def render_image_replies(pipe: BiDiffuser, descriptions: list[str], out_dir: str | Path, steps: int = 50,
                         scale: float = 7.0, seed: int | None = None,
                         progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Draw each description once; returns the PNG paths (unique names under ``out_dir``)."""
    paths = []
    for i, description in enumerate(descriptions):
        image = pipe.text_to_image(description, steps=steps, scale=scale,
                                   seed=None if seed is None else seed + i, progress=progress).images[0]
        paths.append(save_png(image, Path(out_dir) / f"easygen-{uuid.uuid4().hex[:10]}.png"))
    return paths
