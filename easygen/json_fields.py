"""Checked access to the JSON of data files, shared by the training readers and the benchmark readers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from easygen.errors import EasyGenError


class BadRow(ValueError):
    """A malformed row; the message says what is wrong (the caller adds where)."""


def json_list(doc: Any, key: str, path: Path) -> list:
    """The top-level list ``doc[key]`` of a JSON data file, else a one-line error naming the file."""
    if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
        raise EasyGenError(f"{path}: expected a JSON object with a '{key}' list")
    return doc[key]


def json_field(entry: Any, key: str, types: type | tuple[type, ...]) -> Any:
    """``entry[key]``, checked to be present and of ``types`` (bool is not int), else ``BadRow``."""
    if not isinstance(entry, dict):
        raise BadRow(f"expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise BadRow(f"missing '{key}'")
    value = entry[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise BadRow(f"'{key}' should be {names}, got {type(value).__name__}")
    return value
