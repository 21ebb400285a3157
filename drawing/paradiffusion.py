"""ParaDiffusion (weijiawu/ParaDiffusion) as a drawing backend: Llama-2 with its released LoRA reads
the description (up to 256 tokens), its own U-Net draws from the 4096-d states, the SDXL VAE decodes.

The released files, as the reference's ``demo.py`` reads them under ``./weights/``:

    PATH/Llama-2-7b-hf/       LlamaForCausalLM weights + tokenizer.json/tokenizer_config.json
    PATH/text_encoder_lora/   adapter_config.json + adapter_model.safetensors (or .bin), a PEFT LoRA
    PATH/unet/                config.json + diffusion_pytorch_model.safetensors (or .bin)
    PATH/sdxl-vae-fp16-fix/   config.json + diffusion_pytorch_model.safetensors (or .bin)
    PATH/scheduler/           scheduler_config.json (DPM-Solver++)

Each folder can be given elsewhere (options ``text_encoder``, ``lora``, ``unet``, ``vae``,
``scheduler``; ``lora=False`` draws without the LoRA, as demo.py's ``peft_model_id=None``). The
reference's pipeline file cannot be imported on today's diffusers, so its logic is written out
here: prompt states = the Llama's last hidden state (final norm applied) over the prompt padded with
EOS to 256 tokens, attention mask passed; the unconditional states from the empty string the same
way; classifier-free guidance when guidance > 1; DPM-Solver++; decode with the VAE's scaling factor.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .backend import DrawingError, DrawingSettings, Progress, check_prompts, initial_noise, part_dtype
from .paradiffusion_parts import (PromptTokenizer, load_diffusers_model, load_scheduler, load_text_encoder)

FOLDERS = {"text_encoder": "Llama-2-7b-hf", "lora": "text_encoder_lora", "unet": "unet",
           "vae": "sdxl-vae-fp16-fix", "scheduler": "scheduler"}
# demo.py's predict(): 100 DPM-Solver++ steps, guidance 7.5, 1024 x 640
DEFAULTS = DrawingSettings(steps=100, guidance=7.5, width=1024, height=640)


class ParaDiffusionBackend:
    name = "paradiffusion"
    defaults = DEFAULTS
    max_batch = 4

    def __init__(self, tokenizer: PromptTokenizer, text_encoder, unet, vae, scheduler, device: torch.device,
                 source: str, lora: bool):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler, self.device, self.source, self.lora = scheduler, device, source, lora
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """The Llama's last hidden state over each prompt (batch x 256 x hidden), in the U-Net's dtype."""
        ids, mask = self.tokenizer(list(prompts))
        states = self.text_encoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        return states.to(self.unet.dtype)

    def draw(self, prompts: Sequence[str], seeds: Sequence[int | None], steps: int | None = None,
             guidance: float | None = None, width: int | None = None, height: int | None = None,
             progress: Progress | None = None) -> list[Image.Image]:
        return to_images(self.draw_pixels(prompts, seeds, steps, guidance, width, height, progress))

    @torch.no_grad()
    def draw_pixels(self, prompts: Sequence[str], seeds: Sequence[int | None], steps: int | None = None,
                    guidance: float | None = None, width: int | None = None, height: int | None = None,
                    progress: Progress | None = None) -> torch.Tensor:
        """``draw``'s pixels before rounding: batch x 3 x H x W in [0, 1], float32."""
        check_prompts(prompts, seeds)
        s = self.defaults.override(steps, guidance, width, height)
        if s.width % 8 or s.height % 8:  # the reference pipeline's check_inputs
            raise DrawingError(f"ParaDiffusion draws sizes divisible by 8 (got {s.width}x{s.height})")
        if s.steps < 1:
            raise DrawingError(f"steps must be at least 1 (got {s.steps})")
        if not prompts:
            return torch.zeros(0, 3, s.height, s.width)
        cfg = s.guidance > 1.0
        cond = self.encode(prompts)
        if cfg:  # the reference encodes "" once per image, padded to the prompts' length
            cond = torch.cat([self.encode([""] * len(prompts)), cond])
        self.scheduler.set_timesteps(s.steps, device=self.device)
        shape = (len(prompts), self.unet.config.in_channels, s.height // self.vae_scale_factor,
                 s.width // self.vae_scale_factor)
        latents = initial_noise(shape, seeds, self.device, cond.dtype) * self.scheduler.init_noise_sigma
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(timesteps):
            x = torch.cat([latents] * 2) if cfg else latents
            x = self.scheduler.scale_model_input(x, t)
            eps = self.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
            if cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + s.guidance * (text - uncond)
            latents = self.scheduler.step(eps, t, latents, return_dict=False)[0]
            if progress is not None:
                progress(i + 1, len(timesteps))
        return self.decode(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (batch x 3 x H x W, float32), as the reference's image processor gives them."""
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).float()

    def to(self, device) -> "ParaDiffusionBackend":
        self.device = torch.device(device)
        for part in (self.text_encoder, self.unet, self.vae):
            part.to(self.device)
        return self

    def describe(self) -> str:
        lora = "with its LoRA" if self.lora else "without LoRA"
        return (f"paradiffusion from {self.source} (Llama {lora}, text {self.text_encoder.dtype}, "
                f"U-Net/VAE {self.unet.dtype}, {self.device})")


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    arr = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def _folders(path: str | os.PathLike, overrides: dict) -> dict[str, Path | None]:
    root = Path(path)
    out = {}
    for option, folder in FOLDERS.items():
        given = overrides.get(option)
        if option == "lora" and given is False:
            out[option] = None
            continue
        d = Path(given) if given else root / folder
        if not d.is_dir():
            raise DrawingError(f"ParaDiffusion {option} folder not found: {d} (expected {folder}/ under {root}, "
                               f"or the {option}= option)")
        out[option] = d
    return out


def load(path: str | os.PathLike, device=None, dtype: str | None = None, text_encoder=None, lora=None,
         unet=None, vae=None, scheduler=None, text_dtype: str | None = None) -> ParaDiffusionBackend:
    """ParaDiffusion from its released folder ``path`` (see the module docstring). ``dtype`` sets every
    part; ``text_dtype`` then sets the Llama's alone (on CPU a 7B Llama fits only in 16 bits, while
    16-bit convolutions there are many times slower than float32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from bidiffuser.cliutil import resolve_device
    from bidiffuser.errors import BiDiffuserError

    try:
        dev = resolve_device(device)
    except BiDiffuserError as e:
        raise DrawingError(str(e)) from None
    dirs = _folders(path, dict(text_encoder=text_encoder, lora=lora, unet=unet, vae=vae, scheduler=scheduler))
    # demo.py halves only the U-Net and the VAE, on the GPU; the Llama stays float32
    image_dtype = part_dtype(dtype, dev, torch.float16, "ParaDiffusion: dtype")
    text_dtype = part_dtype(dtype if text_dtype is None else text_dtype, dev, torch.float32,
                            "ParaDiffusion: text_dtype")
    tokenizer = PromptTokenizer(dirs["text_encoder"])
    encoder = load_text_encoder(dirs["text_encoder"], dirs["lora"], text_dtype)
    unet_model = load_diffusers_model(UNet2DConditionModel, dirs["unet"], "U-Net", image_dtype)
    vae_model = load_diffusers_model(AutoencoderKL, dirs["vae"], "VAE", image_dtype)
    hidden = encoder.config.hidden_size
    if unet_model.config.cross_attention_dim != hidden:
        raise DrawingError(f"{dirs['unet'] / 'config.json'}: cross_attention_dim {unet_model.config.cross_attention_dim}"
                           f" but the Llama's hidden size is {hidden} ({dirs['text_encoder'] / 'config.json'})")
    backend = ParaDiffusionBackend(tokenizer, encoder, unet_model, vae_model, load_scheduler(dirs["scheduler"]),
                                   dev, str(path), dirs["lora"] is not None)
    return backend.to(dev)
