"""The projection layer that turns BiDiffuser image features into LLM input embeddings.

EasyGen's projector is a two-layer MLP, 768 -> 3072 -> 4096 with GELU (its released checkpoints
name it ``model.fastchat_proj.fc1/fc2``). A single linear layer is offered as in LLaVA-1.0.
"""
from __future__ import annotations

from torch import nn

PROJECTOR_TYPES = ("mlp", "linear")


class MLPProjector(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LinearProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return self.fc1(x)


def build_projector(projector_type: str, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Projector factory: ``mlp`` (EasyGen's default) or ``linear``."""
    if projector_type == "mlp":
        return MLPProjector(in_dim, hidden_dim, out_dim)
    if projector_type == "linear":
        return LinearProjector(in_dim, out_dim)
    raise ValueError(f"unknown projector_type {projector_type!r} (choose from {', '.join(PROJECTOR_TYPES)})")
