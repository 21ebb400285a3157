"""Image features for the LLM: image -> BiDiffuser image-to-text latents (77 x text_dim) ->
caption decoder ``decode_prefix`` -> 77 x 768, with a content-addressed store on disk
(``easygen.feature_store.FeatureStore``, filled in bulk by ``easygen features``).

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

from bidiffuser.errors import BiDiffuserError
from bidiffuser.images import ImageInput, as_pil, load_image
from bidiffuser.pipeline import BiDiffuser, make_generator
from easygen.errors import EasyGenError
from easygen.feature_store import FeatureStore

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


def image_sha256(image: ImageInput) -> str:
    """The hex sha256 of ``image_bytes(image)``: an image's identity in keys and seeds."""
    return hashlib.sha256(image_bytes(image)).hexdigest()


def image_seed(seed: int, image_sha256: str) -> int:
    """The seed of one image's generator: the first 8 bytes of sha256("{seed}:{image sha256}")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{image_sha256}".encode()).digest()[:8], "big")


def feature_settings(bidiffuser_fingerprint: str, steps: int, scale: float, seed: int,
                     dtype: torch.dtype | str) -> dict[str, str]:
    """Everything an image's latents depend on besides the image (strings: safetensors metadata)."""
    return {"format": CACHE_FORMAT, "bidiffuser": bidiffuser_fingerprint, "steps": str(int(steps)),
            "scale": repr(float(scale)), "seed": str(int(seed)),
            # a bf16 GPU pass and an fp32 CPU pass give different latents: never mix them
            "dtype": str(dtype).removeprefix("torch.")}


def feature_key(digest: str, settings: dict[str, str]) -> str:
    """The store key of an image (by the sha256 of its bytes) under ``settings``."""
    named = {**settings, "image_sha256": digest}
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()


class ImageFeatureExtractor:
    """Images -> B x 77 x D float32 features (D = the caption decoder's n_embd: 768 for the real model).

    ``cache_dir`` (optional) is a ``FeatureStore`` (or its directory) holding the 77 x text_dim
    latents (12x smaller than the features; ``decode_prefix`` is one cheap Linear). Given a
    directory, the extractor owns its store and writes each call's new latents before returning
    (one small shard per call: right for interactive use). Given a ``FeatureStore``, its owner
    decides when shards are written (every ``shard_size`` entries and at close: bulk extraction).
    ``hits`` / ``misses`` count images served without / with a BiDiffuser pass.
    """

    def __init__(self, bidiffuser: BiDiffuser, steps: int = 50, scale: float = 7.0, seed: int = 1234,
                 cache_dir: str | os.PathLike | FeatureStore | None = None, batch_size: int = 8):
        if steps < 1 or batch_size < 1:
            raise BiDiffuserError(f"steps and batch_size must be at least 1 (got {steps} and {batch_size})")
        self.bidiffuser = bidiffuser
        self.steps, self.scale, self.seed = int(steps), float(scale), int(seed)
        self._owns_store = cache_dir is not None and not isinstance(cache_dir, FeatureStore)
        self.store = FeatureStore(cache_dir) if self._owns_store else cache_dir
        self.cache_dir = None if self.store is None else self.store.root
        self.batch_size = batch_size
        # the fingerprint is computed once: it reads the weight files
        self.settings = feature_settings(bidiffuser.config.fingerprint(), self.steps, self.scale, self.seed,
                                         bidiffuser.precision.name)
        u = bidiffuser.config.uvit
        self.latent_shape = (u.num_text_tokens, u.text_dim)
        self.hits = self.misses = 0

    # -- keys and the store -------------------------------------------------------------------------
    def key(self, image_bytes: bytes) -> str:
        """Store key of an image (see ``image_bytes``) under this extractor's checkpoint and settings."""
        return feature_key(hashlib.sha256(image_bytes).hexdigest(), self.settings)

    def _load(self, key: str) -> torch.Tensor | None:
        if self.store is None:
            return None
        latents = self.store.get(key)
        if latents is not None and (tuple(latents.shape) != self.latent_shape or latents.dtype != torch.float32):
            # only a foreign writer can put these under our key: never let it reach the model
            log.warning("recomputing latents of key %s in %s: %s %s, expected %s float32", key,
                        self.store.root, tuple(latents.shape), latents.dtype, self.latent_shape)
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
        shas = [image_sha256(im) for im in images]
        keys = [feature_key(sha, self.settings) for sha in shas]
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, tuple[str, ImageInput]] = {}  # key -> (image sha256, image): one pass per image
        for key, sha, image in zip(keys, shas, images):
            if key in found or key in todo:
                self.hits += 1
            elif (cached := self._load(key)) is not None:
                found[key] = cached
                self.hits += 1
            else:
                todo[key] = (sha, image)
                self.misses += 1

        pending = list(todo)
        try:
            for start in range(0, len(pending), self.batch_size):
                batch = pending[start:start + self.batch_size]
                pils = [as_pil(todo[k][1]) for k in batch]  # decoded per batch: bounded memory
                generators = [self.generator(todo[k][0]) for k in batch]
                out = self.bidiffuser.image_to_text_latents(pils, steps=self.steps, scale=self.scale,
                                                            generator=generators).float().cpu()
                for key, row in zip(batch, out):
                    found[key] = row.clone()  # a normal tensor (the pipeline returns inference-mode ones)
                if self.store is not None:
                    self.store.put({k: found[k] for k in batch}, metadata=self.settings)
                if progress is not None:
                    progress(min(start + self.batch_size, len(pending)), len(pending))
        finally:  # even when a later batch fails, what was computed is kept
            if self._owns_store:
                self.store.flush()
        return torch.stack([found[k] for k in keys])

    def __call__(self, images: Sequence[ImageInput], progress: Progress | None = None) -> torch.Tensor:
        """B x 77 x D float32 features (CPU) in input order: ``decode_prefix`` of ``latents(images)``."""
        return self._decode_prefix(self.latents(images, progress))

    def from_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """B x 77 x D features of texts: CLIP text encoder, ``encode_prefix``, ``decode_prefix`` (the
        original's caption-derived stage-1 features; cheap, so never cached)."""
        return self._decode_prefix(self.bidiffuser.encode_prompts(list(texts)).cpu())

    def _decode_prefix(self, latents: torch.Tensor) -> torch.Tensor:
        decode_prefix = self.bidiffuser.caption_decoder.decode_prefix
        weight = decode_prefix.weight
        with torch.no_grad():  # not inference_mode: the features feed trainable layers downstream
            return decode_prefix(latents.to(weight.device, weight.dtype)).float().cpu()


class StoredLatents:
    """Latents from a store filled by ``easygen features``, without loading BiDiffuser (training).

    ``settings`` (see ``feature_settings``) default to the store's own when it holds exactly one
    set of settings, the usual case. A missing image is a one-line error naming it and the store.
    """

    def __init__(self, store: str | os.PathLike | FeatureStore, settings: dict[str, str] | None = None):
        self.store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        if settings is None:
            found = [{k: v for k, v in s.items() if k != "store_format"} for s in self.store.settings()]
            if len(found) != 1:
                raise EasyGenError(f"feature store {self.store.root} holds {len(found)} sets of settings "
                                   "(steps/scale/seed/checkpoint); name the one to use")
            settings = found[0]
        self.settings = dict(settings)

    def key(self, image: ImageInput) -> str:
        return feature_key(image_sha256(image), self.settings)

    def __call__(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """B x 77 x text_dim float32 latents of ``images`` (paths or PIL images), in order."""
        out = []
        for image in images:
            latents = self.store.get(self.key(image))
            if latents is None:
                name = image if isinstance(image, (str, os.PathLike)) else "an in-memory image"
                raise EasyGenError(f"no features for {name} in feature store {self.store.root} "
                                   "(run `easygen features` on this data with the same settings)")
            out.append(latents)
        return torch.stack(out)
