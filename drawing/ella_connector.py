"""ELLA's timestep-aware semantic connector (TSC), written anew with the released file's key names.

The connector turns T5 hidden states (N x input_dim) and the U-Net's current timestep into
``num_latents`` x width states for the U-Net's cross-attention: learned latents, shifted by the
timestep embedding, pass through perceiver blocks (attention over [latents; T5 states]) whose
layer norms are modulated by the timestep (AdaLN). Same computation, parameter names and shapes as
ELLA's ``model.py`` (TencentQQGYLab/ELLA at 3c228f1), so ``ella-sd1.5-tsc-t5xl.safetensors`` loads as is.
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine weights, scaled and shifted by a projection of the timestep embedding."""

    def __init__(self, dim: int, time_embed_dim: int):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(nn.functional.silu(temb)).view(len(x), 1, -1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(torch.relu(x))


class PerceiverBlock(nn.Module):
    def __init__(self, width: int, heads: int, time_embed_dim: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("sq_relu", SquaredReLU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_1 = AdaLayerNorm(width, time_embed_dim)
        self.ln_2 = AdaLayerNorm(width, time_embed_dim)
        self.ln_ff = AdaLayerNorm(width, time_embed_dim)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        q = self.ln_1(latents, temb)
        kv = torch.cat([q, self.ln_2(x, temb)], dim=1)  # the latents attend to themselves and the text
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.mlp(self.ln_ff(latents, temb))


class PerceiverResampler(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, num_latents: int, input_dim: int, time_embed_dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(num_latents, width))
        self.time_aware_linear = nn.Linear(time_embed_dim, width)
        self.proj_in = nn.Linear(input_dim, width)
        self.perceiver_blocks = nn.Sequential(*[PerceiverBlock(width, heads, time_embed_dim) for _ in range(layers)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        latents = self.latents.unsqueeze(0).repeat(len(x), 1, 1) + self.time_aware_linear(nn.functional.silu(temb))
        x = self.proj_in(x)
        for block in self.perceiver_blocks:
            latents = block(x, latents, temb)
        return latents


class ELLAConnector(nn.Module):
    """``forward(t5_states B x N x input_dim, timestep) -> B x num_latents x width``.

    Defaults are the released ELLA-SD1.5 (``ELLA()`` in model.py): heads cannot be read from the
    file's shapes, so they come from here (8)."""

    def __init__(self, time_channel: int = 320, time_embed_dim: int = 768, width: int = 768, layers: int = 6,
                 heads: int = 8, num_latents: int = 64, input_dim: int = 2048):
        super().__init__()
        self.position = Timesteps(time_channel, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(in_channels=time_channel, time_embed_dim=time_embed_dim, act_fn="silu")
        self.connector = PerceiverResampler(width, layers, heads, num_latents, input_dim, time_embed_dim)

    def forward(self, states: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=states.device).view(-1)
        feature = self.position(t).to(states.device, dtype=states.dtype)
        feature = feature.unsqueeze(1).expand(len(states), -1, -1)  # one timestep for the whole batch
        return self.connector(states, self.time_embedding(feature))
