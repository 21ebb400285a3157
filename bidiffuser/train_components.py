"""Train the small components of a BiDiffuser directory from scratch: CLIP, the VAE, the caption decoder.

The official components come pre-trained; a new, small world (the shapes demo, a domain of your own)
needs them trained on its own images and captions before the U-ViT can learn anything. Each
function reads the component from the directory, trains it in one process (these nets are small),
and writes it back in the official file format (in place), updating ``bidiffuser.json`` where a config
value changes.

* CLIP: the image and text towers learn CLIP's contrastive objective on (image, caption) pairs, with
  a temporary text projection (UniDiffuser reads the text tower's hidden states, not a projection).
  Pairs with the same caption text count as matches.

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
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .autoencoder import load_autoencoder, official_state_dict as vae_official_state_dict
from .caption_decoder import load_caption_decoder, official_state_dict as decoder_official_state_dict
from .checkpoint import atomic_dir, save_torch
from .errors import BiDiffuserError
from .clip import load_clip_image_encoder, load_clip_text_encoder
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


def _fit(params, loss_of: Callable[[list[int]], torch.Tensor], n: int, batch_size: int, steps: int, lr: float,
         seed: int, progress: Progress | None) -> None:
    """AdamW with a one-cycle schedule over ``steps`` seeded batches of indices into range(n)."""
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step, idx in enumerate(_batches(n, batch_size, steps, seed), 1):
        loss = loss_of(idx)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress:
            progress(step, steps, loss.item())


def train_clip(model_dir: str | os.PathLike, images: Sequence[str | os.PathLike], captions: Sequence[str],
               steps: int = 300, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
               progress: Progress | None = None) -> BiDiffuserConfig:
    """Contrastive training of the directory's CLIP image and text encoders on ``images[i]``/``captions[i]``."""
    cfg = read_config(model_dir)
    if cfg.clip_backend != "transformers":
        raise BiDiffuserError(f"train_clip trains transformers CLIP directories; {cfg.root} uses clip_backend "
                              f"'{cfg.clip_backend}'")
    if cfg.path("clip_image").resolve() == cfg.path("clip_text").resolve():
        raise BiDiffuserError(f"{cfg.root}: clip_image and clip_text are one folder; give each tower its own to train")
    if len(images) != len(captions) or len(images) < 2:
        raise ValueError(f"need at least 2 (image, caption) pairs, got {len(images)} images and "
                         f"{len(captions)} captions")
    image_encoder = load_clip_image_encoder(cfg.path("clip_image"), backend=cfg.clip_backend)
    text_encoder = load_clip_text_encoder(cfg.path("clip_text"), max_length=cfg.uvit.num_text_tokens)
    pixels = image_encoder.preprocess([load_image(p) for p in images])
    ids = text_encoder.tokenize(list(captions))
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vision, text = image_encoder.model, text_encoder.model
        vision.train().requires_grad_(True)
        text.train().requires_grad_(True)
        head = torch.nn.Linear(text.config.hidden_size, vision.config.projection_dim, bias=False)
        log_scale = torch.nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's initial temperature
        params = [*vision.parameters(), *text.parameters(), *head.parameters(), log_scale]

        def loss_of(idx):
            img = F.normalize(vision(pixel_values=pixels[idx]).image_embeds, dim=-1)
            txt = F.normalize(head(text(input_ids=ids[idx]).pooler_output), dim=-1)
            logits = log_scale.clamp(max=4.6052).exp() * img @ txt.T
            target = same[idx][:, idx]
            target = target / target.sum(1, keepdim=True)  # duplicate captions share the probability
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2

        _fit(params, loss_of, len(images), min(batch_size, len(images)), steps, lr, seed, progress)
    # New folders replace the old ones whole (a crash leaves the old model; a symlinked component is
    # replaced, never written through into the model it points at).
    with atomic_dir(cfg.path("clip_image")) as tmp:
        vision.eval().requires_grad_(False).save_pretrained(str(tmp))
    with atomic_dir(cfg.path("clip_text")) as tmp:
        text.eval().requires_grad_(False).save_pretrained(str(tmp))
        text_encoder.tokenizer.save_pretrained(str(tmp))
    return cfg


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

        def loss_of(idx):
            posterior = vae.encode(pixels[idx]).latent_dist
            recon = vae.decode(posterior.sample()).sample
            return F.mse_loss(recon, pixels[idx]) + kl_weight * posterior.kl().mean()

        _fit(vae.parameters(), loss_of, len(pixels), batch_size, steps, lr, seed, progress)
        vae.eval().requires_grad_(False)
        with torch.no_grad():  # unit-variance scaled latents, measured on (up to) 512 images
            means = [vae.encode(pixels[i:i + 64]).latent_dist.mean for i in range(0, min(len(pixels), 512), 64)]
            std = torch.cat(means).std()
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

        def loss_of(idx):
            width = max(len(ids[i]) for i in idx)
            tokens = torch.tensor([ids[i] + [decoder.eos_token_id] * (width - len(ids[i])) for i in idx])
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in idx])
            return decoder(tokens, features[idx], attention_mask=mask)

        _fit(decoder.parameters(), loss_of, len(captions), min(batch_size, len(captions)), steps, lr, seed, progress)
        decoder.eval().requires_grad_(False)
        with torch.no_grad():  # unit-variance text latents; decode_prefix compensates exactly
            std = decoder.encode_prefix(features).std()
            decoder.encode_prefix.weight.div_(std)
            decoder.encode_prefix.bias.div_(std)
            decoder.decode_prefix.weight.mul_(std)
    save_torch(decoder_official_state_dict(decoder), cfg.path("caption_decoder"))
    return cfg

