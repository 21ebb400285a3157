"""Converting OpenAI CLIP checkpoints (plain state dicts or the TorchScript archives ``clip.load``
downloads) to transformers directories, by key mapping: the image tower to
``CLIPVisionModelWithProjection`` (ViT-B/32 for UniDiffuser), the text tower to ``CLIPTextModel``.
Sizes are read off the tensors; OpenAI's activation is quick_gelu."""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import torch
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from .checkpoint import StateDict, atomic_dir, check_state_dict, read_state_dict, require_file, strip_prefix
from .errors import BiDiffuserError, CheckpointError, first_line


# Integers OpenAI's TorchScript archives keep next to the weights (clip.build_model drops them).
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")
_BLOCK_RENAMES = {"attn.out_proj.": "self_attn.out_proj.", "ln_1.": "layer_norm1.",
                  "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save archives carry TorchScript code (``<archive>/code/``); torch.save ones do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] or name.endswith("/constants.pkl")
                   for name in archive.namelist())


def read_openai_clip_state_dict(path: str | os.PathLike) -> StateDict:
    """The state dict of an OpenAI/open_clip checkpoint: a plain state dict (.pt/.bin/.safetensors,
    read with weights_only) or an OpenAI TorchScript archive (what ``clip.load`` downloads)."""
    path = require_file(path, "CLIP checkpoint")
    if path.suffix != ".safetensors" and _is_torchscript(path):
        # torch.jit.load is acceptable for untrusted files where a full pickle load (weights_only=False) is
        # not: a TorchScript archive holds TorchScript IR compiled by TorchScript's own compiler
        # and pickles read by a restricted unpickler that only builds tensors and TorchScript types,
        # so no arbitrary Python runs. We only take its state_dict and never call its methods.
        try:
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as e:
            raise CheckpointError(f"cannot read TorchScript CLIP checkpoint {path}: "
                                  f"{first_line(e)}") from None
    else:
        sd = read_state_dict(path, "CLIP checkpoint")
    return strip_prefix(dict(sd), "module.")


def _require(sd: Mapping[str, torch.Tensor], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(f"not an OpenAI CLIP {what} state dict: missing {', '.join(missing[:4])}")


def _convert_blocks(sd: Mapping[str, torch.Tensor], src: str, dst: str,
                    used: set[str]) -> tuple[StateDict, int]:
    """Map ``{src}resblocks.N.*`` to ``{dst}layers.N.*``, splitting the fused q/k/v projection."""
    out, layers = {}, set()
    for key, value in sd.items():
        m = re.fullmatch(re.escape(src) + r"resblocks\.(\d+)\.(.+)", key)
        if not m:
            continue
        used.add(key)
        n, rest = int(m[1]), m[2]
        layers.add(n)
        prefix = f"{dst}layers.{n}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight | bias
            # nn.MultiheadAttention stacks the projections as [q; k; v] along dim 0.
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}.{kind}"] = part.clone()
            continue
        for old, new in _BLOCK_RENAMES.items():
            if rest.startswith(old):
                out[prefix + new + rest[len(old):]] = value
                break
        else:
            raise CheckpointError(f"OpenAI CLIP checkpoint has a key this converter does not know: {key}")
    if not layers or sorted(layers) != list(range(len(layers))):
        raise CheckpointError(f"OpenAI CLIP checkpoint: bad or missing {src}resblocks.N layers")
    return out, len(layers)


# Keys of a full OpenAI checkpoint that belong to neither tower's transformers model.
_NOT_TEXT = ("logit_scale",) + OPENAI_METADATA


def _reject_leftovers(sd: Mapping[str, torch.Tensor], used: set[str], belongs) -> None:
    """Fail on keys of this tower that the mapping did not use: a different architecture."""
    left = [k for k in sd if belongs(k) and k not in used]
    if left:
        raise CheckpointError(f"OpenAI CLIP checkpoint has keys this converter does not know: "
                              f"{', '.join(left[:4])}" + (" ..." if len(left) > 4 else ""))


def _heads(width: int, num_heads: int | None) -> int:
    heads = num_heads or width // 64  # OpenAI CLIP: 64-dimensional heads in both towers
    if heads < 1 or width % heads:
        raise CheckpointError(f"cannot infer attention heads for width {width}; pass num_heads")
    return heads


def convert_openai_clip_visual(sd: Mapping[str, torch.Tensor], num_heads: int | None = None
                               ) -> tuple[CLIPVisionConfig, StateDict]:
    """OpenAI CLIP ``visual.*`` (ViT) weights -> (CLIPVisionConfig, CLIPVisionModelWithProjection
    state dict). Sizes are read off the tensors; heads default to width // 64."""
    ln = [f"visual.{n}.{kind}" for n in ("ln_pre", "ln_post") for kind in ("weight", "bias")]
    need = ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
            "visual.proj", *ln]
    _require(sd, need, "ViT image")
    used = set(need)
    conv = sd["visual.conv1.weight"]
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    P = "vision_model."
    out, layers = _convert_blocks(sd, "visual.transformer.", P + "encoder.", used)
    _reject_leftovers(sd, used, lambda k: k.startswith("visual."))
    out.update({
        P + "embeddings.class_embedding": sd["visual.class_embedding"],
        P + "embeddings.patch_embedding.weight": conv,
        P + "embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
    })
    for ln_old, ln_new in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"{P}{ln_new}.{kind}"] = sd[f"visual.{ln_old}.{kind}"]
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=out[f"{P}encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=_heads(width, num_heads),
        num_channels=channels, image_size=grid * patch, patch_size=patch,
        projection_dim=sd["visual.proj"].shape[1], hidden_act="quick_gelu")
    return config, out


def convert_openai_clip_text(sd: Mapping[str, torch.Tensor], num_heads: int | None = None
                             ) -> tuple[CLIPTextConfig, StateDict]:
    """OpenAI CLIP text weights -> (CLIPTextConfig, CLIPTextModel state dict).

    ``text_projection`` only sets ``projection_dim``: CLIPTextModel has no projection, and
    UniDiffuser uses the unprojected ``last_hidden_state``.
    """
    need = ["token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"]
    _require(sd, need, "text")
    used = set(need) | {"text_projection"}
    vocab, width = sd["token_embedding.weight"].shape
    P = ""  # transformers 5 CLIPTextModel names have no "text_model." prefix (4.x had one)
    out, layers = _convert_blocks(sd, "transformer.", P + "encoder.", used)
    _reject_leftovers(sd, used, lambda k: not k.startswith("visual.") and k not in _NOT_TEXT)
    out.update({
        P + "embeddings.token_embedding.weight": sd["token_embedding.weight"],
        P + "embeddings.position_embedding.weight": sd["positional_embedding"],
        P + "final_layer_norm.weight": sd["ln_final.weight"],
        P + "final_layer_norm.bias": sd["ln_final.bias"],
    })
    proj = sd.get("text_projection")
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width,
        intermediate_size=out[f"{P}encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=_heads(width, num_heads),
        max_position_embeddings=sd["positional_embedding"].shape[0],
        projection_dim=proj.shape[1] if proj is not None else width, hidden_act="quick_gelu",
        # OpenAI's BPE puts <|startoftext|>, <|endoftext|> last; the HF tokenizer pads with the latter.
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return config, out


def convert_openai_clip_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike,
                                   part: str = "visual", tokenizer=None,
                                   num_heads: int | None = None) -> Path:
    """Write a transformers directory (config.json + model.safetensors) from an OpenAI CLIP file.

    ``part="visual"`` gives a CLIPVisionModelWithProjection directory, ``part="text"`` a
    CLIPTextModel directory; ``tokenizer`` (a tokenizer object or a directory holding one) is saved
    with the text model, which needs it to load. The directory is written next to ``out_dir`` and
    moved into place at the end, so a crash never leaves a half-written directory under that name.
    """
    if part not in ("visual", "text"):
        raise BiDiffuserError(f"part must be 'visual' or 'text', got {part!r}")
    src, out_dir = Path(src), Path(out_dir)
    sd = read_openai_clip_state_dict(src)
    if part == "visual":
        config, hf_sd = convert_openai_clip_visual(sd, num_heads)
        model_cls = CLIPVisionModelWithProjection
    else:
        config, hf_sd = convert_openai_clip_text(sd, num_heads)
        model_cls = CLIPTextModel
    model = model_cls(config).to(next(iter(hf_sd.values())).dtype)  # keep the source precision
    check_state_dict(model.state_dict(), hf_sd, src)
    model.load_state_dict(hf_sd, strict=True)
    if isinstance(tokenizer, (str, os.PathLike)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        except Exception as e:
            raise BiDiffuserError(f"cannot load a tokenizer from {tokenizer}: {first_line(e)}") from None

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir
