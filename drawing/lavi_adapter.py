"""LaVi-Bridge's ``TextAdapter``: language-model states to the diffusion model's text width, per token.

Same layers and key names as ``modules/adapters.py`` of ShihaoZhaoZSH/LaVi-Bridge@5a725f3 (a diffusers
``ModelMixin`` there, saved as ``adapter/config.json`` + ``diffusion_pytorch_model.{bin,safetensors}``):
``norm1 -> ff1 -> norm2 -> ff2``, each feed-forward a GEGLU (``net.0.proj``, to 2 x 4 x dim), dropout
and a linear (``net.2``). Dropout is off at inference, so it is left out.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bidiffuser.checkpoint import atomic_path, load_strict, read_json, read_state_dict, save_safetensors
from bidiffuser.errors import BiDiffuserError

from .backend import DrawingError
from .lavi_lora import save_pickle

CONFIG, WEIGHTS = "config.json", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: int, mult: int = 4):
        super().__init__()
        inner = int(dim * mult)
        # index 1 is the reference's Dropout(0.1): an identity at inference, kept so keys stay net.0 / net.2
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim_out))

    def forward(self, x):
        return self.net(x)


class TextAdapter(nn.Module):
    def __init__(self, in_dim: int, int_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.int_dim, self.out_dim = in_dim, int_dim, out_dim
        self.ff1 = FeedForward(in_dim, int_dim)
        self.ff2 = FeedForward(int_dim, out_dim)
        self.norm1 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(int_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff2(self.norm2(self.ff1(self.norm1(x))))

    def config(self) -> dict:
        # what diffusers' save_pretrained writes for the reference's class
        return {"_class_name": "TextAdapter", "_diffusers_version": "0.24.0",
                "in_dim": self.in_dim, "int_dim": self.int_dim, "out_dim": self.out_dim}


def adapter_weights_file(directory: str | os.PathLike) -> Path:
    """The adapter's weight file: safetensors first, as diffusers' ``from_pretrained`` prefers."""
    directory = Path(directory)
    for name in WEIGHTS:
        if (directory / name).is_file():
            return directory / name
    raise DrawingError(f"{directory}: no adapter weights ({' or '.join(WEIGHTS)})")


def load_adapter(directory: str | os.PathLike, device="cpu", dtype=torch.float32) -> TextAdapter:
    """A released ``adapter/`` folder, strictly (every key, every shape)."""
    directory = Path(directory)
    try:
        cfg = read_json(directory / CONFIG, "adapter config")
        dims = [cfg.get(k) for k in ("in_dim", "int_dim", "out_dim")]
        if not all(isinstance(d, int) and d > 0 for d in dims):
            raise DrawingError(f"{directory / CONFIG}: in_dim, int_dim and out_dim must be positive integers "
                               f"(got {dims})")
        adapter = TextAdapter(*dims)
        path = adapter_weights_file(directory)
        load_strict(adapter, read_state_dict(path, "adapter weights", dtype=torch.float32), path)
    except DrawingError:
        raise
    except BiDiffuserError as e:
        raise DrawingError(str(e)) from None
    return adapter.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_adapter(adapter: TextAdapter, directory: str | os.PathLike, safetensors: bool = True) -> Path:
    """Write ``adapter`` in the released layout (``.bin`` as the U-Net releases, safetensors as PixArt's)."""
    import json
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    if safetensors:
        save_safetensors(sd, directory / WEIGHTS[0])
    else:
        save_pickle(sd, directory / WEIGHTS[1])
    with atomic_path(directory / CONFIG) as tmp:
        Path(tmp).write_text(json.dumps(adapter.config(), indent=2, sort_keys=True) + "\n")
    return directory
