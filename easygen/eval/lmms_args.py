"""``--model_args`` of lmms-eval's ``easygen`` model, checked into one settings object.

lmms-eval turns ``key=value,...`` into keyword arguments (numbers and booleans already converted)
and adds ``batch_size``, ``max_batch_size`` and ``device`` from its own flags. A bad key or value is
one ``EasyGenError`` line naming it. The model and BiDiffuser settings left unset are resolved as
``easygen chat`` resolves them (``resolve_model``): no ``pretrained`` means the built-in shapes demo,
and a demo model reads and draws with its recipe's BiDiffuser settings.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from bidiffuser.cliutil import DTYPE_NAMES, PRECISION_NAMES

from ..errors import EasyGenError
from .lmms_prompt import STYLES
from .prompts import DEFAULT_PROMPT_STYLE

NONE = ("", "none", "null")


@dataclass
class LmmsSettings:
    pretrained: str | None = None      # EasyGen model directory (default: the built-in shapes demo)
    model_base: str | None = None
    lora: str | None = None
    projector: str | None = None
    bidiffuser: str | None = None
    device: str | None = None
    dtype: str = "float32"
    bidiffuser_dtype: str = "auto"
    quantization: str | None = None    # 8bit | 4bit
    batch_size: int = 1
    prompt_style: str = DEFAULT_PROMPT_STYLE
    feature_steps: int | None = None   # default: the demo recipe's, else 50
    feature_scale: float | None = None  # default: the demo recipe's, else 7
    feature_seed: int = 1234
    feature_cache: str | None = "default"  # a directory, "none", or the user cache (easygen chat's)
    images_out: str | None = None      # draw image replies here; replies become {"text", "images"} JSON
    image_steps: int | None = None     # default: the demo recipe's, else 50
    image_scale: float | None = None   # default: the demo recipe's, else 7
    seed: int | None = None


_INT = {"batch_size", "feature_steps", "feature_seed", "image_steps", "seed"}
_POSITIVE = {"batch_size", "feature_steps", "image_steps"}
_FLOAT = {"feature_scale", "image_scale"}
_CHOICES = {"dtype": DTYPE_NAMES, "bidiffuser_dtype": PRECISION_NAMES, "quantization": ("8bit", "4bit"),
            "prompt_style": STYLES}
IGNORED = {"max_batch_size"}  # lmms-eval passes it for --batch_size auto, which EasyGen does not do


def _value(key: str, raw):
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in NONE and key not in _CHOICES):
        return None
    if key in _INT or key in _FLOAT:
        try:
            value = int(raw) if key in _INT else float(raw)
            if key in _INT and isinstance(raw, float) and not raw.is_integer():
                raise ValueError
        except (TypeError, ValueError):
            kind = "an integer" if key in _INT else "a number"
            raise EasyGenError(f"model_args {key}={raw!r}: expected {kind}") from None
        if key in _POSITIVE and value < 1:
            raise EasyGenError(f"model_args {key}={raw!r}: must be at least 1")
        return value
    value = str(raw)
    if key in _CHOICES and value not in _CHOICES[key]:
        raise EasyGenError(f"model_args {key}={raw!r}: expected one of {', '.join(_CHOICES[key])}")
    return value


def parse(kwargs: dict) -> LmmsSettings:
    """Checked settings from lmms-eval's keyword arguments (before ``resolve``)."""
    known = {f.name for f in fields(LmmsSettings)}
    unknown = sorted(k for k in kwargs if k not in known and k not in IGNORED)
    if unknown:
        raise EasyGenError(f"unknown model_args key {unknown[0]!r} for the easygen model "
                           f"(known: {', '.join(sorted(known))})")
    given = {k: _value(k, v) for k, v in kwargs.items() if k in known}
    if given.get("batch_size") is None:  # lmms-eval passes None when its flag is absent
        given.pop("batch_size", None)
    return LmmsSettings(**given)


def resolve(s: LmmsSettings) -> LmmsSettings:
    """Fill the model path (the demo when absent) and the BiDiffuser settings left unset, exactly as
    the chat does, and the default feature store."""
    from ..cli.engine_args import resolve_model
    from bidiffuser.user_cache import user_cache_dir

    args = argparse.Namespace(model_path=s.pretrained, model_base=s.model_base, lora=s.lora,
                              projector=s.projector, bidiffuser=s.bidiffuser, bridge=None, steps=s.image_steps,
                              scale=s.image_scale, feature_steps=s.feature_steps, feature_scale=s.feature_scale)
    resolve_model(args)
    s.pretrained, s.image_steps, s.image_scale = args.model_path, args.steps, args.scale
    s.feature_steps, s.feature_scale = args.feature_steps, args.feature_scale
    if s.feature_cache == "default":
        s.feature_cache = str(user_cache_dir() / "features")
    if s.images_out is not None:
        s.images_out = str(Path(s.images_out).expanduser())
    return s
