"""The two CLIP encoders UniDiffuser uses, on transformers models loaded from local directories.

* image: OpenAI CLIP ViT-B/32 image embedding (512-d, after the visual projection, NOT normalised),
  fed to the U-ViT as B×1×512. Preprocessing is OpenAI's (bicubic resize of the short side, centre
  crop, CLIP mean/std), reimplemented with PIL/numpy because torchvision cannot be imported here.
* text: CLIP ViT-L/14 text transformer ``last_hidden_state`` (B×77×768), tokens padded to 77, exactly
  as UniDiffuser's ``FrozenCLIPEmbedder`` (input ids only, no attention mask).

OpenAI / open_clip checkpoints are converted to transformers directories by key mapping
(``convert_openai_clip_checkpoint``). open_clip itself is an optional image backend.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image
from transformers import (AutoTokenizer, CLIPConfig, CLIPTextConfig, CLIPTextModel,
                          CLIPVisionConfig, CLIPVisionModelWithProjection)

from .checkpoint import StateDict, atomic_dir, check_state_dict, read_state_dict, require_file, strip_prefix
from .errors import BiDiffuserError, CheckpointError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = ("transformers", "openclip")

ClipImageInput = Union[Image.Image, np.ndarray, str, os.PathLike]


# ----------------------------------------------------------------------------- preprocessing

def _to_pil(image: ClipImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise BiDiffuserError(f"CLIP image arrays must be uint8 H×W×3, got {image.dtype}")
        return Image.fromarray(image)
    if isinstance(image, (str, os.PathLike)):
        from .images import load_image
        return load_image(image)
    raise BiDiffuserError(f"expected a PIL image, a uint8 array or an image path, got {type(image).__name__}")


def clip_preprocess(images: ClipImageInput | Sequence[ClipImageInput], image_size: int) -> torch.Tensor:
    """OpenAI CLIP's ``preprocess`` for a batch: B×3×image_size×image_size float32 pixel values.

    Same steps, in the same order, as torchvision's Resize(image_size, BICUBIC) -> CenterCrop ->
    convert("RGB") -> ToTensor -> Normalize(CLIP_MEAN, CLIP_STD) applied to PIL images.
    """
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise BiDiffuserError("no images given to the CLIP image encoder")
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    out = []
    for image in images:
        image = _to_pil(image)
        w, h = image.size
        if min(w, h) < 1:
            raise BiDiffuserError(f"image has no pixels ({w}x{h})")
        # torchvision Resize(int): the short side becomes image_size, the long side is truncated.
        long = int(image_size * max(w, h) / min(w, h))
        size = (image_size, long) if w <= h else (long, image_size)
        image = image.resize(size, Image.BICUBIC)
        # torchvision CenterCrop rounds the offsets with Python's round (half to even).
        left = int(round((size[0] - image_size) / 2.0))
        top = int(round((size[1] - image_size) / 2.0))
        image = image.crop((left, top, left + image_size, top + image_size)).convert("RGB")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        out.append((pixels.float() / 255.0 - mean) / std)
    return torch.stack(out)


# ----------------------------------------------------------------------------- encoders

class CLIPImageEncoder(torch.nn.Module):
    """CLIP image embeddings as UniDiffuser feeds them to the U-ViT: B×1×projection_dim."""

    def __init__(self, model: torch.nn.Module, image_size: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size

    def preprocess(self, images) -> torch.Tensor:
        return clip_preprocess(images, self.image_size)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).image_embeds

    @torch.no_grad()
    def encode(self, images: ClipImageInput | Sequence[ClipImageInput] | torch.Tensor) -> torch.Tensor:
        """Images (PIL / uint8 arrays / paths), or already preprocessed B×3×S×S pixel values."""
        if isinstance(images, torch.Tensor):
            pixels = images
            if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
                raise BiDiffuserError(f"pixel values must be B×3×{self.image_size}×{self.image_size} "
                                      f"(see preprocess()), got {tuple(pixels.shape)}")
        else:
            pixels = self.preprocess(images)
        param = next(self.model.parameters())
        return self._embed(pixels.to(device=param.device, dtype=param.dtype)).unsqueeze(1)


class OpenCLIPImageEncoder(CLIPImageEncoder):
    """The same embedding computed by an ``open_clip`` model (optional backend)."""

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class CLIPTextEncoder(torch.nn.Module):
    """CLIP text transformer ``last_hidden_state``: B×max_length×hidden (77×768 for ViT-L/14)."""

    def __init__(self, model: CLIPTextModel, tokenizer, max_length: int = 77):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        if tokenizer.pad_token is None:  # CLIP pads with its end-of-text token
            if tokenizer.eos_token is None:
                raise BiDiffuserError("the CLIP tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """B×max_length input ids, padded and truncated like UniDiffuser's FrozenCLIPEmbedder."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise BiDiffuserError("no texts given to the CLIP text encoder")
        return self.tokenizer(texts, truncation=True, max_length=self.max_length,
                              padding="max_length", return_tensors="pt")["input_ids"]

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        ids = self.tokenize(texts).to(next(self.model.parameters()).device)
        # Input ids only: the official encoder attends to the padding too (causal mask only).
        return self.model(input_ids=ids).last_hidden_state


# ----------------------------------------------------------------------------- loading

def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report: a full CLIP directory legitimately holds the other tower,
    and what matters (missing or mis-shaped weights) is raised as a CheckpointError instead."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _hf_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise BiDiffuserError(f"{what} directory not found: {path}")
    if not path.is_dir():
        raise BiDiffuserError(f"{what} must be a transformers directory (config.json + weights), "
                              f"got a file: {path} (convert OpenAI checkpoints with "
                              f"convert_openai_clip_checkpoint)")
    if not (path / "config.json").is_file():
        raise BiDiffuserError(f"{what}: no config.json in {path}")
    return path


def _read_config(path: Path, part: str, what: str):
    """The vision or text config of a tower directory, or of a full CLIPModel directory (the layout
    of openai/clip-vit-*), where the projection size lives in the top-level config."""
    config_file = path / "config.json"
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BiDiffuserError(f"{what}: malformed {config_file}: {_first_line(e)}") from None
    if not isinstance(raw, dict):
        raise BiDiffuserError(f"{what}: malformed {config_file}: not a JSON object")
    cls = CLIPVisionConfig if part == "vision" else CLIPTextConfig
    model_type = raw.get("model_type", cls.model_type)
    if model_type not in ("clip", cls.model_type):
        raise BiDiffuserError(f"{what}: {config_file} describes a '{model_type}' model, "
                              f"not a CLIP {part} model")
    try:
        if model_type == "clip":
            full = CLIPConfig.from_dict(raw)
            config = full.vision_config if part == "vision" else full.text_config
            config.projection_dim = full.projection_dim
            return config
        return cls.from_dict(raw)
    except Exception as e:
        raise BiDiffuserError(f"{what}: malformed {config_file}: {_first_line(e)}") from None


def _from_pretrained(model_cls, path: Path, config, dtype: torch.dtype, what: str):
    try:
        with _quiet_transformers():
            model, info = model_cls.from_pretrained(
                str(path), config=config, dtype=dtype, local_files_only=True,
                output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # no weights file, corrupt weights, ...
        raise CheckpointError(f"cannot load {what} from {path}: {_first_line(e)}") from None
    problems = []
    if info["missing_keys"]:
        problems.append("missing keys: " + ", ".join(sorted(info["missing_keys"])[:6]))
    if info["mismatched_keys"]:
        problems.append("mis-shaped keys: " + ", ".join(
            f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in sorted(info["mismatched_keys"])[:3]))
    if problems:
        raise CheckpointError(f"{what} {path} does not match its config.json: " + "; ".join(problems))
    return model


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise BiDiffuserError(f"unknown CLIP backend '{backend}' (choose from {', '.join(BACKENDS)})")


def load_clip_image_encoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32, backend: str = "transformers",
                            openclip_model: str = "ViT-B-32-quickgelu") -> CLIPImageEncoder:
    """The CLIP image encoder from a transformers directory (a CLIPVisionModelWithProjection or a
    full CLIPModel directory), or with ``backend="openclip"`` from an OpenAI/open_clip checkpoint."""
    _check_backend(backend)
    if backend == "openclip":
        return _load_openclip_image_encoder(path, device, dtype, openclip_model)
    what = "CLIP image encoder"
    path = _hf_dir(path, what)
    config = _read_config(path, "vision", what)
    model = _from_pretrained(CLIPVisionModelWithProjection, path, config, dtype, what)
    return CLIPImageEncoder(model.to(device), config.image_size)


def load_clip_text_encoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32, backend: str = "transformers",
                           max_length: int = 77) -> CLIPTextEncoder:
    """The CLIP text encoder + tokenizer from one transformers directory (a CLIPTextModel or a full
    CLIPModel directory such as openai/clip-vit-large-patch14).

    Both backends use transformers here: UniDiffuser's own text encoder is the transformers
    CLIPTextModel (``FrozenCLIPEmbedder``), so open_clip has nothing to add on this side.
    """
    _check_backend(backend)
    what = "CLIP text encoder"
    path = _hf_dir(path, what)
    config = _read_config(path, "text", what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise BiDiffuserError(f"{what}: no usable tokenizer in {path} (expected tokenizer.json or "
                              f"vocab.json + merges.txt): {_first_line(e)}") from None
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"{what} {path}: the tokenizer has {len(tokenizer)} tokens but the model "
                              f"only {config.vocab_size} embeddings")
    if max_length > config.max_position_embeddings:
        raise BiDiffuserError(f"{what} {path}: max_length {max_length} exceeds the model's "
                              f"{config.max_position_embeddings} positions")
    model = _from_pretrained(CLIPTextModel, path, config, dtype, what)
    return CLIPTextEncoder(model.to(device), tokenizer, max_length)


# ----------------------------------------------------------------------------- open_clip backend

def _import_open_clip():
    try:
        import open_clip
    except Exception as e:  # ImportError, or torchvision failing inside it on CPU-only torch
        raise BiDiffuserError(
            f"open_clip is not installed/importable ({type(e).__name__}: {_first_line(e)}): "
            "pip install .[openclip] on a machine with torchvision, or use backend='transformers'"
        ) from None
    return open_clip


def _load_openclip_image_encoder(path, device, dtype, model_name: str) -> OpenCLIPImageEncoder:
    """An open_clip architecture filled from an OpenAI/open_clip checkpoint file, read by our own
    safe reader. ``-quickgelu`` names match OpenAI's weights (plain ``ViT-B-32`` uses GELU)."""
    open_clip = _import_open_clip()
    path = Path(path)
    if path.is_dir():  # the file names open_clip uses on the hub
        candidates = [path / n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    sd = {k: v for k, v in read_openai_clip_state_dict(path).items() if k not in _OPENAI_METADATA}
    model = open_clip.create_model(model_name)
    expected = model.state_dict()
    check_state_dict(expected, sd, path)
    model.load_state_dict(sd, strict=True)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    return OpenCLIPImageEncoder(model.to(device=device, dtype=dtype), int(image_size))


# ----------------------------------------------------------------------------- OpenAI conversion

# Integers OpenAI's TorchScript archives keep next to the weights (clip.build_model drops them).
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")
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
        # torch.jit.load is acceptable for untrusted files where torch.load(weights_only=False) is
        # not: a TorchScript archive holds TorchScript IR compiled by TorchScript's own compiler
        # and pickles read by a restricted unpickler that only builds tensors and TorchScript types,
        # so no arbitrary Python runs. We only take its state_dict and never call its methods.
        try:
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as e:
            raise CheckpointError(f"cannot read TorchScript CLIP checkpoint {path}: "
                                  f"{_first_line(e)}") from None
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
_NOT_TEXT = ("logit_scale",) + _OPENAI_METADATA


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
            raise BiDiffuserError(f"cannot load a tokenizer from {tokenizer}: {_first_line(e)}") from None

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


# ----------------------------------------------------------------------------- tiny models for tests

def init_tiny_clip(out_dir_image: str | os.PathLike, out_dir_text: str | os.PathLike, tokenizer,
                   seed: int = 0) -> tuple[int, int]:
    """Write random tiny CLIP image and text directories; return (image embed dim, text width).

    ``tokenizer`` (a transformers fast tokenizer) is saved into the text directory so that
    ``load_clip_text_encoder`` finds it offline; the text vocabulary is ``len(tokenizer)``.
    """
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=16,
                              hidden_act="quick_gelu")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else len(tokenizer) - 1
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                          projection_dim=16, hidden_act="quick_gelu",
                          bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
                          eos_token_id=eos,
                          pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    with torch.random.fork_rng():  # reproducible without disturbing the caller's RNG
        torch.manual_seed(seed)
        image_model = CLIPVisionModelWithProjection(vision)
        text_model = CLIPTextModel(text)
    image_model.save_pretrained(str(out_dir_image))
    text_model.save_pretrained(str(out_dir_text))
    tokenizer.save_pretrained(str(out_dir_text))
    return vision.projection_dim, text.hidden_size
