"""Tiny random ELLA downloads in exactly the released layout, for tests and the parity driver.

``write_tiny_ella(root)`` writes what a user downloads, shrunk:

    root/ella-sd1.5-tsc-t5xl.safetensors    QQGYLab/ELLA (keys as ELLA's model.py names them)
    root/flan-t5-xl/                        google/flan-t5-xl: config.json, 2 safetensors shards + index,
                                            spiece.model, tokenizer.json, tokenizer_config.json,
                                            special_tokens_map.json (encoder and decoder weights)
    root/stable-diffusion-v1-5/             runwayml/stable-diffusion-v1-5 in diffusers layout:
                                            model_index.json, unet/, vae/, scheduler/, text_encoder/, tokenizer/

Config files carry the released fields with small sizes; the scheduler config is SD1.5's, unchanged.
Weights are drawn from one seeded generator in sorted key order (not from the libraries' own
initialisation), so the bytes are the same on every machine: the parity goldens record their sha256.
Run ``python -m drawing.tiny_layouts_ella DIR`` to write them from the command line.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
from pathlib import Path

import torch

# Sizes: the connector's width must equal the U-Net's cross-attention width; its input is T5's d_model
# (kept different from the width so that a swapped pair of dimensions cannot pass).
WIDTH = 32          # ELLA width = time_embed_dim = U-Net cross_attention_dim = CLIP width (768 released)
T5_D_MODEL = 48     # 2048 released
T5_EXTRA_IDS = 100
SP_VOCAB = 300      # sentencepiece pieces (32000 released); T5 vocab_size pads pieces + extra ids to 512
T5_VOCAB = 512
ELLA_FILE = "ella-sd1.5-tsc-t5xl.safetensors"
T5_DIR = "flan-t5-xl"
SD_DIR = "stable-diffusion-v1-5"

# SD1.5's scheduler/scheduler_config.json as released.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}

SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [32, 32, 64, 64], "center_input_sample": False,
    "cross_attention_dim": WIDTH,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 8, "out_channels": 4, "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 8, "out_channels": 3, "sample_size": 64, "up_block_types": ["UpDecoderBlock2D"] * 4,
}

CLIP_TEXT = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": WIDTH,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": WIDTH, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 518,  # 2 x 256 bytes, 4 merges, 2 specials
}

FLAN_T5 = {
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 64, "d_kv": 8, "d_model": T5_D_MODEL,
    "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
    "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
    "num_decoder_layers": 2, "num_heads": 4, "num_layers": 2, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
    "torch_dtype": "float32", "transformers_version": "4.23.1", "use_cache": True, "vocab_size": T5_VOCAB,
}

# ELLA() as released, with the widths above (time_channel, layers, heads and latents unchanged).
CONNECTOR = dict(time_channel=320, time_embed_dim=WIDTH, width=WIDTH, layers=6, heads=8, num_latents=64,
                 input_dim=T5_D_MODEL)

# Text the tiny sentencepiece model is trained on (any text works: unknown words split into pieces).
CORPUS = """a red book and a yellow vase on a dark wood table with a noticeable grain pattern.
a large textured green crocodile lying comfortably on a patch of grass with a cute knitted orange sweater.
around its neck the sweater features a whimsical pattern of blue and yellow stripes.
in the background a smooth grey rock partially obscures the view of a small pond with lily pads.
a mischievous raccoon standing on its hind legs holding a bright red apple aloft in its furry paws.
the apple shines brightly against the backdrop of a dense forest with leaves rustling in the gentle breeze.
a few scattered rocks can be seen on the ground beneath the raccoon's feet, while a gnarled tree trunk stands nearby.
A close-up photo of a wombat wearing a red backpack and raising both arms in the air.
An oil painting of a man in a factory looking at a cat wearing a top hat.
a chinese man wearing a white shirt and a checkered headscarf holds a large falcon near his shoulder.
The vase, with a slightly curved silhouette, stands on a table. The book appears slightly worn at the edges,
suggesting frequent use, while the vase holds a fresh array of multicolored wildflowers. 0123456789 ()[]!?;:-"
""".splitlines()


def _sentencepiece_model() -> bytes:
    """A unigram spiece.model trained as T5's was (pad 0, eos 1, unk 2, no bos, NFKC)."""
    import sentencepiece as spm
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=out, model_type="unigram", vocab_size=SP_VOCAB,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="nmt_nfkc",
        character_coverage=1.0, num_threads=1, hard_vocab_limit=False, minloglevel=2)
    return out.getvalue()


def _random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Weights of sensible scale from one generator, in sorted key order (library-independent)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            t = noise / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):  # norm scales near 1
            t = 1 + 0.1 * noise
        else:
            t = 0.1 * noise
        sd[key] = t.contiguous()
    return sd


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save(sd: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt"})


def connector_shapes(cfg: dict = CONNECTOR) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``ella-sd1.5-tsc-t5xl.safetensors`` for a connector config (model.py's names)."""
    from .ella_connector import ELLAConnector
    with torch.device("meta"):
        return _shapes(ELLAConnector(**cfg))


def _write_t5(root: Path, seed: int) -> None:
    from transformers import T5Config, T5ForConditionalGeneration
    _write_json(root / "config.json", FLAN_T5)
    cfg = T5Config(**{k: v for k, v in FLAN_T5.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = T5ForConditionalGeneration(cfg)
    # The released shards hold shared.weight once (the embed_tokens copies are tied to it).
    shapes = {k: v for k, v in _shapes(model).items() if not k.endswith("embed_tokens.weight")}
    sd = _random_state_dict(shapes, seed)
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": [k for k in names if not k.startswith("encoder.")],
              "model-00002-of-00002.safetensors": [k for k in names if k.startswith("encoder.")]}
    weight_map = {}
    for fname, keys in shards.items():
        _save({k: sd[k] for k in keys}, root / fname)
        weight_map.update({k: fname for k in keys})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    _write_json(root / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_t5_tokenizer(root)


def _write_t5_tokenizer(root: Path) -> None:
    """spiece.model (read by T5Tokenizer in the transformers ELLA used) and the same vocabulary as
    tokenizer.json (read by today's T5Tokenizer), plus the two small JSON files of the release."""
    spiece = _sentencepiece_model()
    (root / "spiece.model").write_bytes(spiece)
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}
    _write_json(root / "special_tokens_map.json", specials)
    _write_json(root / "tokenizer_config.json", {**specials, "extra_ids": T5_EXTRA_IDS, "model_max_length": 512,
                                                 "name_or_path": "google/t5-v1_1-xl", "sp_model_kwargs": {},
                                                 "tokenizer_class": "T5Tokenizer"})
    (root / "tokenizer.json").write_text(_tokenizer_json(spiece, extra), encoding="utf-8")


def _tokenizer_json(spiece: bytes, extra: list[str]) -> str:
    """The tokenizers-library T5 tokenizer of this spiece.model, as HF's T5 converter builds it."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    proto = pb.ModelProto()
    proto.ParseFromString(spiece)
    vocab = [(p.piece, p.score) for p in proto.pieces] + [(t, 0.0) for t in reversed(extra)]
    tok = Tokenizer(Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
                                           normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<pad>", "</s>", "<unk>"] + extra])
    return json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's stand-in character for each byte (``bytes_to_unicode``), in its order: the
    printable bytes as themselves, then the others as chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def _clip_tokenizer_files(root: Path) -> None:
    """CLIP's byte-level BPE files (vocab.json, merges.txt) with a tiny vocabulary: every byte as a
    symbol, alone and word-final, a few merges, and CLIP's start and end tokens."""
    chars = _byte_symbols()
    merges = [("t", "h"), ("th", "e</w>"), ("o", "n</w>"), ("c", "a")]
    vocab = chars + [c + "</w>" for c in chars]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_TEXT["vocab_size"]
    _write_json(root / "vocab.json", {t: i for i, t in enumerate(vocab)})
    (root / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    _write_json(root / "special_tokens_map.json", {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    _write_json(root / "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": "<|startoftext|>", "do_lower_case": True, "eos_token": "<|endoftext|>",
        "errors": "replace", "model_max_length": 77, "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"})


def _write_sd(root: Path, seed: int) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    _write_json(root / "model_index.json", SD15_MODEL_INDEX)
    _write_json(root / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)
    for name, cls, cfg, fname, s in (("unet", UNet2DConditionModel, UNET, "diffusion_pytorch_model.safetensors", 1),
                                     ("vae", AutoencoderKL, VAE, "diffusion_pytorch_model.safetensors", 2)):
        _write_json(root / name / "config.json", cfg)
        with torch.device("meta"):
            model = cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        _save(_random_state_dict(_shapes(model), seed + s), root / name / fname)
    _write_json(root / "text_encoder" / "config.json", CLIP_TEXT)
    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in CLIP_TEXT.items() if not k.startswith("_")}))
    # The release names every weight under text_model. (today's CLIPTextModel drops that level and
    # renames on load).
    shapes = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in _shapes(clip).items()
              if not k.endswith("position_ids")}
    _save(_random_state_dict(shapes, seed + 3), root / "text_encoder" / "model.safetensors")
    _clip_tokenizer_files(root / "tokenizer")


def write_tiny_ella(root: str | os.PathLike, seed: int = 0) -> Path:
    """Write the three tiny downloads under ``root`` (see the module docstring); returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _save(_random_state_dict(connector_shapes(), seed), root / ELLA_FILE)
    _write_t5(root / T5_DIR, seed + 10)
    _write_sd(root / SD_DIR, seed + 20)
    return root


def sha256_tree(root: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path (what the goldens record)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


if __name__ == "__main__":
    print(write_tiny_ella(sys.argv[1]))
