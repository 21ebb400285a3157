"""Random weights for the released drawing systems at any size, in the layouts of
``drawing/tiny_layouts_*.py`` (same folders, file names, key names, containers and config fields):
``reduced`` takes those writers' own tiny configs, ``real`` the public configs of the released
models. Large files are written one tensor at a time (``stream_safetensors``), so a 7B model never
sits in memory: what is resident while writing is one tensor.

The real configs are written from the public config.json files (no network here); fields we are not
sure of are marked UNSURE where they are set.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from drawing import tiny_layouts_ella as tella
from drawing import tiny_layouts_lavi as tlavi
from drawing import tiny_layouts_paradiffusion as tpara

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TOKENIZER = ROOT / "tests" / "fixtures" / "llama_tokenizer" / "tokenizer.model"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


# ------------------------------------------------------------------------------ streaming writer
POOL = 16_777_259  # a prime number of standard normal values, drawn once (not a divisor of any width)
_pool: list[torch.Tensor] = []


def _normals() -> torch.Tensor:
    if not _pool:
        _pool.append(torch.randn(POOL, generator=torch.Generator().manual_seed(0)))
    return _pool[0]


def _chunks(key: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype):
    """One tensor's values, in pieces of at most POOL values: the pool read from an offset set by the
    key and the seed, scaled as an initialisation would (weights ~ N(0, 1/fan_in), norm scales ~ 1,
    biases small). Drawing 7B fresh normals takes tens of minutes on two shared cores; copying from
    a pool runs at memory speed, and random-looking values are all a dry run needs."""
    pool, n = _normals(), math.prod(shape)
    at = (seed * 1000003 + zlib.crc32(key.encode())) % POOL
    if len(shape) >= 2:
        scale, shift = 1 / math.sqrt(math.prod(shape[1:])), 0.0
    else:
        scale, shift = (0.1, 1.0) if key.endswith("weight") else (0.05, 0.0)
    while n:
        take = min(n, POOL - at)
        yield (pool[at:at + take] * scale + shift).to(dtype)
        n -= take
        at = (at + take) % POOL


def stream_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int) -> int:
    """A safetensors file of random tensors, written piece by piece (header first, offsets known
    from the shapes); returns its data bytes."""
    names = sorted(shapes)
    size = torch.tensor([], dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in names:
        n = math.prod(shapes[k]) * size
        header[k] = {"dtype": _ST_DTYPES[dtype], "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in names:
            for piece in _chunks(k, tuple(shapes[k]), seed, dtype):
                f.write(piece.view(torch.uint8).numpy().data)
    os.replace(tmp, path)
    return offset


def write_sharded(folder: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int,
                  shards: list[list[str]]) -> None:
    """``model-0000k-of-0000n.safetensors`` shards holding the given keys, and their index."""
    total, weight_map = 0, {}
    for i, keys in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += stream_safetensors(folder / fname, {k: shapes[k] for k in keys}, dtype, seed + i)
        weight_map.update({k: fname for k in keys})
    _json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _hf_shapes(model_cls, config_cls, cfg: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = model_cls(config_cls(**{k: v for k, v in cfg.items() if k != "architectures"}))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _diffusers_part(folder: Path, cls, cfg: dict, seed: int, extra: dict | None = None,
                    dtype=torch.float32) -> None:
    from drawing.tiny_layouts_paradiffusion import _diffusers_shapes
    _json(folder / "config.json", cfg)
    stream_safetensors(folder / "diffusion_pytorch_model.safetensors",
                       {**_diffusers_shapes(cls, cfg), **(extra or {})}, dtype, seed)


# ------------------------------------------------------------------------------ configs
def _sd_unet(base: dict, version: str) -> dict:
    """Stable Diffusion 1.x's unet/config.json (1.4 and 1.5 are the same network)."""
    return {**base, "_diffusers_version": version, "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2,
            "norm_num_groups": 32, "sample_size": 64,
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}


def _sd_vae(base: dict, **extra) -> dict:
    """The SD KL-f8 VAE (SD1.x, PixArt's sd-vae-ft-ema, SDXL's fp16-fix: the same shapes)."""
    return {**base, "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 32,
            "sample_size": 512, **extra}


LLAMA2_7B = {**tpara.LLAMA_CONFIG, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 32}   # meta-llama/Llama-2-7b-hf
FLAN_T5_XL = {**tella.FLAN_T5, "d_ff": 5120, "d_kv": 64, "d_model": 2048, "num_decoder_layers": 24,
              "num_heads": 32, "num_layers": 24, "vocab_size": 32128}  # google/flan-t5-xl
T5_LARGE = {**tlavi.T5_CONFIG, "d_ff": 4096, "d_kv": 64, "d_model": 1024, "num_decoder_layers": 24,
            "num_heads": 16, "num_layers": 24, "vocab_size": 32128}   # t5-large (relu, tied embeddings)
CLIP_L = {**tella.CLIP_TEXT, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
          "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408}  # SD1.5 text_encoder/
PIXART_512 = {**tlavi.PIXART_CONFIG, "attention_head_dim": 72, "caption_channels": 4096,
              "cross_attention_dim": 1152, "num_attention_heads": 16, "num_layers": 28, "sample_size": 64}
# ParaDiffusion's U-Net: block_out_channels and cross_attention_dim as its GitHub issue #6 quotes them.
# UNSURE (not published): the rest, chosen as Kandinsky 2.2's decoder places its attention (none at
# the full-resolution level), with SD's standard transformer blocks, 2 layers per block, 64-wide heads.
PARADIFFUSION_UNET = {**tpara.UNET_CONFIG, "block_out_channels": [384, 768, 1152, 1536], "cross_attention_dim": 4096,
                      "attention_head_dim": [6, 12, 18, 24], "layers_per_block": 2,
                      "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
                      "up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"], "sample_size": 128}


@dataclass(frozen=True)
class Sizes:
    """Every config a layout needs; ``reduced`` is exactly the tiny writers' configs."""
    ella_unet: dict
    ella_vae: dict
    clip_text: dict
    flan_t5: dict
    connector: dict
    lavi_unet: dict
    lavi_vae: dict
    pixart: dict
    llama: dict
    t5: dict
    adapters: dict
    para_unet: dict
    para_vae: dict
    para_unet_dtype: torch.dtype     # UNSURE: the dtype of ParaDiffusion's released unet file
    resolution: dict                 # the reference resolution per backend (width, height)


SIZES = {
    "reduced": Sizes(
        ella_unet=tella.UNET, ella_vae=tella.VAE, clip_text=tella.CLIP_TEXT, flan_t5=tella.FLAN_T5,
        connector=tella.CONNECTOR, lavi_unet=tlavi.UNET_CONFIG, lavi_vae=tlavi.VAE_CONFIG,
        pixart=tlavi.PIXART_CONFIG, llama=tpara.LLAMA_CONFIG, t5=tlavi.T5_CONFIG, adapters=tlavi.ADAPTERS,
        para_unet=tpara.UNET_CONFIG, para_vae=tpara.VAE_CONFIG, para_unet_dtype=torch.float32,
        resolution={"ella": (64, 64), "lavi": (64, 64), "paradiffusion": (64, 40)}),
    "real": Sizes(
        ella_unet=_sd_unet(tella.UNET, "0.6.0"), ella_vae=_sd_vae(tella.VAE), clip_text=CLIP_L, flan_t5=FLAN_T5_XL,
        connector={**tella.CONNECTOR, "time_embed_dim": 768, "width": 768, "input_dim": 2048},
        lavi_unet=_sd_unet(tlavi.UNET_CONFIG, "0.2.2"), lavi_vae=_sd_vae(tlavi.VAE_CONFIG), pixart=PIXART_512,
        llama=LLAMA2_7B, t5=T5_LARGE,
        adapters={"llama2_unet": (4096, 2432, 768), "t5_unet": (1024, 896, 768), "t5_transformer": (1024, 2560, 4096)},
        para_unet=PARADIFFUSION_UNET, para_vae=_sd_vae(tpara.VAE_CONFIG, sample_size=1024),
        para_unet_dtype=torch.float16,
        resolution={"ella": (512, 512), "lavi": (512, 512), "paradiffusion": (1024, 640)}),
}


# ------------------------------------------------------------------------------ writers
def _marker(folder: Path, what: str) -> Path:
    """Where "written completely" is recorded: beside the download, never inside its layout."""
    return folder.parent / f".{folder.name}-{what}.done"


def write_llama(folder: Path, cfg: dict, seed: int = 5) -> Path:
    """Llama-2-7b-hf as released: two fp16 safetensors shards + index, config, generation config and
    LLaMA's tokenizer files (tokenizer.model, tokenizer.json, tokenizer_config.json, special tokens)."""
    if (folder / "config.json").exists():
        return folder
    shapes = tpara._llama_shapes(cfg)
    keys = sorted(shapes)
    # the release's split: about three quarters of the bytes in the first shard
    nbytes = {k: math.prod(shapes[k]) for k in keys}
    first, acc, budget = [], 0, 0.74 * sum(nbytes.values())
    for k in keys:
        if acc < budget:
            first.append(k)
            acc += nbytes[k]
    write_sharded(folder, shapes, torch.float16, seed, [first, [k for k in keys if k not in first]])
    tpara._write_tokenizer(folder, LLAMA_TOKENIZER)
    _json(folder / "generation_config.json", tpara.GENERATION_CONFIG)
    _json(folder / "config.json", cfg)  # last: marks the folder complete
    return folder


def write_ella(root: Path, size: Sizes, seed: int = 0) -> Path:
    """ELLA-SD1.5's three downloads (``drawing.tiny_layouts_ella``'s layout)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5ForConditionalGeneration

    if _marker(root, "ella").exists():
        return root
    stream_safetensors(root / tella.ELLA_FILE, tella.connector_shapes(size.connector), torch.float32, seed)
    t5 = root / tella.T5_DIR
    shapes = {k: v for k, v in _hf_shapes(T5ForConditionalGeneration, T5Config, size.flan_t5).items()
              if not k.endswith("embed_tokens.weight")}
    names = sorted(shapes)
    write_sharded(t5, shapes, torch.float32, seed + 10, [[k for k in names if not k.startswith("encoder.")],
                                                          [k for k in names if k.startswith("encoder.")]])
    _json(t5 / "config.json", size.flan_t5)
    tella._write_t5_tokenizer(t5)
    sd = root / tella.SD_DIR
    _json(sd / "model_index.json", tella.SD15_MODEL_INDEX)
    _json(sd / "scheduler" / "scheduler_config.json", tella.SD15_SCHEDULER)
    _diffusers_part(sd / "unet", UNet2DConditionModel, size.ella_unet, seed + 21)
    _diffusers_part(sd / "vae", AutoencoderKL, size.ella_vae, seed + 22)
    _json(sd / "text_encoder" / "config.json", size.clip_text)
    clip = _hf_shapes(CLIPTextModel, CLIPTextConfig, size.clip_text)
    stream_safetensors(sd / "text_encoder" / "model.safetensors",
                       {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip.items()
                        if not k.endswith("position_ids")}, torch.float32, seed + 23)
    tella._clip_tokenizer_files(sd / "tokenizer")
    _marker(root, "ella").write_text("")
    return root


def _link(target: Path, link: Path) -> None:
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def write_lavi(root: Path, size: Sizes, combo: str, llama: Path | None, seed: int = 0) -> Path:
    """One LaVi-Bridge combo folder and its bases (``drawing.tiny_layouts_lavi``'s layout); the
    Llama folder is ``llama`` linked in (shared with ParaDiffusion)."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    from drawing.lavi_adapter import TextAdapter, save_adapter
    from drawing.lavi_lora import (LLAMA_TARGETS, T5_TARGETS, TRANSFORMER_TARGETS, UNET_TARGETS, save_positional)

    folder = root / combo
    if _marker(root, combo).exists():
        return folder
    if combo == "t5_transformer":
        base = root / "PixArt-XL-2-512x512"
        cfg = size.pixart
        _diffusers_part(base / "transformer", PixArtTransformer2DModel, cfg, seed + 3,
                        {"caption_projection.y_embedding": (120, cfg["caption_channels"])})
        _diffusers_part(base / "vae", AutoencoderKL, size.lavi_vae, seed + 4)
        _json(base / "scheduler" / "scheduler_config.json", tlavi.PIXART_SCHEDULER)
        vis_cls, vis_cfg, vis_targets = PixArtTransformer2DModel, cfg, TRANSFORMER_TARGETS
    else:
        base = root / "stable-diffusion-v1-4"
        _diffusers_part(base / "unet", UNet2DConditionModel, size.lavi_unet, seed + 1)
        _diffusers_part(base / "vae", AutoencoderKL, size.lavi_vae, seed + 2)
        _json(base / "scheduler" / "scheduler_config.json", tlavi.SD_SCHEDULER)
        vis_cls, vis_cfg, vis_targets = UNet2DConditionModel, size.lavi_unet, UNET_TARGETS
    with torch.device("meta"):
        vis = vis_cls.from_config({k: v for k, v in vis_cfg.items() if not k.startswith("_")})
    if combo == "llama2_unet":
        _link(write_llama(llama, size.llama), root / "Llama-2-7b-hf")
        with torch.device("meta"):
            text = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in size.llama.items() if k != "architectures"}))
        text_targets = LLAMA_TARGETS
    else:
        t5 = root / "t5-large"
        if not (t5 / "config.json").exists():
            shapes = {k: v for k, v in _hf_shapes(T5ForConditionalGeneration, T5Config, size.t5).items()
                      if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")}
            stream_safetensors(t5 / "model.safetensors", shapes, torch.float32, seed + 6)
            _json(t5 / "tokenizer.json", tlavi.t5_tokenizer_json())
            _json(t5 / "tokenizer_config.json", {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>",
                                                 "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": 0,
                                                 "additional_special_tokens": [], "model_max_length": 512})
            _json(t5 / "special_tokens_map.json", {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
            _json(t5 / "config.json", size.t5)
        with torch.device("meta"):  # the encoder as the scripts take it from the whole model
            text = T5ForConditionalGeneration(T5Config(**{k: v for k, v in size.t5.items()
                                                          if k != "architectures"})).get_encoder()
        text_targets = T5_TARGETS
    i = list(tlavi.ADAPTERS).index(combo)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in TextAdapter(*size.adapters[combo]).state_dict().items()}
    adapter = TextAdapter(*size.adapters[combo])
    adapter.load_state_dict(tlavi._fill(shapes, seed + 10 + i))
    save_adapter(adapter, folder / "adapter", safetensors=combo == "t5_transformer")
    del adapter
    save_positional(tlavi._lora_list(vis, vis_targets, seed + 20 + i), folder / "lora_vis.pt")
    save_positional(tlavi._lora_list(text, text_targets, seed + 30 + i), folder / "lora_text.pt")
    _marker(root, combo).write_text("")
    return folder


def write_paradiffusion(root: Path, size: Sizes, llama: Path, seed: int = 0) -> Path:
    """ParaDiffusion's five folders (``drawing.tiny_layouts_paradiffusion``'s layout), the Llama linked in."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if _marker(root, "paradiffusion").exists():
        return root
    _link(write_llama(llama, size.llama), root / "Llama-2-7b-hf")
    lora = root / "text_encoder_lora"
    stream_safetensors(lora / "adapter_model.safetensors", tpara._lora_shapes(size.llama, tpara.ADAPTER_CONFIG),
                       torch.float32, seed + 1)
    _json(lora / "adapter_config.json", tpara.ADAPTER_CONFIG)
    _diffusers_part(root / "unet", UNet2DConditionModel, size.para_unet, seed + 2, dtype=size.para_unet_dtype)
    _diffusers_part(root / "sdxl-vae-fp16-fix", AutoencoderKL, size.para_vae, seed + 3)
    _json(root / "scheduler" / "scheduler_config.json", tpara.SCHEDULER_CONFIG)
    _marker(root, "paradiffusion").write_text("")
    return root
