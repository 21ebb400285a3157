"""Drawing backends: descriptions in, images out (BiDiffuser and the released LLM-to-diffusion bridges).

Sits beside ``bidiffuser`` (which it may import) and below ``easygen`` (which it never imports)."""
from .backend import DrawingBackend, DrawingError, DrawingSettings, draw_in_batches
from .registry import BACKENDS, load_backend

__all__ = ["BACKENDS", "DrawingBackend", "DrawingError", "DrawingSettings", "draw_in_batches", "load_backend"]
