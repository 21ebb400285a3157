"""Image features for the LLM: image -> BiDiffuser image-to-text latents (77 x text_dim) ->
caption decoder ``decode_prefix`` -> 77 x 768, with a content-addressed cache on disk.

The BiDiffuser pass (a full reverse diffusion per image) is by far the most expensive part of
EasyGen's input pipeline, so each image's result is computed once and stored under a key that
names everything it depends on: the image bytes, the BiDiffuser checkpoint, steps, scale and seed.

Results are deterministic per image: each image draws its noise from its own generator, seeded from
(seed, image hash), so an image's features do not depend on the other images in its batch (up to
float rounding of batched kernels), and a cached result stands in for a fresh one.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from safetensors import safe_open

from bidiffuser.checkpoint import save_safetensors
from bidiffuser.errors import BiDiffuserError
from bidiffuser.images import ImageInput, as_pil, load_image
from bidiffuser.pipeline import BiDiffuser, make_generator

log = logging.getLogger(__name__)

CACHE_FORMAT = "easygen-image-latents-v1"
Progress = Callable[[int, int], None]


def image_bytes(image: ImageInput) -> bytes:
    """The bytes an image is identified by: a file's own bytes, or PNG of an in-memory PIL image (RGB).

    Bad paths raise bidiffuser's one-line error naming the file.
    """
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()
    if not isinstance(image, (str, os.PathLike)):
        as_pil(image)  # raises the "expected an image path or PIL image" error
    try:
        return Path(image).read_bytes()
    except OSError:
        load_image(image)  # raises the one-line error (not found / not a file / unreadable)
        raise


def image_seed(seed: int, image_sha256: str) -> int:
    """The seed of one image's generator: the first 8 bytes of sha256("{seed}:{image sha256}")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{image_sha256}".encode()).digest()[:8], "big")


class ImageFeatureExtractor:
    """Images -> B x 77 x D float32 features (D = the caption decoder's n_embd: 768 for the real model).

    ``cache_dir`` (optional) holds one safetensors file per image, ``cache_dir/ab/<key>.safetensors``,
    with the 77 x text_dim latents (12x smaller than the features; ``decode_prefix`` is one cheap
    Linear). ``hits`` / ``misses`` count images served without / with a BiDiffuser pass.
    """

    def __init__(self, bidiffuser: BiDiffuser, steps: int = 50, scale: float = 7.0, seed: int = 1234,
                 cache_dir: str | os.PathLike | None = None, batch_size: int = 8):
        if steps < 1 or batch_size < 1:
            raise BiDiffuserError(f"steps and batch_size must be at least 1 (got {steps} and {batch_size})")
        self.bidiffuser = bidiffuser
        self.steps, self.scale, self.seed = int(steps), float(scale), int(seed)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.bidiffuser_fingerprint = bidiffuser.config.fingerprint()  # once: it reads the weight files
        u = bidiffuser.config.uvit
        self.latent_shape = (u.num_text_tokens, u.text_dim)
        self.hits = self.misses = 0

    # -- keys and the cache -------------------------------------------------------------------------
    def key(self, image_bytes: bytes) -> str:
        """Cache key of an image (see ``image_bytes``) under this extractor's checkpoint and settings."""
        return self._key(hashlib.sha256(image_bytes).hexdigest())

    def _key(self, image_sha256: str) -> str:
        return hashlib.sha256(json.dumps(self._metadata(image_sha256), sort_keys=True).encode()).hexdigest()

    def _metadata(self, image_sha256: str) -> dict[str, str]:
        """Everything a result depends on (safetensors metadata values must be strings)."""
        return {"format": CACHE_FORMAT, "image_sha256": image_sha256, "bidiffuser": self.bidiffuser_fingerprint,
                "steps": str(self.steps), "scale": repr(self.scale), "seed": str(self.seed),
                # a bf16 GPU pass and an fp32 CPU pass give different latents: never mix them
                "dtype": str(self.bidiffuser.dtype).removeprefix("torch.")}

    def cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.safetensors"

    def _load(self, key: str, image_sha256: str) -> torch.Tensor | None:
        path = self.cache_path(key)
        if path is None or not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata, latents = f.metadata(), f.get_tensor("latents")
            if metadata != self._metadata(image_sha256):
                raise ValueError("its metadata does not match its key")
            if tuple(latents.shape) != self.latent_shape or latents.dtype != torch.float32:
                raise ValueError(f"latents {tuple(latents.shape)} {latents.dtype}, expected {self.latent_shape}")
        except Exception as e:  # truncated, garbage, or foreign file: the cache must never stop a run
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            log.warning("recomputing unreadable feature cache file %s: %s", path, reason)
            return None
        return latents

    def generator(self, image_sha256: str) -> torch.Generator:
        """The image's own generator: its noise does not depend on what else is in the batch."""
        return make_generator(image_seed(self.seed, image_sha256))

    # -- extraction --------------------------------------------------------------------------------
    def latents(self, images: Sequence[ImageInput], progress: Progress | None = None) -> torch.Tensor:
        """B x 77 x text_dim float32 latents (CPU) in input order; misses are computed and cached.

        ``progress(done, total)`` is called after each BiDiffuser batch, counting images computed.
        """
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        if not images:
            raise BiDiffuserError("no images given")
        shas = [hashlib.sha256(image_bytes(im)).hexdigest() for im in images]
        keys = [self._key(sha) for sha in shas]
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, tuple[str, ImageInput]] = {}  # key -> (image sha256, image): one pass per image
        for key, sha, image in zip(keys, shas, images):
            if key in found or key in todo:
                self.hits += 1
            elif (cached := self._load(key, sha)) is not None:
                found[key] = cached
                self.hits += 1
            else:
                todo[key] = (sha, image)
                self.misses += 1

        pending = list(todo)
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start:start + self.batch_size]
            pils = [as_pil(todo[k][1]) for k in batch]  # decoded per batch: bounded memory
            generators = [self.generator(todo[k][0]) for k in batch]
            out = self.bidiffuser.image_to_text_latents(pils, steps=self.steps, scale=self.scale,
                                                        generator=generators).float().cpu()
            for key, row in zip(batch, out):
                found[key] = row.clone()  # a normal tensor (the pipeline returns inference-mode ones)
                if self.cache_dir is not None:
                    save_safetensors({"latents": found[key]}, self.cache_path(key),
                                     metadata=self._metadata(todo[key][0]))
            if progress is not None:
                progress(min(start + self.batch_size, len(pending)), len(pending))
        return torch.stack([found[k] for k in keys])

    def __call__(self, images: Sequence[ImageInput], progress: Progress | None = None) -> torch.Tensor:
        """B x 77 x D float32 features (CPU) in input order: ``decode_prefix`` of ``latents(images)``."""
        latents = self.latents(images, progress)
        decode_prefix = self.bidiffuser.caption_decoder.decode_prefix
        weight = decode_prefix.weight
        with torch.no_grad():  # not inference_mode: the features feed trainable layers downstream
            return decode_prefix(latents.to(weight.device, weight.dtype)).float().cpu()
