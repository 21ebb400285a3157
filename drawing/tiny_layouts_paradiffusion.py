"""Tiny random ParaDiffusion files in the released layout (weijiawu/ParaDiffusion on the Hugging Face
Hub, as its ``demo.py`` reads them under ``./weights/``), for tests and the reference-parity driver.

    Llama-2-7b-hf/      config.json, generation_config.json, model-0000{1,2}-of-00002.safetensors,
                        model.safetensors.index.json, tokenizer.model, tokenizer.json,
                        tokenizer_config.json, special_tokens_map.json
    text_encoder_lora/  adapter_config.json (peft 0.7.1's fields), adapter_model.safetensors
    unet/               config.json, diffusion_pytorch_model.safetensors
    sdxl-vae-fp16-fix/  config.json, diffusion_pytorch_model.safetensors
    scheduler/          scheduler_config.json

Every file is written from fixed configs and seeded values (never from a library's own init), so the
same call gives the same bytes with any torch/diffusers/transformers version; the configs carry the
fields the files were written with in 2023 (diffusers 0.20, transformers 4.31, peft 0.7), so the
reference's old libraries read them too. The Llama is LLaMA-2's real vocabulary (32000 pieces from
the given ``tokenizer.model``) on a 2-layer, 32-wide model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 32  # the Llama's hidden size, and so the U-Net's cross_attention_dim

LLAMA_CONFIG = {
    "_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02,
    "intermediate_size": 64, "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 4,
    "num_hidden_layers": 2, "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                     "temperature": 0.9, "max_length": 4096, "top_p": 0.6, "transformers_version": "4.31.0.dev0"}


def _special(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


# Llama-2-7b-hf's tokenizer_config.json (its padding side is "right"; no pad token)
TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": _special("<s>"),
    "clean_up_tokenization_spaces": False, "eos_token": _special("</s>"), "legacy": False,
    "model_max_length": 1000000000000000019884624838656, "pad_token": None, "padding_side": "right",
    "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": _special("<unk>"),
}
SPECIAL_TOKENS_MAP = {k: {kk: vv for kk, vv in _special(v).items() if kk != "__type"}
                      for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}

# peft 0.7.1's LoraConfig fields, as its save_pretrained writes them (older peft reads no others)
ADAPTER_CONFIG = {
    "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "./weights/Llama-2-7b-hf",
    "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 16,
    "lora_dropout": 0.05, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "peft_type": "LORA", "r": 4, "rank_pattern": {}, "revision": None, "target_modules": ["q_proj", "v_proj"],
    "task_type": None,
}

# diffusers 0.20's configs, every field written out (so no default can differ between versions)
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.20.0", "act_fn": "silu",
    "addition_embed_type": None, "addition_embed_type_num_heads": 64, "addition_time_embed_dim": None,
    "attention_head_dim": 8, "attention_type": "default", "block_out_channels": [32, 64],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": HIDDEN, "cross_attention_norm": None,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 1,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 16, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "upcast_attention": False,
    "use_linear_projection": False,
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0", "act_fn": "silu", "block_out_channels": [32, 32],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "force_upcast": False, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 32, "out_channels": 3, "sample_size": 16,
    "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
}
# Stable Diffusion's DPM-Solver++ config (leading spacing, steps_offset 1), as diffusers 0.20 writes it
SCHEDULER_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.20.0", "algorithm_type": "dpmsolver++",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "dynamic_thresholding_ratio": 0.995,
    "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "solver_order": 2, "solver_type": "midpoint", "steps_offset": 1, "thresholding": False,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False, "variance_type": None,
}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _seeded(shapes: dict[str, tuple[int, ...]], seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Values for every key, in sorted key order from one generator: weights ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.05)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        x = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            x = x / fan_in ** 0.5
        elif name.endswith("weight"):
            x = 1 + 0.1 * x
        else:
            x = 0.05 * x
        out[name] = x.to(dtype).contiguous()
    return out


def _llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{m}_proj.weight": (d, d) for m in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    return shapes


def _write_llama(out: Path, seed: int) -> dict[str, torch.Tensor]:
    """The weights in Llama-2-7b-hf's two safetensors shards with their index (fp16, as released)."""
    sd = _seeded(_llama_shapes(LLAMA_CONFIG), seed, torch.float16)
    keys = sorted(sd)
    first = [k for k in keys if k.startswith("model.layers.0.") or k == "model.embed_tokens.weight"]
    shards = {"model-00001-of-00002.safetensors": first,
              "model-00002-of-00002.safetensors": [k for k in keys if k not in first]}
    weight_map = {}
    for fname, names in shards.items():
        save_file({k: sd[k] for k in names}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(out / "config.json", LLAMA_CONFIG)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    return sd


def tokenizer_json(model_file: str | Path) -> dict:
    """LLaMA's tokenizer.json as transformers 4.3x's converter wrote it from ``tokenizer.model`` (the
    file Llama-2-7b-hf ships): byte-fallback BPE, merges ordered by the merged piece's score, then by
    the ids of the left and right pieces, normaliser "prepend ▁, spaces to ▁", BOS added by the post-processor."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    score = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    # the converter keeps a merge only when its piece's score is truthy (a score of 0 drops it)
    merges = sorted((-score[p], vocab[p[:cut]], vocab[p[cut:]], p[:cut], p[cut:]) for p in vocab if score[p]
                    for cut in range(1, len(p)) if p[:cut] in vocab and p[cut:] in vocab)

    def added(i: int, content: str) -> dict:
        return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": True, "special": True}

    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "vocab": vocab,
                  "merges": [f"{left} {right}" for *_, left, right in merges]},
    }


def _write_tokenizer(out: Path, model_file: Path) -> None:
    shutil.copyfile(model_file, out / "tokenizer.model")
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(model_file), indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    _write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    _write_json(out / "special_tokens_map.json", SPECIAL_TOKENS_MAP)


def _lora_shapes(cfg: dict, lora: dict) -> dict[str, tuple[int, ...]]:
    d, r = cfg["hidden_size"], lora["r"]
    shapes = {}
    for i in range(cfg["num_hidden_layers"]):
        for m in lora["target_modules"]:
            p = f"base_model.model.layers.{i}.self_attn.{m}."
            shapes[p + "lora_A.weight"] = (r, d)
            shapes[p + "lora_B.weight"] = (d, r)
    return shapes


def _write_lora(out: Path, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA on the LlamaModel's attention, keyed as peft's save_pretrained keys it; lora_B is
    non-zero (a trained adapter's is) so the adapter changes the states."""
    sd = _seeded(_lora_shapes(LLAMA_CONFIG, ADAPTER_CONFIG), seed)
    save_file(sd, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "adapter_config.json", ADAPTER_CONFIG)
    return sd


def _diffusers_shapes(cls, cfg: dict) -> dict[str, tuple[int, ...]]:
    config = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_tiny_paradiffusion(root: str | Path, tokenizer_model: str | Path, seed: int = 0) -> Path:
    """The five released folders under ``root`` (made if needed); returns ``root``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = Path(root)
    parts = {name: root / name for name in ("Llama-2-7b-hf", "text_encoder_lora", "unet", "sdxl-vae-fp16-fix",
                                            "scheduler")}
    for d in parts.values():
        d.mkdir(parents=True, exist_ok=True)
    _write_llama(parts["Llama-2-7b-hf"], seed)
    _write_tokenizer(parts["Llama-2-7b-hf"], Path(tokenizer_model))
    _write_lora(parts["text_encoder_lora"], seed + 1)
    for name, cls, cfg, s in (("unet", UNet2DConditionModel, UNET_CONFIG, seed + 2),
                              ("sdxl-vae-fp16-fix", AutoencoderKL, VAE_CONFIG, seed + 3)):
        save_file(_seeded(_diffusers_shapes(cls, cfg), s), str(parts[name] / "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})
        _write_json(parts[name] / "config.json", cfg)
    _write_json(parts["scheduler"] / "scheduler_config.json", SCHEDULER_CONFIG)
    return root


if __name__ == "__main__":  # python -m drawing.tiny_layouts_paradiffusion OUT_DIR TOKENIZER_MODEL [SEED]
    import sys

    write_tiny_paradiffusion(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
