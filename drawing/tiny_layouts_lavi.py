"""Tiny random LaVi-Bridge downloads in exactly the released layouts, for tests and the parity driver.

``write_tiny_lavi(root)`` writes, deterministically (same bytes on every run)::

    root/llama2_unet/ t5_unet/ t5_transformer/     adapter/ + lora_vis.pt + lora_text.pt
    root/stable-diffusion-v1-4/                    unet/ vae/ scheduler/ (diffusers layout)
    root/PixArt-XL-2-512x512/                      transformer/ vae/ scheduler/
    root/Llama-2-7b-hf/                            config.json, model.safetensors, tokenizer.model (LLaMA's)
    root/t5-large/                                 config.json, model.safetensors, tokenizer.json

Every LoRA'd layer is at least 32 wide: the scripts hard-code ``r=32`` and cloneofsimo-lora refuses
layers narrower than the rank it is given. Images are 64x64 (8x8 latents).
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import torch

from bidiffuser.checkpoint import save_safetensors

from .lavi_adapter import TextAdapter, save_adapter
from .lavi_lora import (LLAMA_TARGETS, SCRIPT_RANK, T5_TARGETS, TRANSFORMER_TARGETS, UNET_TARGETS,
                        reference_order, save_positional)

SIZE = 64
LLAMA_TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llama_tokenizer" / "tokenizer.model"

UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.2.2", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [32, 64], "center_input_sample": False,
    "cross_attention_dim": 32, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 8, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.2.2", "act_fn": "silu",
    "block_out_channels": [8, 8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4, "out_channels": 3,
    "sample_size": SIZE, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD_SCHEDULER = {  # SD1.4's scheduler folder holds a PNDM config; the scripts read UniPC from it
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
PIXART_CONFIG = {  # PixArt-XL-2-512x512's transformer config (a Transformer2DModel), shrunk
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.22.0.dev0", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 8, "attention_type": "default", "caption_channels": 48,
    "cross_attention_dim": 32, "double_self_attention": False, "dropout": 0.0, "in_channels": 4,
    "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_num_groups": 32, "norm_type": "ada_norm_single",
    "num_attention_heads": 4, "num_embeds_ada_norm": 1000, "num_layers": 2, "num_vector_embeds": None,
    "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 8,
    "upcast_attention": False, "use_linear_projection": False,
}
PIXART_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.22.0.dev0",
    "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995, "lower_order_final": True, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint",
    "steps_offset": 0, "thresholding": False, "trained_betas": None, "use_karras_sigmas": False,
    "variance_type": None,
}
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 128,
    "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4,
    "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0.dev0",
    "use_cache": True, "vocab_size": 32000,
}
LLAMA_TOKENIZER_CONFIG = {  # Llama-2-7b-hf's, less the chat template
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
    "eos_token": "</s>", "legacy": False, "model_max_length": 1000000000000000019884624838656,
    "pad_token": None, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
}
T5_CONFIG = {
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 64, "d_kv": 8, "d_model": 32,
    "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "relu",
    "initializer_factor": 1.0, "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
    "n_positions": 512, "num_decoder_layers": 1, "num_heads": 4, "num_layers": 2, "output_past": True,
    "pad_token_id": 0, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "vocab_size": 128,
}
# (in, mid, out) of each adapter: the released (4096, 2432, 768), (1024, 896, 768), (1024, 2560, 4096), shrunk
ADAPTERS = {"llama2_unet": (32, 40, 32), "t5_unet": (32, 40, 32), "t5_transformer": (32, 40, 48)}
T5_WORDS = ("best quality extremely detailed 4k resolution a an the red blue green circle square triangle "
            "of on in with and city cat dog small big tea glass").split()


def _fill(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors by name (each from its own seed, so a key set change moves no other tensor)."""
    out = {}
    for key in sorted(shapes):
        g = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(key.encode()))
        shape = tuple(shapes[key])
        t = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            t = t / max(1, int(torch.tensor(shape[1:]).prod())) ** 0.5
        elif key.endswith("weight") and ("norm" in key or "layer_norm" in key):
            t = 1 + 0.1 * t
        else:
            t = 0.1 * t
        out[key] = t
    return out


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _diffusers_part(folder: Path, cls, config: dict, seed: int, extra: dict | None = None):
    """``extra``: keys the released file holds that today's class no longer has."""
    model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    sd = _fill({**shapes, **(extra or {})}, seed)
    _json(folder / "config.json", config)
    save_safetensors(sd, folder / "diffusion_pytorch_model.safetensors")
    model.load_state_dict({k: sd[k] for k in shapes})
    return model


def t5_tokenizer_json() -> dict:
    """A T5-style Unigram tokenizer (``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``$A </s>``), tiny vocabulary."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -4.5) for c in chars[:26]]
    pieces += [("▁" + w, -1.0 - 0.01 * i) for i, w in enumerate(T5_WORDS)]
    assert len(pieces) <= T5_CONFIG["vocab_size"]
    special = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, c in enumerate(("<pad>", "</s>", "<unk>"))]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": None,
        # t5-large's own pipeline, Metaspace written as its file writes it (older tokenizers read only this form)
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"}, {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
        "decoder": {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True},
        "model": {"type": "Unigram", "unk_id": 2, "vocab": [list(p) for p in pieces], "byte_fallback": False},
    }


def _lora_list(model, targets, seed: int, rank: int = SCRIPT_RANK) -> list[torch.Tensor]:
    tensors = []
    for k, site in enumerate(reference_order(model, targets)):
        g = torch.Generator().manual_seed(seed * 7919 + k)
        up_shape, down_shape = site.expected_shapes(rank)
        fan = int(torch.tensor(down_shape[1:]).prod())
        tensors += [torch.randn(up_shape, generator=g) * 0.05 / rank ** 0.5,
                    torch.randn(down_shape, generator=g) / fan ** 0.5]
    return tensors


def write_tiny_lavi(root: str | os.PathLike, seed: int = 0) -> Path:
    """Write all four bases and the three combos under ``root`` (replacing what is there)."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sd14, pixart = root / "stable-diffusion-v1-4", root / "PixArt-XL-2-512x512"
    unet = _diffusers_part(sd14 / "unet", UNet2DConditionModel, UNET_CONFIG, seed + 1)
    _diffusers_part(sd14 / "vae", AutoencoderKL, VAE_CONFIG, seed + 2)
    _json(sd14 / "scheduler" / "scheduler_config.json", SD_SCHEDULER)
    # PixArt's file also holds the caption projection's unused null embedding (120 tokens), a buffer of
    # diffusers 0.24's class that today's class dropped
    transformer = _diffusers_part(pixart / "transformer", PixArtTransformer2DModel, PIXART_CONFIG, seed + 3,
                                  {"caption_projection.y_embedding": (120, PIXART_CONFIG["caption_channels"])})
    _diffusers_part(pixart / "vae", AutoencoderKL, VAE_CONFIG, seed + 4)
    _json(pixart / "scheduler" / "scheduler_config.json", PIXART_SCHEDULER)

    llama_dir = root / "Llama-2-7b-hf"
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LLAMA_CONFIG.items() if k != "architectures"}))
    sd = _fill({k: v.shape for k, v in llama.state_dict().items()}, seed + 5)
    llama.load_state_dict(sd)
    _json(llama_dir / "config.json", LLAMA_CONFIG)
    save_safetensors({k: v.half() for k, v in sd.items()}, llama_dir / "model.safetensors", {"format": "pt"})
    llama_dir.mkdir(exist_ok=True)
    shutil.copyfile(LLAMA_TOKENIZER, llama_dir / "tokenizer.model")
    _json(llama_dir / "tokenizer_config.json", LLAMA_TOKENIZER_CONFIG)
    _json(llama_dir / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})

    t5_dir = root / "t5-large"
    t5 = T5ForConditionalGeneration(T5Config(**{k: v for k, v in T5_CONFIG.items() if k != "architectures"}))
    # tied copies of ``shared.weight`` are not stored, as in t5-large's own file
    sd = _fill({k: v.shape for k, v in t5.state_dict().items()
                if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")}, seed + 6)
    _json(t5_dir / "config.json", T5_CONFIG)
    save_safetensors(sd, t5_dir / "model.safetensors", {"format": "pt"})
    t5.load_state_dict(sd, strict=False)
    _json(t5_dir / "tokenizer.json", t5_tokenizer_json())
    _json(t5_dir / "tokenizer_config.json", {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>",
                                              "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": 0,
                                              "additional_special_tokens": [], "model_max_length": 512})
    _json(t5_dir / "special_tokens_map.json", {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})

    encoder = t5.get_encoder()
    vis_of = {"llama2_unet": (unet, UNET_TARGETS), "t5_unet": (unet, UNET_TARGETS),
              "t5_transformer": (transformer, TRANSFORMER_TARGETS)}
    text_of = {"llama2_unet": (llama, LLAMA_TARGETS), "t5_unet": (encoder, T5_TARGETS),
               "t5_transformer": (encoder, T5_TARGETS)}
    for i, (combo, dims) in enumerate(ADAPTERS.items()):
        folder = root / combo
        adapter = TextAdapter(*dims)
        adapter.load_state_dict(_fill({k: v.shape for k, v in adapter.state_dict().items()}, seed + 10 + i))
        # the U-Net releases ship the adapter as .bin, PixArt's as safetensors (its script asks for it)
        save_adapter(adapter, folder / "adapter", safetensors=combo == "t5_transformer")
        save_positional(_lora_list(*vis_of[combo], seed + 20 + i), folder / "lora_vis.pt")
        save_positional(_lora_list(*text_of[combo], seed + 30 + i), folder / "lora_text.pt")
    return root


def tiny_files(root: str | os.PathLike) -> list[str]:
    """Every file ``write_tiny_lavi`` writes, relative to ``root``, sorted (for the sha256 record)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


if __name__ == "__main__":
    import sys
    print(write_tiny_lavi(sys.argv[1]))
