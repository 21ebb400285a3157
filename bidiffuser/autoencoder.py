"""The Stable Diffusion KL-f8 VAE that UniDiffuser uses, as a ``diffusers.AutoencoderKL``.

The official weights (``autoencoder_kl.pth``) use the LDM key names of
``libs/autoencoder.py`` (``encoder.down.0.block.0.conv1.weight``, ``decoder.up.3.upsample...``);
diffusers names the same tensors differently. ``ldm_to_diffusers`` / ``diffusers_to_ldm`` map
between the two exactly, so we can read the official file and write files the official code reads.

Latent convention (as in UniDiffuser): ``encode_image`` returns posterior samples already multiplied
by ``scale_factor`` (0.18215) and ``decode_latents`` divides by it before decoding.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from diffusers.utils.torch_utils import randn_tensor

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

from .checkpoint import StateDict, check_state_dict, read_state_dict
from .config_base import DictConfig
from .errors import BiDiffuserError

# Attention projections: 1x1 convolutions in LDM, linear layers in diffusers.
_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                          "proj_out": "to_out.0"}
_ATTN_DIFFUSERS_TO_LDM = {v: k for k, v in _ATTN_LDM_TO_DIFFUSERS.items()}
# Old diffusers releases named the attention layers differently; accept them when reading.
_OLD_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class AutoencoderConfig(DictConfig):
    """LDM ``ddconfig`` of the KL autoencoder (names as in ``libs/autoencoder.py``)."""

    ch: int
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = 0.18215
    norm_num_groups: int = 32

    def __post_init__(self):
        self.ch_mult = list(self.ch_mult)
        # LDM's quant_conv maps 2*z_channels -> 2*embed_dim; diffusers has one `latent_channels`.
        if self.z_channels != self.embed_dim:
            raise BiDiffuserError(f"AutoencoderConfig: z_channels ({self.z_channels}) must equal "
                                  f"embed_dim ({self.embed_dim}) for diffusers.AutoencoderKL")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise BiDiffuserError(f"AutoencoderConfig: channels {bad} are not divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")

    @classmethod
    def sd(cls) -> "AutoencoderConfig":
        """Stable Diffusion's KL-f8 VAE (the one in ``autoencoder_kl.pth``)."""
        return cls(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, embed_dim=4)

    @classmethod
    def tiny(cls) -> "AutoencoderConfig":
        """A few-thousand-parameter VAE for tests: downsampling factor 2, 4 latent channels."""
        return cls(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4,
                   norm_num_groups=4)

    @property
    def block_out_channels(self) -> list[int]:
        return [self.ch * m for m in self.ch_mult]

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD, 2 for tiny)."""
        return 2 ** (len(self.ch_mult) - 1)




def _autoencoder_kl() -> type:
    """``diffusers.AutoencoderKL``, imported without the peft and bitsandbytes integrations that
    diffusers' model code loads at import when those packages are installed (about 3 s of a chat's
    start: bitsandbytes brings torch's compiler). They serve diffusers' own LoRA loading and
    bitsandbytes quantization, which BiDiffuser never uses; EasyGen's --load-8bit/--load-4bit goes
    through easygen.quantize and its LoRA through peft directly, each importing what it needs. A
    package some other code has imported already keeps its diffusers integration."""
    from diffusers.utils import import_utils  # diffusers reads these flags when its modules import

    skipped = {flag: getattr(import_utils, flag) for package, flag in (("peft", "_peft_available"),
                                                                      ("bitsandbytes", "_bitsandbytes_available"))
               if package not in sys.modules and hasattr(import_utils, flag)}
    vars(import_utils).update(dict.fromkeys(skipped, False))
    try:
        from diffusers import AutoencoderKL
    finally:
        vars(import_utils).update(skipped)
    return AutoencoderKL


def build_autoencoder(config: AutoencoderConfig) -> AutoencoderKL:
    """A randomly initialised ``diffusers.AutoencoderKL`` with the architecture of ``config``."""
    n = len(config.ch_mult)
    return _autoencoder_kl()(
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=config.norm_num_groups,
        scaling_factor=config.scale_factor,
    )


# ---------------------------------------------------------------------------------------------
# Key mapping. One rule set (diffusers name -> LDM name); the reverse direction is its inverse over
# the keys the config's model actually has, so the two directions can never disagree.

def _diffusers_key_to_ldm(key: str, num_levels: int) -> str:
    """LDM name of one diffusers AutoencoderKL parameter name (unknown names are returned as is)."""
    def sub_block(rest: str) -> str:  # inside a ResnetBlock
        return rest.replace("conv_shortcut.", "nin_shortcut.")

    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{sub_block(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        if m[2] in _ATTN_DIFFUSERS_TO_LDM:
            return f"{m[1]}.mid.attn_1.{_ATTN_DIFFUSERS_TO_LDM[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{sub_block(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    # LDM builds the decoder's up blocks from the lowest resolution up but stores them by level.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{sub_block(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv: same names


def _is_attn_weight(diffusers_key: str) -> bool:
    return bool(re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\."
                             r"(to_q|to_k|to_v|to_out\.0)\.weight", diffusers_key))


@functools.lru_cache(maxsize=8)
def _key_maps(config_json: str) -> tuple[dict[str, str], dict[str, str]]:
    """(diffusers -> LDM, LDM -> diffusers) name maps for every parameter of the config's model."""
    config = AutoencoderConfig.from_dict(json.loads(config_json))
    with torch.device("meta"):  # only the names are needed: allocate nothing
        names = list(build_autoencoder(config).state_dict())
    to_ldm = {k: _diffusers_key_to_ldm(k, len(config.ch_mult)) for k in names}
    return to_ldm, {v: k for k, v in to_ldm.items()}


def _maps(config: AutoencoderConfig) -> tuple[dict[str, str], dict[str, str]]:
    return _key_maps(json.dumps(config.to_dict(), sort_keys=True))


def diffusers_to_ldm(sd: Mapping[str, torch.Tensor], config: AutoencoderConfig) -> StateDict:
    """Rename a diffusers AutoencoderKL state dict to LDM names; attention linears become 1x1 convs.

    Keys the config's model does not have are kept unchanged (so a strict check can report them).
    """
    to_ldm, _ = _maps(config)
    out = {}
    for key, value in sd.items():
        if _is_attn_weight(key) and value.ndim == 2:
            value = value[:, :, None, None]
        out[to_ldm.get(key, key)] = value
    return out


def ldm_to_diffusers(sd: Mapping[str, torch.Tensor], config: AutoencoderConfig) -> StateDict:
    """Rename an LDM (``autoencoder_kl.pth``) state dict to diffusers names; drops ``loss.*``.

    The official file may carry the training loss's discriminator/LPIPS weights under ``loss.``;
    they are not part of the autoencoder. Unknown keys are kept unchanged.
    """
    _, to_diffusers = _maps(config)
    out = {}
    for key, value in sd.items():
        if key.startswith("loss."):
            continue
        new = to_diffusers.get(key, key)
        if _is_attn_weight(new) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def _is_diffusers_naming(sd: Mapping[str, torch.Tensor]) -> bool:
    """Anything else is read as LDM, the official naming, so errors use the names users know."""
    return any(re.match(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.", k) for k in sd)


def _upgrade_old_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"(.+\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)", key)
        out[f"{m[1]}{_OLD_DIFFUSERS_ATTN[m[2]]}.{m[3]}" if m else key] = value
    return out


def official_state_dict(vae: AutoencoderKL, config: AutoencoderConfig) -> StateDict:
    """``vae``'s weights in the official LDM names, ready to ``torch.save`` as autoencoder_kl.pth."""
    return diffusers_to_ldm(vae.state_dict(), config)


def load_autoencoder(path: str | os.PathLike, config: AutoencoderConfig | None = None,
                     device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Load the VAE, strictly, from ``autoencoder_kl.pth`` (LDM names) or a safetensors file in
    either naming, or a diffusers directory holding ``diffusion_pytorch_model.safetensors``.

    ``config`` defaults to ``AutoencoderConfig.sd()``. Mismatches are reported in the naming of the
    file, so the user sees the key names they know. Returns the model in eval mode, frozen.
    """
    config = config or AutoencoderConfig.sd()
    path = Path(path)
    if path.is_dir():
        path = path / "diffusion_pytorch_model.safetensors"
    sd = read_state_dict(path, "autoencoder checkpoint", dtype=dtype)
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}

    with torch.device("meta"):
        expected = build_autoencoder(config).state_dict()
    if _is_diffusers_naming(sd):
        sd = _upgrade_old_diffusers(sd)
    else:
        check_state_dict(diffusers_to_ldm(expected, config), sd, path)
        sd = ldm_to_diffusers(sd, config)
    check_state_dict(expected, sd, path)

    with torch.device("meta"):
        vae = build_autoencoder(config)
    vae.load_state_dict(sd, strict=True, assign=True)
    # The tensors are already in ``dtype`` (read that way); diffusers' .to(dtype=...) would only
    # print its "modules that should be kept in float32" warning.
    return vae.to(device=device).eval().requires_grad_(False)


def _scale(vae: AutoencoderKL) -> float:
    return float(vae.config.scaling_factor)


@torch.no_grad()
def image_posterior(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the posterior of B×3×H×W images in [-1, 1], both already multiplied by the scale
    factor (``sample_posterior`` draws from it)."""
    if images.ndim != 4 or images.shape[1] != vae.config.in_channels:
        raise BiDiffuserError(f"encode_image expects B×{vae.config.in_channels}×H×W images, "
                              f"got shape {tuple(images.shape)}")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise BiDiffuserError(f"encode_image: image size {tuple(images.shape[-2:])} is not a "
                              f"multiple of the VAE downsampling factor {factor}")
    param = next(vae.parameters())
    posterior = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
    return posterior.mean * _scale(vae), posterior.std * _scale(vae)


def sample_posterior(mean: torch.Tensor, std: torch.Tensor,
                     generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """``mean + std * noise``, the noise drawn as diffusers' posterior ``sample`` draws it: with a
    generator list, row i from ``generator[i]`` only."""
    return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


@torch.no_grad()
def encode_image(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None,
                 sample: bool = True) -> torch.Tensor:
    """B×3×H×W images in [-1, 1] -> B×z×h×w latents already multiplied by the scale factor.

    ``sample=True`` draws from the posterior (mean + std·noise, noise from ``generator``), as
    UniDiffuser's ``autoencoder.sample(moments)`` does; ``sample=False`` returns the mean.
    """
    mean, std = image_posterior(vae, images)
    return sample_posterior(mean, std, generator) if sample else mean


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Scaled latents (as returned by ``encode_image``) -> B×3×H×W images in [-1, 1].

    ``clamp`` clips the decoder's slight overshoot so the result is a valid image.
    """
    param = next(vae.parameters())
    images = vae.decode(latents.to(device=param.device, dtype=param.dtype) / _scale(vae)).sample
    return images.clamp(-1, 1) if clamp else images
