"""The captions TSV reader (``image_path<TAB>caption`` per line, as in LaVi-Bridge): the one reader
of this format, used by ``bidiffuser train`` and by EasyGen's data readers.

Relative image paths resolve against ``image_root`` (default: the TSV's folder). Blank lines are
ignored, and so is a first line that is a header (``image``/``image_path``/``path``/``file`` then
``caption``/``text``). A malformed row is an error naming ``file:line`` and the problem, or, with
``on_error="skip"``, left out and counted.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from .errors import BiDiffuserError

_HEADER_IMAGE = ("image", "image_path", "path", "file")
_HEADER_CAPTION = ("caption", "text")


def iter_caption_tsv(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                     check_images: bool = False) -> Iterator[tuple[int, str | None, str | None, str | None]]:
    """Every data row as ``(line number, absolute image path, caption, None)``, or
    ``(line number, None, None, problem)`` for a malformed one; callers decide what a problem means.

    Image files are not opened; ``check_images=True`` makes a row whose image file does not exist
    a malformed row too (trainers want that up front, not hours into a run).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BiDiffuserError(f"captions TSV not found: {path}") from None
    except IsADirectoryError:
        raise BiDiffuserError(f"captions TSV is a directory: {path}") from None
    except UnicodeDecodeError as e:
        raise BiDiffuserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if (lineno == 1 and len(fields) == 2 and fields[0].strip().lower() in _HEADER_IMAGE
                and fields[1].strip().lower() in _HEADER_CAPTION):
            continue
        if len(fields) != 2:
            yield lineno, None, None, f"expected 'image_path<TAB>caption', got {len(fields)} tab-separated field(s)"
        elif not fields[0].strip():
            yield lineno, None, None, "empty image path"
        elif not fields[1].strip():
            yield lineno, None, None, "empty caption"
        else:
            image = os.path.abspath(root / fields[0].strip())  # an absolute path stays itself
            if check_images and not os.path.isfile(image):
                yield lineno, None, None, f"image not found: {image}"
            else:
                yield lineno, image, fields[1].strip(), None


def read_caption_tsv(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                     on_error: str = "raise", check_images: bool = False) -> tuple[list[tuple[str, str]], int]:
    """Returns ``([(absolute image path, caption), ...], number of rows skipped)``; a malformed row
    raises ``file:line: problem`` unless ``on_error="skip"``."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    rows, skipped = [], 0
    for lineno, image, caption, problem in iter_caption_tsv(path, image_root, check_images):
        if problem is None:
            rows.append((image, caption))
        elif on_error == "skip":
            skipped += 1
        else:
            raise BiDiffuserError(f"{path}:{lineno}: {problem}")
    return rows, skipped
