"""Backends by name: ``load_backend("ella", path, ...)`` imports only the backend asked for."""
from __future__ import annotations

import importlib
import os

from .backend import DrawingBackend, DrawingError

# name -> module with ``load(path, device=..., dtype=..., **options) -> DrawingBackend``
BACKENDS = {
    "bidiffuser": "drawing.bidiffuser_backend",
    "ella": "drawing.ella",
    "lavi-bridge": "drawing.lavi_bridge",
    "paradiffusion": "drawing.paradiffusion",
}


def load_backend(name: str, path: str | os.PathLike, device=None, dtype: str | None = None,
                 **options) -> DrawingBackend:
    """The backend ``name`` from the files under ``path`` (each backend's module documents its layout)."""
    if name not in BACKENDS:
        raise DrawingError(f"unknown drawing backend {name!r} (choose from {', '.join(BACKENDS)})")
    module = importlib.import_module(BACKENDS[name])
    return module.load(path, device=device, dtype=dtype, **options)
