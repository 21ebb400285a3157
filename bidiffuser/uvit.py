"""The UniDiffuser-v1 U-ViT: one transformer that denoises an image latent, a CLIP image embedding
and a 77-token text latent jointly, each modality with its own timestep.

Parameter names follow the official ``uvit_v1.pth`` exactly so it loads with ``strict=True``.
Token layout: [t_img, t_text, data_type, text x77, clip_img, image patches]. Blocks are post-LN,
the second half of the blocks receives long skips from the first half (U-Net style).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config_base import DictConfig


@dataclass
class UViTConfig(DictConfig):
    img_size: int = 64          # side of the (square) VAE latent the position table was trained for
    in_chans: int = 4           # latent channels
    patch_size: int = 2
    embed_dim: int = 1536
    depth: int = 30             # in_blocks = out_blocks = depth // 2, plus one mid block
    num_heads: int = 24
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    text_dim: int = 64          # text latent width (CLIP text 768 -> caption decoder encode_prefix -> 64)
    num_text_tokens: int = 77
    clip_img_dim: int = 512     # CLIP ViT-B/32 image embedding
    mlp_time_embed: bool = False
    num_data_types: int = 2     # v1's data-type token: 0 = webdataset pairs, 1 = "high quality" (sampling default)
    use_checkpoint: bool = False

    @classmethod
    def v1(cls) -> "UViTConfig":
        """The official 952M UniDiffuser-v1 network (512x512 images, 64x64x4 latents)."""
        return cls()

    @classmethod
    def tiny(cls) -> "UViTConfig":
        """A few-thousand-parameter network for tests and for trying the tool without weights."""
        return cls(img_size=16, patch_size=2, embed_dim=32, depth=2, num_heads=2, text_dim=8,
                   clip_img_dim=16)



    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, shape N x dim."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Post-LN transformer block; ``skip`` blocks first fuse a long skip (concat + linear + norm1)."""

    def __init__(self, cfg: UViTConfig, skip: bool = False):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim) if skip else None
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = cfg.use_checkpoint

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.norm1(self.skip_linear(torch.cat([x, skip], dim=-1)))
        x = self.norm2(x + self.attn(x))
        return self.norm3(x + self.mlp(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _per_sample(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Timesteps as a length-``batch`` vector (a single value is broadcast)."""
    t = torch.as_tensor(t).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def _time_mlp(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))


class UViT(nn.Module):
    def __init__(self, config: UViTConfig):
        super().__init__()
        cfg = self.config = config
        D = cfg.embed_dim
        if cfg.img_size % cfg.patch_size or cfg.embed_dim % cfg.num_heads:
            raise ValueError("img_size must be a multiple of patch_size and embed_dim of num_heads")
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.time_img_embed = _time_mlp(D) if cfg.mlp_time_embed else nn.Identity()
        self.time_text_embed = _time_mlp(D) if cfg.mlp_time_embed else nn.Identity()
        self.text_embed = nn.Linear(cfg.text_dim, D)
        self.text_out = nn.Linear(D, cfg.text_dim)
        self.clip_img_embed = nn.Linear(cfg.clip_img_dim, D)
        self.clip_img_out = nn.Linear(D, cfg.clip_img_dim)
        # The official table covers [t_img, t_text, text, clip_img, patches]; the data-type token
        # was added in v1 with its own position parameter, spliced in after the two time tokens.
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + cfg.num_text_tokens + 1 + cfg.num_patches, D))
        self.in_blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth // 2)])
        self.mid_block = Block(cfg)
        self.out_blocks = nn.ModuleList([Block(cfg, skip=True) for _ in range(cfg.depth // 2)])
        self.norm = nn.LayerNorm(D)
        self.decoder_pred = nn.Linear(D, cfg.patch_size ** 2 * cfg.in_chans)
        self.token_embedding = nn.Embedding(cfg.num_data_types, D)
        self.pos_embed_token = nn.Parameter(torch.zeros(1, 1, D))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Positional embeddings with the data-type slot, patch part resized for other latent sizes."""
        cfg = self.config
        head = self.pos_embed[:, : 2 + cfg.num_text_tokens + 1]
        patches = self.pos_embed[:, 2 + cfg.num_text_tokens + 1:]
        base = cfg.img_size // cfg.patch_size
        if (grid_h, grid_w) != (base, base):
            grid = patches.reshape(1, base, base, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bilinear").to(patches.dtype)
            patches = grid.flatten(2).transpose(1, 2)
        return torch.cat([head[:, :2], self.pos_embed_token, head[:, 2:], patches], dim=1)

    def forward(self, img: torch.Tensor, clip_img: torch.Tensor, text: torch.Tensor,
                t_img: torch.Tensor, t_text: torch.Tensor, data_type: torch.Tensor | int = 1):
        """img B x C x H x W latent, clip_img B x 1 x clip_img_dim, text B x 77 x text_dim;
        t_img / t_text 1-D timesteps in [0, 1000] (fractional allowed); returns the three noise
        predictions with the shapes of the inputs."""
        cfg = self.config
        B, _, H, W = img.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of the patch size {p}")
        if not torch.is_tensor(data_type):
            data_type = torch.full((B,), int(data_type), dtype=torch.long, device=img.device)
        D = cfg.embed_dim
        tokens = torch.cat([
            self.time_img_embed(timestep_embedding(_per_sample(t_img, B), D)).unsqueeze(1),
            self.time_text_embed(timestep_embedding(_per_sample(t_text, B), D)).unsqueeze(1),
            self.token_embedding(data_type.long()).unsqueeze(1),
            self.text_embed(text),
            self.clip_img_embed(clip_img),
            self.patch_embed(img),
        ], dim=1)
        x = tokens.to(self.pos_embed.dtype) + self._position_table(H // p, W // p)

        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.norm(x)

        n_text = text.shape[1]
        text_out = self.text_out(x[:, 3: 3 + n_text])
        clip_img_out = self.clip_img_out(x[:, 3 + n_text: 4 + n_text])
        patches = self.decoder_pred(x[:, 4 + n_text:])
        # Unpatchify: token (h, w) holds a p x p x C patch flattened as (p1 p2 C).
        img_out = patches.reshape(B, H // p, W // p, p, p, cfg.in_chans).permute(0, 5, 1, 3, 2, 4)
        img_out = img_out.reshape(B, cfg.in_chans, H, W)
        return img_out, clip_img_out, text_out


def load_uvit(path, config: UViTConfig, device="cpu", dtype=torch.float32) -> UViT:
    """Load ``uvit_v1.pth`` / EasyGen's ``uvit_bi.pth`` (plain state dict, optional ``module.``
    prefix) or our safetensors into a U-ViT built from ``config``, strictly."""
    from .checkpoint import load_strict, read_state_dict, strip_prefix

    # Built on the meta device and given the file's tensors, already in ``dtype``: the 952M U-ViT
    # is held once, not as a state dict plus a model plus a converted copy.
    sd = strip_prefix(read_state_dict(path, "U-ViT checkpoint", dtype=dtype))
    with torch.device("meta"):
        model = UViT(config)
    load_strict(model, sd, path, assign=True)
    return model.to(device=device, dtype=dtype).eval()
