"""Train the small components of a BiDiffuser directory from scratch: the VAE and the caption decoder.

The official components come pre-trained; a new, small world (the shapes demo, a domain of your own)
needs them trained on its own images and captions before the U-ViT can learn anything. Both
functions read the component from the directory, train it in one process (these nets are small),
and write it back in the official file format, updating ``bidiffuser.json`` where a config value
changes. CLIP stays as it is (frozen: any fixed encoder that separates the inputs will do).

* VAE: reconstruction MSE + ``kl_weight`` x KL of the posterior, then ``scale_factor`` is set so that
  scaled latents have unit variance (what Stable Diffusion's 0.18215 does for its VAE).
* Caption decoder: GPT-2 learns to continue decode_prefix(encode_prefix(CLIP text(caption))) with the
  caption and '<|EOS|>'. ``encode_prefix`` is then rescaled (``decode_prefix`` inversely, so the
  decoder's function is unchanged) to make the text latents unit-variance for the diffusion model.
"""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .autoencoder import load_autoencoder, official_state_dict as vae_official_state_dict
from .caption_decoder import load_caption_decoder, official_state_dict as decoder_official_state_dict
from .checkpoint import save_torch
from .clip import load_clip_text_encoder
from .images import center_crop_resize, load_image, pil_to_tensor
from .model_dir import BiDiffuserConfig, read_config, write_config

Progress = Callable[[int, int, float], None]  # (step, total, loss)


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """``steps`` index batches from seeded reshuffles of range(n) (the last partial batch of a pass is dropped)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = list(range(n))
            rng.shuffle(order)
        yield order[:batch_size]
        order = order[batch_size:]


def train_autoencoder(model_dir: str | os.PathLike, images: Sequence[str | os.PathLike], steps: int = 1000,
                      batch_size: int = 32, lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0,
                      progress: Progress | None = None) -> BiDiffuserConfig:
    """Train the directory's VAE on ``images`` (paths) and write it back; returns the new config."""
    cfg = read_config(model_dir)
    if len(images) < batch_size:
        raise ValueError(f"{len(images)} images is fewer than one batch of {batch_size}")
    pixels = pil_to_tensor([center_crop_resize(load_image(p), cfg.resolution) for p in images])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = load_autoencoder(cfg.path("autoencoder"), cfg.autoencoder).train().requires_grad_(True)
        opt = torch.optim.AdamW(vae.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
        for step, idx in enumerate(_batches(len(pixels), batch_size, steps, seed), 1):
            x = pixels[idx]
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            loss = F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if progress:
                progress(step, steps, loss.item())
        vae.eval().requires_grad_(False)
        with torch.no_grad():  # unit-variance scaled latents, measured on (up to) 512 images
            std = torch.cat([vae.encode(pixels[i:i + 64]).latent_dist.mean for i in range(0, min(len(pixels), 512), 64)]).std()
    autoencoder = dataclasses.replace(cfg.autoencoder, scale_factor=float(1.0 / std))
    save_torch(vae_official_state_dict(vae, autoencoder), cfg.path("autoencoder"))
    cfg = dataclasses.replace(cfg, autoencoder=autoencoder)
    write_config(cfg)
    return cfg


def train_caption_decoder(model_dir: str | os.PathLike, captions: Sequence[str], steps: int = 1000,
                          batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                          progress: Progress | None = None) -> BiDiffuserConfig:
    """Train the directory's caption decoder (and its encode/decode_prefix) on ``captions``; write it back."""
    cfg = read_config(model_dir)
    captions = sorted(set(captions))
    if not captions:
        raise ValueError("no captions to train the caption decoder on")
    clip_text = load_clip_text_encoder(cfg.path("clip_text"), max_length=cfg.uvit.num_text_tokens)
    with torch.no_grad():
        features = torch.cat([clip_text.encode(captions[i:i + 256]) for i in range(0, len(captions), 256)])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        decoder = load_caption_decoder(cfg.path("caption_decoder"), cfg.caption_decoder, cfg.path("tokenizer"))
        tok = decoder.tokenizer
        ids = [tok(c)["input_ids"] + [decoder.eos_token_id] for c in captions]
        decoder.train().requires_grad_(True)
        opt = torch.optim.AdamW(decoder.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
        for step, idx in enumerate(_batches(len(captions), min(batch_size, len(captions)), steps, seed), 1):
            width = max(len(ids[i]) for i in idx)
            tokens = torch.tensor([ids[i] + [decoder.eos_token_id] * (width - len(ids[i])) for i in idx])
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in idx])
            loss = decoder(tokens, features[idx], attention_mask=mask)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if progress:
                progress(step, steps, loss.item())
        decoder.eval().requires_grad_(False)
        with torch.no_grad():  # unit-variance text latents; decode_prefix compensates exactly
            std = decoder.encode_prefix(features).std()
            decoder.encode_prefix.weight.div_(std)
            decoder.encode_prefix.bias.div_(std)
            decoder.decode_prefix.weight.mul_(std)
    save_torch(decoder_official_state_dict(decoder), cfg.path("caption_decoder"))
    return cfg


def caption_decoder_accuracy(model_dir: str | os.PathLike, captions: Sequence[str]) -> float:
    """Share of ``captions`` the caption decoder reproduces exactly from their own text latents."""
    from .pipeline import BiDiffuser

    pipe = BiDiffuser.from_pretrained(Path(model_dir))
    captions = list(captions)
    decoded = pipe.decode_texts(pipe.encode_prompts(captions))
    return sum(d.strip() == c.strip() for d, c in zip(decoded, captions)) / max(len(captions), 1)
