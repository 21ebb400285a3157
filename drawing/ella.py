"""ELLA-SD1.5 as a drawing backend: FLAN-T5-XL reads the description, ELLA's timestep-aware connector
turns its states into the SD1.5 U-Net's conditioning at every denoising step.

Files, as downloaded (one folder; each part can be pointed elsewhere with ``ella=``, ``t5=``, ``sd=``)::

    PATH/ella-sd1.5-tsc-t5xl.safetensors    HF QQGYLab/ELLA
    PATH/flan-t5-xl/                        HF google/flan-t5-xl (the encoder half is used)
    PATH/stable-diffusion-v1-5/             HF runwayml/stable-diffusion-v1-5 (unet/, vae/, scheduler/;
                                            text_encoder/ and tokenizer/ only with clip=True)

It draws what ELLA's ``inference.py`` (TencentQQGYLab/ELLA at 3c228f1) draws: DPM-Solver++ built
from SD1.5's scheduler config, classifier-free guidance against the empty prompt, T5 states padded
or cut to 128 tokens ("fixed", the default) or left at each prompt's own length (``length="flexible"``,
its ``generate_image_with_flexible_max_length``), and the connector recomputed from the T5 states
and the timestep before every U-Net call.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from bidiffuser.checkpoint import check_state_dict, read_state_dict, require_file
from bidiffuser.errors import BiDiffuserError, first_line

from .backend import DrawingError, DrawingSettings, Progress, check_prompts, initial_noise, part_dtype
from .ella_connector import ELLAConnector

ELLA_FILE = "ella-sd1.5-tsc-t5xl.safetensors"
T5_DIR = "flan-t5-xl"
SD_DIR = "stable-diffusion-v1-5"
FIXED_LENGTH = 128      # inference.py's max_length: ELLA was trained on captions of up to 128 T5 tokens
# inference.py's ``main`` (its example images): 50 steps, guidance 12, 512 x 512.
STEPS, GUIDANCE = 50, 12.0

# DPMSolverMultistepScheduler.from_config(SD1.5's scheduler config), as inference.py builds it, with
# every default of diffusers 0.27.2 (ELLA's time) pinned, and the options added since then
# (exponential/beta/flow sigmas, dynamic shifting) pinned off, so later diffusers cannot move it.
SCHEDULER_PINS = dict(
    solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
    euler_at_final=False, use_karras_sigmas=False, use_lu_lambdas=False, final_sigmas_type="zero",
    lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", thresholding=False,
    prediction_type="epsilon", rescale_betas_zero_snr=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, use_flow_sigmas=False, use_dynamic_shifting=False,
)

def _part(path: Path, given, default: str, what: str) -> Path:
    p = Path(given) if given is not None else path / default
    if not p.exists():
        raise DrawingError(f"ELLA: {what} not found: {p}" + ("" if given is not None else
                                                              f" (or point to it with {what.split()[0]}=...)"))
    return p


def _pretrained(cls, path: Path, what: str, **kwargs):
    """``cls.from_pretrained`` refusing missing or mis-shaped weights, with a one-line error."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # FLAN-T5's decoder and lm_head are unused here: no load report for them
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise DrawingError(f"ELLA: cannot load {what} from {path}: {first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(level)
    bad = [f"{name}: {', '.join(map(str, sorted(keys)[:6]))}" for name, keys in
           (("missing keys", info.get("missing_keys", [])), ("mis-shaped keys", info.get("mismatched_keys", [])))
           if keys]
    if bad:
        raise DrawingError(f"ELLA: {what} at {path} does not match its config.json: {'; '.join(bad)}")
    return model.eval().requires_grad_(False)


def load_connector(path: str | os.PathLike, width: int, input_dim: int, heads: int = 8) -> ELLAConnector:
    """``ella-sd1.5-tsc-t5xl.safetensors`` into the released connector (ELLA() of model.py) whose width is
    the U-Net's cross-attention width and whose input is T5's d_model. Keys are strict: any missing,
    unexpected or mis-shaped key is a DrawingError listing them."""
    try:
        sd = read_state_dict(require_file(path, "ELLA connector"), "ELLA connector")
        with torch.device("meta"):
            model = ELLAConnector(time_embed_dim=width, width=width, heads=heads, input_dim=input_dim)
        check_state_dict(model.state_dict(), sd, path)
    except BiDiffuserError as e:
        raise DrawingError(f"ELLA connector: {e} (built as ELLA-SD1.5 with width {width} = the U-Net's "
                           f"cross_attention_dim and input {input_dim} = T5's d_model)") from None
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


class ELLABackend:
    name = "ella"
    max_batch = 4

    def __init__(self, *, connector, t5, tokenizer, unet, vae, scheduler_config, device, length="fixed",
                 fixed_negative=False, clip=None, paths=None):
        self.connector, self.t5, self.tokenizer = connector, t5, tokenizer
        self.unet, self.vae, self.scheduler_config = unet, vae, scheduler_config
        self.device, self.length, self.fixed_negative, self.clip = device, length, fixed_negative, clip
        self.paths = paths or {}
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        side = unet.config.sample_size * self.vae_scale  # 64 * 8 = 512 for SD1.5, inference.py's size
        self.defaults = DrawingSettings(steps=STEPS, guidance=GUIDANCE, width=side, height=side)

    # -- text -----------------------------------------------------------------------------------
    def _t5(self, texts: list[str], max_length: int | None) -> list[torch.Tensor]:
        """T5 encoder states per text (T5TextEmbedder of model.py): padded (masked in T5, kept in the
        output) and cut to ``max_length``, or each text alone at its own length when None."""
        if max_length is None:
            alone = {t: self._t5_batch([t], None)[0] for t in dict.fromkeys(texts)}
            return [alone[t] for t in texts]
        return list(self._t5_batch(texts, max_length))

    def _t5_batch(self, texts, max_length):
        kw = dict(max_length=max_length, padding="max_length", truncation=True) if max_length else {}
        tok = self.tokenizer(texts, return_tensors="pt", add_special_tokens=True, **kw)
        out = self.t5(tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device))
        return out.last_hidden_state.to(self.unet.dtype)

    def _clip(self, texts: list[str]) -> torch.Tensor:
        tokenizer, encoder = self.clip
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return encoder(ids.to(self.device))[0].to(self.unet.dtype)

    def _condition(self, states: list[torch.Tensor] | torch.Tensor, clip: torch.Tensor | None, t) -> torch.Tensor:
        """The U-Net's encoder states at timestep t: the connector on each row's T5 states (rows of
        different lengths one at a time, as inference.py's flexible-length workaround does)."""
        if isinstance(states, torch.Tensor):
            out = self.connector(states, t)
        else:
            out = torch.cat([self.connector(s.unsqueeze(0), t) for s in states])
        return out if clip is None else torch.cat([clip, out], dim=1)  # README: CLIP 77 + ELLA 64 tokens

    # -- drawing --------------------------------------------------------------------------------
    @torch.no_grad()
    def draw(self, prompts: Sequence[str], seeds: Sequence[int | None], steps: int | None = None,
             guidance: float | None = None, width: int | None = None, height: int | None = None,
             progress: Progress | None = None) -> list[Image.Image]:
        return self.to_pil(self.draw_tensor(prompts, seeds, steps, guidance, width, height, progress))

    @torch.no_grad()
    def draw_tensor(self, prompts, seeds, steps=None, guidance=None, width=None, height=None, progress=None):
        """The images as B x 3 x H x W floats in [0, 1] (the pipeline's ``output_type="pt"``)."""
        from diffusers import DPMSolverMultistepScheduler
        check_prompts(prompts, seeds)
        s = self.defaults.override(steps, guidance, width, height)
        if s.width % self.vae_scale or s.height % self.vae_scale or s.steps < 1:
            raise DrawingError(f"ELLA: width and height must be multiples of {self.vae_scale} and steps >= 1 "
                               f"(got {s.width}x{s.height}, {s.steps} steps)")
        n, prompts = len(prompts), list(prompts)
        cfg = s.guidance > 1  # as StableDiffusionPipeline: no unconditional branch at guidance <= 1
        fixed = self.length == "fixed"
        pos = self._t5(prompts, FIXED_LENGTH if fixed else None)
        neg = self._t5([""] * n, FIXED_LENGTH if fixed or self.fixed_negative else None) if cfg else []
        rows = neg + pos
        states = torch.stack(rows) if fixed else rows
        clip = None
        if self.clip is not None:
            clip = self._clip(([""] * n if cfg else []) + prompts)

        scheduler = DPMSolverMultistepScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(s.steps, device=self.device)
        shape = (n, self.unet.config.in_channels, s.height // self.vae_scale, s.width // self.vae_scale)
        latents = initial_noise(shape, seeds, self.device, self.unet.dtype) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            x = torch.cat([latents] * 2) if cfg else latents
            x = scheduler.scale_model_input(x, t)
            eps = self.unet(x, t, encoder_hidden_states=self._condition(states, clip, t), return_dict=False)[0]
            if cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + s.guidance * (text - uncond)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
            if progress is not None:
                progress(i + 1, s.steps)
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arr]

    def to(self, device) -> "ELLABackend":
        self.device = torch.device(device)
        for part in (self.connector, self.t5, self.unet, self.vae, *(self.clip or ())):
            if isinstance(part, torch.nn.Module):
                part.to(self.device)
        return self

    def describe(self) -> str:
        extra = " + CLIP" if self.clip is not None else ""
        return (f"ella ({self.length} length{extra}) from {self.paths.get('ella')}, T5 {self.paths.get('t5')}, "
                f"SD {self.paths.get('sd')} on {self.device} (U-Net {str(self.unet.dtype).removeprefix('torch.')}, "
                f"T5 {str(self.t5.dtype).removeprefix('torch.')})")


def load(path: str | os.PathLike, device=None, dtype: str | None = None, *, ella=None, t5=None, sd=None,
         t5_dtype: str | None = None, length: str = "fixed", fixed_negative: bool = False, clip: bool = False,
         heads: int = 8) -> ELLABackend:
    """ELLA-SD1.5 from ``path`` (the layout in the module docstring).

    dtype: U-Net, VAE and connector ("auto": float16 on CUDA as inference.py, float32 on CPU);
    t5_dtype: T5 encoder, same default (ELLA's README: T5 must run in fp16 on GPU, not bf16);
    length: "fixed" (128 tokens) or "flexible" (each prompt's own length); fixed_negative: in flexible
    mode, the empty negative prompt still padded to 128; clip: condition on CLIP-L (77 tokens) and ELLA
    (64) concatenated, as ELLA's README suggests for community models (its code has no such path)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import T5EncoderModel, T5Tokenizer

    from bidiffuser.cliutil import resolve_device
    if length not in ("fixed", "flexible"):
        raise DrawingError(f"ELLA: length must be 'fixed' or 'flexible' (got {length!r})")
    try:
        dev = resolve_device(device)
    except BiDiffuserError as e:
        raise DrawingError(str(e)) from None
    root = Path(path)
    ella_path = _part(root, ella, ELLA_FILE, "ella connector file")
    t5_path = _part(root, t5, T5_DIR, "t5 folder")
    sd_path = _part(root, sd, SD_DIR, "sd folder")
    main_dtype = part_dtype(dtype, dev, torch.float16, "ELLA: dtype")
    text_dtype = part_dtype(t5_dtype, dev, torch.float16, "ELLA: t5_dtype")

    unet = _pretrained(UNet2DConditionModel, sd_path / "unet", "SD1.5 U-Net", torch_dtype=main_dtype)
    vae = _pretrained(AutoencoderKL, sd_path / "vae", "SD1.5 VAE", torch_dtype=main_dtype)
    try:
        pndm = PNDMScheduler.from_pretrained(str(sd_path / "scheduler"))
    except (OSError, ValueError) as e:
        raise DrawingError(f"ELLA: cannot read SD1.5's scheduler config under {sd_path}: {first_line(e)}") from None
    scheduler_config = DPMSolverMultistepScheduler.from_config(pndm.config, **SCHEDULER_PINS).config
    t5_model = _pretrained(T5EncoderModel, t5_path, "FLAN-T5 encoder", dtype=text_dtype)
    try:
        tokenizer = T5Tokenizer.from_pretrained(str(t5_path))
    except (OSError, ValueError, TypeError) as e:
        raise DrawingError(f"ELLA: cannot load the T5 tokenizer from {t5_path}: {first_line(e)}") from None

    width, d_model = unet.config.cross_attention_dim, t5_model.config.d_model
    connector = load_connector(ella_path, width=width, input_dim=d_model, heads=heads).to(dev, main_dtype)
    clip_parts = None
    if clip:
        from transformers import CLIPTextModel, CLIPTokenizer
        encoder = _pretrained(CLIPTextModel, sd_path / "text_encoder", "SD1.5 CLIP text encoder", dtype=main_dtype)
        try:
            clip_tok = CLIPTokenizer.from_pretrained(str(sd_path / "tokenizer"))
        except (OSError, ValueError, TypeError) as e:
            raise DrawingError(f"ELLA: cannot load the CLIP tokenizer from {sd_path / 'tokenizer'}: "
                               f"{first_line(e)}") from None
        if encoder.config.hidden_size != width:
            raise DrawingError(f"ELLA: CLIP width {encoder.config.hidden_size} differs from the U-Net's "
                               f"cross-attention width {width}")
        clip_parts = (clip_tok, encoder.to(dev))
    return ELLABackend(connector=connector, t5=t5_model.to(dev), tokenizer=tokenizer, unet=unet.to(dev),
                       vae=vae.to(dev), scheduler_config=scheduler_config, device=dev, length=length,
                       fixed_negative=fixed_negative, clip=clip_parts,
                       paths={"ella": ella_path, "t5": t5_path, "sd": sd_path})
