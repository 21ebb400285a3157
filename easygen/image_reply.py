"""Image replies: an answer holding ``<Img>description</Img>`` gets the description drawn by a
drawing backend (BiDiffuser through CLIP or its bridge, or a released system: ``drawing``) and
saved as PNG."""
from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Callable

from bidiffuser.images import save_png
from drawing import DrawingBackend

from .constants import IMAGE_PLACEHOLDER, IMG_CLOSE, IMG_OPEN

_IMG_TAG = re.compile(re.escape(IMG_OPEN) + r"(.*?)" + re.escape(IMG_CLOSE), re.S)


def find_image_requests(text: str) -> list[str]:
    """Descriptions inside ``<Img>...</Img>`` (empty ones and image placeholders are skipped)."""
    found = (m.strip() for m in _IMG_TAG.findall(text))
    return [d for d in found if d and d != IMAGE_PLACEHOLDER]


def render_image_replies(drawer: DrawingBackend, descriptions: list[str], out_dir: str | Path,
                         steps: int | None = None, scale: float | None = None, seed: int | None = None,
                         progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Draw each description once (picture i with seed + i; steps and scale None: the backend's
    own defaults); returns the PNG paths (unique names under ``out_dir``)."""
    paths = []
    for i, description in enumerate(descriptions):
        image, = drawer.draw([description], [None if seed is None else seed + i], steps=steps, guidance=scale,
                             progress=progress)
        # a full uuid4: a server may link to the file, so its name must be unguessable
        paths.append(save_png(image, Path(out_dir) / f"easygen-{uuid.uuid4().hex}.png"))
    return paths


def has_stray_tags(text: str) -> bool:
    """True when ``text`` holds an ``<Img>`` or ``</Img>`` outside a complete tag (say, an answer
    cut off in the middle of a picture's description)."""
    rest = _IMG_TAG.sub("", text)
    return IMG_OPEN in rest or IMG_CLOSE in rest


def replace_image_tags(text: str, render: Callable[[str, int], str]) -> str:
    """``text`` for a reader: the k-th ``<Img>description</Img>`` (as ``find_image_requests``
    counts them) becomes ``render(description, k)``; an empty tag disappears; a stray or unclosed
    tag loses its mark and keeps its words. No raw tag survives."""
    count = 0

    def one(m: re.Match) -> str:
        nonlocal count
        description = m.group(1).strip()
        if not description or description == IMAGE_PLACEHOLDER:
            return ""
        count += 1
        return render(description, count - 1)

    text = _IMG_TAG.sub(one, text)
    return text.replace(IMG_OPEN, "").replace(IMG_CLOSE, "")


class ImageTagStream:
    """Streams an answer's text while hiding its image tags: pieces up to the first ``<Img>`` (or
    stray ``</Img>``) pass as they come, a piece that may be the start of a tag waits for the next,
    and everything from the first tag on is held back for ``finish``, which renders it with
    ``replace_image_tags`` once the pictures exist. The pieces and the finish, joined, equal
    ``replace_image_tags`` of the whole text."""

    def __init__(self):
        self.text, self.sent, self.tagged = "", 0, False

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.tagged:
            return ""
        at = min((i for i in (self.text.find(IMG_OPEN), self.text.find(IMG_CLOSE)) if i >= 0), default=-1)
        if at >= 0:
            self.tagged, end = True, at
        else:  # hold back a tail that could still grow into a tag
            end = len(self.text)
            for k in range(1, len(IMG_CLOSE)):
                tail = self.text[-k:]
                if IMG_OPEN.startswith(tail) or IMG_CLOSE.startswith(tail):
                    end = len(self.text) - k
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self, render: Callable[[str, int], str], text: str | None = None) -> str:
        """The rest, rendered. ``text`` (the final answer, if it differs from what was fed) wins."""
        full = self.text if text is None else text
        sent = self.text[:self.sent]
        for shown in (sent, sent.lstrip()):  # the final answer may be the streamed text, stripped
            if full.startswith(shown):
                return replace_image_tags(full[len(shown):], render)
        return replace_image_tags(full, render)
