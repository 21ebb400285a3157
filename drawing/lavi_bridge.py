"""LaVi-Bridge (ShihaoZhaoZSH/LaVi-Bridge@5a725f3) as a drawing backend: its released adapter and
positional LoRA files on the bases its users download separately.

Layout (``path`` is one combo folder of the download ``shihaozhao/LaVi-Bridge``)::

    llama2_unet/ | t5_unet/ | t5_transformer/
        adapter/config.json + diffusion_pytorch_model.{bin,safetensors}
        lora_vis.pt   lora_text.pt          plain lists [up0, down0, ...], see ``drawing.lavi_lora``

The bases (``diffusion=``, ``text_model=``) default to folders beside the combo folder, named as
their repositories: ``stable-diffusion-v1-4`` or ``PixArt-XL-2-512x512`` (diffusers layout), and
``Llama-2-7b-hf`` or ``t5-large`` (transformers layout).

Drawing follows ``test/llama2_unet.py``, ``test/t5_unet.py`` and ``test/t5_transformer.py``: the
prompt plus a quality suffix, 77 tokens (PixArt: 120 with the mask), the adapter, UniPC, 50 steps,
guidance 7.5, ``latents * init_noise_sigma`` and a ``1 / 0.18215`` decode.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from bidiffuser.checkpoint import read_json
from bidiffuser.errors import BiDiffuserError, first_line

from .backend import DrawingError, DrawingSettings, Progress, check_prompts, initial_noise, part_dtype
from .lavi_adapter import load_adapter
from .lavi_lora import (LLAMA_TARGETS, T5_TARGETS, TRANSFORMER_TARGETS, UNET_TARGETS, load_positional)
from .lavi_text import LlamaText, T5Text

SUFFIX = ", best quality, extremely detailed, 4k resolution"
VAE_SCALE = 0.18215  # hard-coded in the scripts (not read from the VAE config)
# UniPC defaults that changed after diffusers 0.24 (the reference's): 0.24 always ended on the
# first training sigma, today's default ends on zero; the other switches did not exist then.
UNIPC_PINS = dict(final_sigmas_type="sigma_min", use_karras_sigmas=False, use_exponential_sigmas=False,
                  use_beta_sigmas=False, use_flow_sigmas=False, rescale_betas_zero_snr=False,
                  use_dynamic_shifting=False)

# Keys of the released base files that today's classes no longer hold and the reference never used:
# PixArt's caption-projection null embedding (dropped from diffusers after 0.24; only training's
# caption dropout read it).
UNUSED_KEYS = frozenset({"caption_projection.y_embedding"})


@dataclass(frozen=True)
class Combo:
    diffusion: str        # "unet" (SD1.4) or "transformer" (PixArt-alpha)
    text: str             # "llama" or "t5"
    diffusion_dir: str    # default base folder names, beside the combo folder
    text_dirs: tuple[str, ...]
    max_length: int       # tokens per prompt
    masked: bool          # the text mask goes to the encoder and the transformer (t5_transformer only)


COMBOS = {
    "llama2_unet": Combo("unet", "llama", "stable-diffusion-v1-4", ("Llama-2-7b-hf", "Llama-2-7b"), 77, False),
    "t5_unet": Combo("unet", "t5", "stable-diffusion-v1-4", ("t5-large",), 77, False),
    "t5_transformer": Combo("transformer", "t5", "PixArt-XL-2-512x512", ("t5-large",), 120, True),
}


def _from_pretrained(cls, directory: Path, what: str, **kwargs):
    """A diffusers model/scheduler from a local folder; any missing, unexpected or mis-shaped key refuses it."""
    if not directory.is_dir():
        raise DrawingError(f"{what}: no folder {directory}")
    from diffusers.utils import logging as dlogging
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # its load report (PixArt's unused key, old config fields) is judged below
    try:
        if hasattr(cls, "load_config") and not hasattr(cls, "set_timesteps"):
            model, info = cls.from_pretrained(str(directory), output_loading_info=True, **kwargs)
            bad = {k: [x for x in v if x not in UNUSED_KEYS] for k, v in info.items() if v}
            bad = {k: v for k, v in bad.items() if v}
            if bad:
                raise DrawingError(f"{what} {directory} does not fit its config: "
                                   + "; ".join(f"{k}: {list(v)[:4]}" for k, v in bad.items()))
            return model.eval().requires_grad_(False)
        return cls.from_pretrained(str(directory), **kwargs)
    except DrawingError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise DrawingError(f"cannot load {what} from {directory}: {first_line(e)}") from None
    finally:
        dlogging.set_verbosity(level)


class LaViBridgeBackend:
    name = "lavi-bridge"
    max_batch = 4

    def __init__(self, combo_name: str, combo: Combo, vis, vae, scheduler_config, text, adapter, device,
                 dtype: torch.dtype, sources: dict[str, Path]):
        self.combo_name, self.combo = combo_name, combo
        self.vis, self.vae, self.scheduler_config = vis, vae, scheduler_config
        self.text, self.adapter, self.device, self.dtype, self.sources = text, adapter, device, dtype, sources
        self.defaults = DrawingSettings(steps=50, guidance=7.5, width=512, height=512)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Adapter outputs for ``prompts`` (suffix added by the caller) and their mask (PixArt only)."""
        states, mask = self.text.encode(list(prompts), self.combo.max_length, self.combo.masked)
        # the scripts run the adapter in float32 whatever the text model's dtype
        out = self.adapter(states.to(self.device, next(self.adapter.parameters()).dtype))
        return out.to(self.dtype), mask

    def draw(self, prompts: Sequence[str], seeds: Sequence[int | None], steps: int | None = None,
             guidance: float | None = None, width: int | None = None, height: int | None = None,
             progress: Progress | None = None) -> list:
        from PIL import Image

        images = self.sample(prompts, seeds, steps, guidance, width, height, progress)
        # the scripts truncate (``.to(torch.uint8)``), they do not round
        pixels = (images.permute(0, 2, 3, 1) * 255).to(torch.uint8).cpu().numpy()
        return [Image.fromarray(p) for p in pixels]

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int | None], steps: int | None = None,
               guidance: float | None = None, width: int | None = None, height: int | None = None,
               progress: Progress | None = None) -> torch.Tensor:
        """The images as floats in [0, 1], (n, 3, H, W), before the uint8 conversion."""
        from diffusers import UniPCMultistepScheduler

        check_prompts(prompts, seeds)
        s = self.defaults.override(steps, guidance, width, height)
        step = 16 if self.combo.diffusion == "transformer" else 8
        if s.width % step or s.height % step or s.width <= 0 or s.height <= 0:
            raise DrawingError(f"lavi-bridge {self.combo_name} draws sizes that are multiples of {step} "
                               f"(got {s.width}x{s.height})")
        if s.steps < 1:
            raise DrawingError(f"steps must be at least 1 (got {s.steps})")
        n = len(prompts)
        cond, cond_mask = self.encode([p + SUFFIX for p in prompts])
        uncond, uncond_mask = self.encode([""] * n)
        context = torch.cat([uncond, cond])
        mask = torch.cat([uncond_mask, cond_mask]) if self.combo.masked else None

        scheduler = UniPCMultistepScheduler.from_config(self.scheduler_config)
        channels = self.vis.config.in_channels
        latents = initial_noise((n, channels, s.height // 8, s.width // 8), seeds, "cpu", torch.float32)
        latents = (latents * scheduler.init_noise_sigma).to(self.device, self.dtype)
        scheduler.set_timesteps(s.steps)
        total = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.scale_model_input(torch.cat([latents] * 2), timestep=t)
            if self.combo.diffusion == "unet":
                eps = self.vis(x, t, encoder_hidden_states=context).sample
            else:
                eps = self.vis(x, encoder_hidden_states=context, encoder_attention_mask=mask,
                               timestep=torch.tensor([float(t.item())], device=self.device).expand(x.shape[0]),
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            e_uncond, e_text = eps.chunk(2)
            eps = e_uncond + s.guidance * (e_text - e_uncond)
            if self.combo.diffusion == "transformer":
                eps = eps.chunk(2, dim=1)[0]  # the learned-sigma half is dropped
            latents = scheduler.step(eps, t, latents).prev_sample
            if progress is not None:
                progress(i + 1, total)
        return self.decode(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (n, 3, H, W), float32, before the uint8 conversion."""
        vae_dtype = next(self.vae.parameters()).dtype
        image = self.vae.decode((latents / VAE_SCALE).to(vae_dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def to(self, device) -> "LaViBridgeBackend":
        """Every weight to ``device`` (dtypes kept), where the next ``draw`` runs."""
        self.device = torch.device(device)
        for part in (self.vis, self.vae, self.text.model, self.adapter):
            part.to(self.device)
        return self

    def describe(self) -> str:
        return (f"lavi-bridge {self.combo_name} from {self.sources['combo']} on {self.sources['diffusion']} "
                f"and {self.sources['text']} ({self.device}, {str(self.dtype).replace('torch.', '')})")


def _find_base(given, combo_dir: Path, names: Sequence[str], what: str, option: str) -> Path:
    if given is not None:
        return Path(given)
    for name in names:
        if (combo_dir.parent / name).is_dir():
            return combo_dir.parent / name
    raise DrawingError(f"lavi-bridge: no {what} given ({option}=...) and no {' or '.join(names)} folder beside "
                       f"{combo_dir}")


def load(path: str | os.PathLike, device=None, dtype=None, combo: str | None = None,
         diffusion: str | os.PathLike | None = None, text_model: str | os.PathLike | None = None,
         text_dtype=None, **options) -> LaViBridgeBackend:
    """A LaVi-Bridge combo folder (``llama2_unet``, ``t5_unet`` or ``t5_transformer``) on its bases.

    ``dtype`` (default: the scripts' own, Llama in float16 on GPU and the rest in float32; all float32
    on CPU) sets every part when given; ``text_dtype`` then sets the text model's alone (on CPU a 7B
    Llama fits only in 16 bits, while 16-bit convolutions there are many times slower than float32)."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel, UniPCMultistepScheduler

    from bidiffuser.cliutil import resolve_device

    if options:
        raise DrawingError(f"lavi-bridge: unknown option(s) {', '.join(sorted(options))} "
                           "(it takes combo, diffusion, text_model, text_dtype)")
    root = Path(path)
    if not root.is_dir():
        raise DrawingError(f"lavi-bridge: no folder {root}")
    trained = root / "lavi_train.json"  # written by `easygen train-lavi-bridge`: its combo and bases
    if trained.is_file():
        info = read_json(trained, "LaVi-Bridge training record")
        combo = combo or info.get("combo")
        diffusion = diffusion or info.get("diffusion")
        text_model = text_model or info.get("text_model")
    name = combo or root.name
    if name not in COMBOS:
        raise DrawingError(f"lavi-bridge: {root} is not one of the released combos {', '.join(COMBOS)} "
                           "(name the folder so, or pass combo=...)")
    spec = COMBOS[name]
    try:
        dev = resolve_device(None if device is None else str(device))
    except BiDiffuserError as e:
        raise DrawingError(str(e)) from None
    # the scripts' dtypes: on a GPU the Llama in float16 and everything else in float32
    vis_dtype = part_dtype(dtype, dev, torch.float32, "lavi-bridge: dtype")
    text_dtype = part_dtype(dtype if text_dtype is None else text_dtype, dev,
                            torch.float16 if spec.text == "llama" else torch.float32, "lavi-bridge: text_dtype")
    base = _find_base(diffusion, root, (spec.diffusion_dir,), "diffusion base", "diffusion")
    text_dir = _find_base(text_model, root, spec.text_dirs, "text model", "text_model")

    vis_cls, vis_dir = ((UNet2DConditionModel, "unet") if spec.diffusion == "unet"
                        else (PixArtTransformer2DModel, "transformer"))
    vis = _from_pretrained(vis_cls, base / vis_dir, f"{spec.diffusion} of {base.name}", torch_dtype=vis_dtype)
    vae = _from_pretrained(AutoencoderKL, base / "vae", f"VAE of {base.name}", torch_dtype=vis_dtype)
    scheduler = _from_pretrained(UniPCMultistepScheduler, base / "scheduler", f"scheduler of {base.name}",
                                 **UNIPC_PINS)
    text = (LlamaText if spec.text == "llama" else T5Text).load(text_dir, dev, text_dtype)
    adapter = load_adapter(root / "adapter", dev, torch.float32)
    _check_widths(root, adapter, text.hidden_size, vis, spec)

    load_positional(vis, root / "lora_vis.pt", UNET_TARGETS if spec.diffusion == "unet" else TRANSFORMER_TARGETS,
                    "lora_vis")
    load_positional(text.model, root / "lora_text.pt", LLAMA_TARGETS if spec.text == "llama" else T5_TARGETS,
                    "lora_text")
    vis.to(dev).eval()
    vae.to(dev).eval()
    text.model.to(dev).eval()
    return LaViBridgeBackend(name, spec, vis, vae, scheduler.config, text, adapter, dev, vis_dtype,
                             {"combo": root, "diffusion": base, "text": text_dir})


def _check_widths(root: Path, adapter, text_width: int, vis, spec: Combo) -> None:
    want_out = vis.config.cross_attention_dim if spec.diffusion == "unet" else vis.config.caption_channels
    if adapter.in_dim != text_width or adapter.out_dim != want_out:
        raise DrawingError(f"{root / 'adapter'}: adapter maps {adapter.in_dim} -> {adapter.out_dim}, but the text "
                           f"model gives {text_width} and the {spec.diffusion} takes {want_out}")
