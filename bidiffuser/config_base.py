"""Component configs are dataclasses stored in ``bidiffuser.json``; this gives them the JSON round trip."""
from __future__ import annotations

import dataclasses
from typing import Mapping

from .errors import BiDiffuserError


class DictConfig:
    """Mixin for dataclass configs: ``to_dict`` / ``from_dict`` (unknown fields are an error, not ignored)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping):
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise BiDiffuserError(f"{cls.__name__}: unknown fields {', '.join(unknown)}")
        return cls(**d)
