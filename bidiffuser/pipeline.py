"""The BiDiffuser pipeline: every UniDiffuser sampling mode over one model directory.

Modes: ``text_to_image`` (t2i), ``image_to_text`` (i2t), ``joint``, ``image`` (i), ``text`` (t),
``image_variation`` (i2t2i), ``text_variation`` (t2i2t), plus ``image_to_text_latents`` (the
77 x text_dim latents EasyGen feeds its LLM, without decoding captions).

Guidance is UniDiffuser's "true uncond": the unconditional branch sees the other modality as pure
noise at t = N. Conditional and unconditional branches run in ONE batched forward.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import torch
from PIL import Image

from .autoencoder import decode_latents, image_posterior, load_autoencoder, sample_posterior
from .bridge import (LM_LORA, BridgeFiles, LoraHooks, TextModel, add_lora, bridge_condition, check_fits, load_lora,
                     load_text_model, read_bridge, set_lora_enabled)
from .caption_decoder import load_caption_decoder
from .clip import load_clip_image_encoder, load_clip_text_encoder
from .errors import BiDiffuserError
from .images import ImageInput, as_pil, center_crop_resize, pil_to_tensor, tensor_to_pil
from .model_dir import BiDiffuserConfig, read_config
from .modes import MODES  # noqa: F401  (re-exported)
from .precision import Precision
from .sampler import NoiseSchedule, dpm_solver_pp_sample
from .uvit import load_uvit

Progress = Callable[[int, int], None]
# One generator for the whole batch, or (as in diffusers) a list with one generator per sample (batch
# row), so that a sample's noise, and hence its result, does not depend on what else is in the batch.
Generators = torch.Generator | list[torch.Generator]


@dataclass
class BiDiffuserOutput:
    """What a sampling call returns; fields a mode does not produce are None."""
    images: list[Image.Image] | None = None
    texts: list[str] | None = None
    text_latents: torch.Tensor | None = None   # B x 77 x text_dim
    image_latents: torch.Tensor | None = None  # B x C x h x w (scaled VAE latents)
    clip_image: torch.Tensor | None = None     # B x 1 x clip_img_dim


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: noise is drawn on the CPU so a seed gives the same result on any device."""
    g = torch.Generator("cpu")
    if seed is None:
        g.seed()  # a fresh random seed for this generator only; the global RNG is left alone
    else:
        g.manual_seed(seed)
    return g


def _component(load):
    """A lazily loaded component. Building a module draws random initial weights (overwritten by the
    checkpoint); that must not shift the caller's global RNG, or a training run's dropout would
    depend on when BiDiffuser happened to be loaded."""
    def loader(self):
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return load(self)
    loader.__doc__ = load.__doc__
    return cached_property(loader)


def _check_generators(generators: Sequence[torch.Generator], batch_size: int) -> None:
    if len(generators) != batch_size:
        raise BiDiffuserError(f"got {len(generators)} generators for a batch of {batch_size} samples: "
                              f"pass one generator, or one per sample")


class BiDiffuser:
    """Components load lazily, so ``image_to_text_latents`` never loads the CLIP text encoder."""

    def __init__(self, config: BiDiffuserConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, precision: Precision | None = None,
                 bridge: str | os.PathLike | BridgeFiles | None = None, text_model=None,
                 text_model_dtype: torch.dtype = torch.float32):
        """``precision`` gives each component its dtype (see bidiffuser.precision); without it,
        every component runs in ``dtype``.

        ``bridge`` (a bridge directory, see bidiffuser.bridge) lets ``text_to_image`` draw from a
        language model's hidden states; ``text_model`` is that model: a transformers directory, or a
        loaded ``(model, tokenizer)`` pair (EasyGen passes its own LLM). Without it, the bridge's
        recorded text model is loaded, in ``text_model_dtype``. A bridge's LM LoRA is applied only while a prompt is read for
        drawing (``bridge.LoraHooks``): a handed-over model is otherwise left exactly as it was."""
        self.config = config
        self.device = torch.device(device)
        self.precision = precision or Precision.uniform(dtype)
        self.dtype = self.precision.uvit  # the U-ViT's: what its latents depend on most
        self.schedule = NoiseSchedule.stable_diffusion()
        self.bridge_files = read_bridge(bridge) if isinstance(bridge, (str, os.PathLike)) else bridge
        if self.bridge_files is not None:
            check_fits(self.bridge_files.config, config.uvit.text_dim, config.uvit.num_text_tokens, None,
                       self.bridge_files.root)
        self._text_model_source, self._text_model_dtype = text_model, text_model_dtype
        self._bridged = False  # True while the U-ViT runs for a bridge-conditioned drawing (its LoRA on)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device="cpu", dtype=torch.float32,
                        precision: Precision | None = None, bridge=None, text_model=None,
                        text_model_dtype: torch.dtype = torch.float32) -> "BiDiffuser":
        return cls(read_config(directory), device=device, dtype=dtype, precision=precision, bridge=bridge,
                   text_model=text_model, text_model_dtype=text_model_dtype)

    @property
    def has_bridge(self) -> bool:
        return self.bridge_files is not None

    # -- components ---------------------------------------------------------------------------
    @_component
    @torch.inference_mode()  # its weights are inference tensors whenever it loads (as on first use in sampling)
    def uvit(self):
        uvit = load_uvit(self.config.path("uvit"), self.config.uvit, self.device, self.precision.uvit)
        lora = self.bridge_files.uvit_lora if self.bridge_files is not None else None
        if lora is not None:  # kept unmerged and off, so the CLIP path draws with the U-ViT as it was
            add_lora(uvit, lora)
            load_lora(uvit, self.bridge_files.uvit_lora_weights(), self.bridge_files.root / "uvit_lora.safetensors")
            uvit.to(device=self.device, dtype=self.precision.uvit).eval().requires_grad_(False)
            set_lora_enabled(uvit, False)
        return uvit

    @_component
    def bridge(self):
        if self.bridge_files is None:
            raise BiDiffuserError("no bridge loaded (pass a bridge directory)")
        return self.bridge_files.build(self.device, self.precision.uvit)

    @_component
    def text_model(self):
        files, source = self.bridge_files, self._text_model_source
        if files is None:
            raise BiDiffuserError("no bridge loaded (pass a bridge directory)")
        if source is None and files.text_model is not None:  # a relative record starts at the bridge directory
            source = files.root / files.text_model
        if source is None:
            raise BiDiffuserError(f"bridge {files.root} records no text model; pass one (--text-model)")
        model, tokenizer = (source if isinstance(source, tuple)
                            else load_text_model(source, self.device, self._text_model_dtype))
        c = files.config
        text = TextModel(model, tokenizer, c.layer, c.max_length, pad_to=c.num_tokens if c.kind == "per_token" else None)
        check_fits(c, self.config.uvit.text_dim, self.config.uvit.num_text_tokens, text.hidden_size, files.root)
        if files.lm_lora is not None:  # on only while the bridge reads: a handed-over LLM chats as it was
            text.lora = LoraHooks(model, files.lm_lora, files.lm_lora_weights(), files.root / LM_LORA)
        return text

    @_component
    def caption_decoder(self):
        cfg = self.config
        return load_caption_decoder(cfg.path("caption_decoder"), cfg.caption_decoder, cfg.path("tokenizer"),
                                    self.device, self.precision.caption_decoder)

    @_component
    def autoencoder(self):
        return load_autoencoder(self.config.path("autoencoder"), self.config.autoencoder, self.device,
                                self.precision.autoencoder)

    @_component
    def clip_image(self):
        return load_clip_image_encoder(self.config.path("clip_image"), self.device, self.precision.clip,
                                       backend=self.config.clip_backend)

    @_component
    def clip_text(self):
        # The text latent has num_text_tokens rows: 77 for v1, fewer for small models.
        return load_clip_text_encoder(self.config.path("clip_text"), self.device, self.precision.clip,
                                      backend=self.config.clip_backend, max_length=self.config.uvit.num_text_tokens)

    def _in(self, dtype: torch.dtype):
        return self.precision.compute(dtype, self.device)

    # -- shapes and noise -----------------------------------------------------------------------
    @property
    def _N(self) -> int:
        return self.schedule.N

    def _shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        u, s = self.config.uvit, self.config.latent_size
        return {"img": (n, u.in_chans, s, s), "clip": (n, 1, u.clip_img_dim),
                "text": (n, u.num_text_tokens, u.text_dim)}

    def _randn(self, shape, generator: Generators) -> torch.Tensor:
        """Noise drawn on the CPU; with a generator list, row i comes from ``generator[i]`` alone."""
        if isinstance(generator, (list, tuple)):
            _check_generators(generator, shape[0])
            return torch.stack([torch.randn(shape[1:], generator=g) for g in generator]).to(self.device)
        return torch.randn(shape, generator=generator).to(self.device)

    def _nnet(self, img, clip, text, t_img, t_text):
        """One U-ViT call in its dtype; outputs back in float32 for the solver."""
        dt = self.precision.uvit
        with self._in(dt):
            outs = self.uvit(img.to(dt), clip.to(dt), text.to(dt), t_img, t_text, self.config.data_type)
        return [o.float() for o in outs]

    @contextmanager
    def _bridge_lora(self):
        """The U-ViT with the bridge's LoRA switched on, for one bridge-conditioned drawing."""
        uvit = self.uvit
        set_lora_enabled(uvit, True)
        try:
            yield
        finally:
            set_lora_enabled(uvit, False)

    def _sample(self, x: torch.Tensor, model_fn, steps: int, progress: Progress | None) -> torch.Tensor:
        if steps < 1:
            raise BiDiffuserError(f"--steps must be at least 1 (got {steps})")
        with torch.inference_mode():
            return dpm_solver_pp_sample(model_fn, x, steps=steps, schedule=self.schedule, progress=progress)

    # -- the four noise predictors ------------------------------------------------------------------
    def _sample_text(self, img, clip, n, steps, scale, g, progress) -> torch.Tensor:
        """Text latents conditioned on (clean) image latents; img=None samples unconditionally (t)."""
        shapes, N = self._shapes(n), self._N

        def model_fn(x, t):
            t = t * N
            text = x.view(shapes["text"])
            zeros, full = torch.zeros_like(t), torch.full_like(t, N)
            if img is None:  # mode t: the image side is pure noise at t = N
                _, _, eps = self._nnet(self._randn(shapes["img"], g), self._randn(shapes["clip"], g),
                                       text, full, t)
                return eps.flatten(1)
            if scale == 0:
                return self._nnet(img, clip, text, zeros, t)[2].flatten(1)
            both = lambda a, b: torch.cat([a, b])  # noqa: E731  conditional rows, then unconditional
            _, _, eps = self._nnet(both(img, self._randn(shapes["img"], g)),
                                   both(clip, self._randn(shapes["clip"], g)),
                                   both(text, text), both(zeros, full), both(t, t))
            cond, uncond = eps.chunk(2)
            return (cond + scale * (cond - uncond)).flatten(1)

        x = self._randn(shapes["text"], g).flatten(1)
        return self._sample(x, model_fn, steps, progress).view(shapes["text"])

    def _split_image(self, x, n):
        shapes = self._shapes(n)
        n_img = shapes["img"][1] * shapes["img"][2] * shapes["img"][3]
        img, clip = x.split([n_img, x.shape[1] - n_img], dim=1)
        return img.reshape(shapes["img"]), clip.reshape(shapes["clip"])

    def _sample_image(self, text, n, steps, scale, g, progress):
        """Image latents + CLIP image embedding conditioned on text latents; text=None is mode i.
        ``text`` may also be a function of the image timestep (a timestep-aware bridge's condition)."""
        shapes, N = self._shapes(n), self._N
        condition = text

        def model_fn(x, t):
            t = t * N
            img, clip = self._split_image(x, n)
            zeros, full = torch.zeros_like(t), torch.full_like(t, N)
            text = condition(t) if callable(condition) else condition
            if text is None:
                img_eps, clip_eps, _ = self._nnet(img, clip, self._randn(shapes["text"], g), t, full)
                return torch.cat([img_eps.flatten(1), clip_eps.flatten(1)], dim=1)
            if scale == 0:
                img_eps, clip_eps, _ = self._nnet(img, clip, text, t, zeros)
            else:
                both = lambda a, b: torch.cat([a, b])  # noqa: E731
                img_eps, clip_eps, _ = self._nnet(both(img, img), both(clip, clip),
                                                  both(text, self._randn(shapes["text"], g)),
                                                  both(t, t), both(zeros, full))
                (ic, iu), (cc, cu) = img_eps.chunk(2), clip_eps.chunk(2)
                img_eps, clip_eps = ic + scale * (ic - iu), cc + scale * (cc - cu)
            return torch.cat([img_eps.flatten(1), clip_eps.flatten(1)], dim=1)

        x = torch.cat([self._randn(shapes["img"], g).flatten(1), self._randn(shapes["clip"], g).flatten(1)], dim=1)
        return self._split_image(self._sample(x, model_fn, steps, progress), n)

    def _sample_joint(self, n, steps, scale, g, progress):
        """Image, CLIP embedding and text sampled together (one timestep for all)."""
        shapes, N = self._shapes(n), self._N
        sizes = [int(torch.tensor(shapes[k][1:]).prod()) for k in ("img", "clip", "text")]

        def unpack(x):
            a, b, c = x.split(sizes, dim=1)
            return a.reshape(shapes["img"]), b.reshape(shapes["clip"]), c.reshape(shapes["text"])

        def pack(img, clip, text):
            return torch.cat([img.flatten(1), clip.flatten(1), text.flatten(1)], dim=1)

        def model_fn(x, t):
            t = t * N
            img, clip, text = unpack(x)
            if scale == 0:
                return pack(*self._nnet(img, clip, text, t, t))
            full = torch.full_like(t, N)
            # rows: joint | text-only (image is noise at N) | image-only (text is noise at N)
            outs = self._nnet(torch.cat([img, self._randn(shapes["img"], g), img]),
                              torch.cat([clip, self._randn(shapes["clip"], g), clip]),
                              torch.cat([text, text, self._randn(shapes["text"], g)]),
                              torch.cat([t, full, t]), torch.cat([t, t, full]))
            (ij, _, iu), (cj, _, cu), (tj, tu, _) = (o.chunk(3) for o in outs)
            return pack(ij + scale * (ij - iu), cj + scale * (cj - cu), tj + scale * (tj - tu))

        x = pack(*(self._randn(shapes[k], g) for k in ("img", "clip", "text")))
        return unpack(self._sample(x, model_fn, steps, progress))

    # -- encoding / decoding ------------------------------------------------------------------------
    def encode_images(self, images: Sequence[ImageInput], generator: Generators):
        """Images -> (scaled VAE latents sampled from the posterior, CLIP image embeddings B x 1 x D).

        With a generator list, image i's posterior sample uses ``generator[i]`` only (diffusers'
        ``randn_tensor`` draws row by row from a list).
        """
        if isinstance(generator, (list, tuple)):
            _check_generators(generator, len(images))
            generator = list(generator)
        mean, std, clip = self.encode_image_posteriors(images)
        return sample_posterior(mean, std, generator), clip

    def encode_image_posteriors(self, images: Sequence[ImageInput]):
        """Images -> (scaled VAE posterior mean, its std, CLIP image embeddings B x 1 x D): what
        ``encode_images`` samples from (``autoencoder.sample_posterior``)."""
        if not images:
            raise BiDiffuserError("no images given")
        pils = [center_crop_resize(as_pil(im), self.config.resolution) for im in images]
        with torch.inference_mode():
            pixels = pil_to_tensor(pils).to(self.device, self.precision.autoencoder)
            mean, std = image_posterior(self.autoencoder, pixels)
            with self._in(self.precision.clip):
                clip = self.clip_image.encode(pils).float()
        return mean.float(), std.float(), clip

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> CLIP text features -> caption decoder encode_prefix -> B x 77 x text_dim."""
        if isinstance(prompts, str):
            prompts = [prompts]
        with torch.inference_mode():
            with self._in(self.precision.clip):
                features = self.clip_text.encode(list(prompts))
            return self.caption_decoder.encode_prefix(features.to(self.precision.caption_decoder)).float()

    def decode_images(self, z: torch.Tensor) -> list[Image.Image]:
        with torch.inference_mode():
            return tensor_to_pil(decode_latents(self.autoencoder, z.to(self.precision.autoencoder)))

    def decode_texts(self, text_latents: torch.Tensor) -> list[str]:
        return self.caption_decoder.generate_captions(text_latents.to(self.precision.caption_decoder))

    # -- public modes -----------------------------------------------------------------------------------
    def image_to_text_latents(self, images: Sequence[ImageInput], steps: int = 50, scale: float = 7.0,
                              seed: int | None = None, generator: Generators | None = None,
                              progress: Progress | None = None) -> torch.Tensor:
        """B x 77 x text_dim text latents for the images (EasyGen's LLM input before decode_prefix).

        ``generator`` may be a list with one generator per image: each image's result then depends
        only on its own generator, not on the other images in the batch.
        """
        g = make_generator(seed) if generator is None else generator
        z, clip = self.encode_images(images, g)
        return self._sample_text(z, clip, len(images), steps, scale, g, progress)

    def image_to_text(self, images, steps=50, scale=7.0, seed=None, generator=None, progress=None) -> BiDiffuserOutput:
        lat = self.image_to_text_latents(images, steps, scale, seed, generator, progress)
        return BiDiffuserOutput(texts=self.decode_texts(lat), text_latents=lat)

    def text_to_image(self, prompts, n_samples: int = 1, steps=50, scale=7.0, seed=None, generator=None,
                      progress=None, draw_with: str | None = None) -> BiDiffuserOutput:
        """``n_samples`` images per prompt. ``draw_with``: "clip" (CLIP text -> encode_prefix, the
        original path), "bridge" (the language model's hidden states through the bridge; prompts
        of any length up to the bridge's max_length tokens), or None: the bridge when one is loaded."""
        g = make_generator(seed) if generator is None else generator
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self._use_bridge(draw_with):
            states, mask = self.encode_bridge(prompts)
            return self.states_to_image(states, mask, n_samples, steps, scale, generator=g, progress=progress)
        text = self.encode_prompts(prompts).repeat_interleave(n_samples, dim=0)
        return self._text_latents_to_image(text, steps, scale, g, progress)

    def _use_bridge(self, draw_with: str | None) -> bool:
        if draw_with not in (None, "clip", "bridge"):
            raise BiDiffuserError(f"draw_with must be clip or bridge (got {draw_with!r})")
        if draw_with == "bridge" and not self.has_bridge:
            raise BiDiffuserError("drawing with the bridge needs a bridge directory (--bridge)")
        return self.has_bridge and draw_with != "clip"

    def encode_bridge(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> the text model's hidden states (B x L x lm_dim) and attention mask, as the bridge reads them."""
        return self.text_model.encode(list(prompts))

    def states_to_image(self, states: torch.Tensor, mask: torch.Tensor, n_samples: int = 1, steps=50, scale=7.0,
                        seed=None, generator=None, progress=None) -> BiDiffuserOutput:
        """Draw from language-model hidden states through the bridge (its U-ViT LoRA switched on)."""
        g = make_generator(seed) if generator is None else generator
        states = states.to(self.device, self.precision.uvit).repeat_interleave(n_samples, dim=0)
        mask = mask.to(self.device).repeat_interleave(n_samples, dim=0)
        condition = bridge_condition(self.bridge, states, mask)
        with self._bridge_lora():
            return self._text_latents_to_image(condition, steps, scale, g, progress, n=states.shape[0])

    def _text_latents_to_image(self, text, steps, scale, g, progress, n: int | None = None) -> BiDiffuserOutput:
        n = text.shape[0] if n is None else n
        z, clip = self._sample_image(text, n, steps, scale, g, progress)
        return BiDiffuserOutput(images=self.decode_images(z), image_latents=z, clip_image=clip,
                                text_latents=None if callable(text) else text)

    def joint(self, n_samples: int = 1, steps=50, scale=7.0, seed=None, generator=None, progress=None):
        g = make_generator(seed) if generator is None else generator
        z, clip, text = self._sample_joint(n_samples, steps, scale, g, progress)
        return BiDiffuserOutput(images=self.decode_images(z), texts=self.decode_texts(text),
                                text_latents=text, image_latents=z, clip_image=clip)

    def image(self, n_samples: int = 1, steps=50, seed=None, generator=None, progress=None) -> BiDiffuserOutput:
        """Unconditional images (mode i)."""
        g = make_generator(seed) if generator is None else generator
        z, clip = self._sample_image(None, n_samples, steps, 0.0, g, progress)
        return BiDiffuserOutput(images=self.decode_images(z), image_latents=z, clip_image=clip)

    def text(self, n_samples: int = 1, steps=50, seed=None, generator=None, progress=None) -> BiDiffuserOutput:
        """Unconditional captions (mode t)."""
        g = make_generator(seed) if generator is None else generator
        lat = self._sample_text(None, None, n_samples, steps, 0.0, g, progress)
        return BiDiffuserOutput(texts=self.decode_texts(lat), text_latents=lat)

    def image_variation(self, images, steps=50, scale=7.0, seed=None, generator=None, progress=None):
        """i2t2i: image -> text latents -> new image (the caption is decoded too, for display)."""
        g = make_generator(seed) if generator is None else generator
        lat = self.image_to_text_latents(images, steps, scale, generator=g, progress=progress)
        out = self._text_latents_to_image(lat, steps, scale, g, progress)
        out.texts = self.decode_texts(lat)
        return out

    def text_variation(self, prompts, n_samples: int = 1, steps=50, scale=7.0, seed=None, generator=None,
                       progress=None):
        """t2i2t: prompt -> image latents -> new caption."""
        g = make_generator(seed) if generator is None else generator
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        text = self.encode_prompts(prompts).repeat_interleave(n_samples, dim=0)
        z, clip = self._sample_image(text, text.shape[0], steps, scale, g, progress)
        lat = self._sample_text(z, clip, text.shape[0], steps, scale, g, progress)
        return BiDiffuserOutput(texts=self.decode_texts(lat), text_latents=lat, image_latents=z, clip_image=clip,
                                images=self.decode_images(z))
