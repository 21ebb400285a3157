"""The two CLIP encoders UniDiffuser uses, on transformers models loaded from local directories.

* image: OpenAI CLIP ViT-B/32 image embedding (512-d, after the visual projection, NOT normalised),
  fed to the U-ViT as B×1×512. Preprocessing is OpenAI's (bicubic resize of the short side, centre
  crop, CLIP mean/std), reimplemented with PIL/numpy because torchvision cannot be imported here.
* text: CLIP ViT-L/14 text transformer ``last_hidden_state`` (B×77×768), tokens padded to 77, exactly
  as UniDiffuser's ``FrozenCLIPEmbedder`` (input ids only, no attention mask).

OpenAI checkpoints are converted to transformers directories by ``clip_convert``. open_clip itself
is an optional image backend.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from transformers import (AutoTokenizer, CLIPConfig, CLIPTextConfig, CLIPTextModel,
                          CLIPVisionConfig, CLIPVisionModelWithProjection)

from .checkpoint import check_state_dict
from .clip_convert import OPENAI_METADATA, read_openai_clip_state_dict
from .errors import BiDiffuserError, CheckpointError, first_line

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

@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report: a full CLIP directory legitimately holds the other tower,
    and what matters (missing or mis-shaped weights) is raised as a CheckpointError instead."""
    from transformers.utils import logging as hf_logging
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in a CLI
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


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
        raise BiDiffuserError(f"{what}: malformed {config_file}: {first_line(e)}") from None
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
        raise BiDiffuserError(f"{what}: malformed {config_file}: {first_line(e)}") from None


def _from_pretrained(model_cls, path: Path, config, dtype: torch.dtype, what: str):
    try:
        with quiet_transformers():
            model, info = model_cls.from_pretrained(
                str(path), config=config, dtype=dtype, local_files_only=True,
                output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # no weights file, corrupt weights, ...
        raise CheckpointError(f"cannot load {what} from {path}: {first_line(e)}") from None
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
                              f"vocab.json + merges.txt): {first_line(e)}") from None
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
            f"open_clip is not installed/importable ({type(e).__name__}: {first_line(e)}): "
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
    sd = {k: v for k, v in read_openai_clip_state_dict(path).items() if k not in OPENAI_METADATA}
    model = open_clip.create_model(model_name)
    expected = model.state_dict()
    check_state_dict(expected, sd, path)
    model.load_state_dict(sd, strict=True)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    return OpenCLIPImageEncoder(model.to(device=device, dtype=dtype), int(image_size))


# ----------------------------------------------------------------------------- tiny models for tests

def init_tiny_clip(out_dir_image: str | os.PathLike, out_dir_text: str | os.PathLike, tokenizer,
                   seed: int = 0, image_size: int = 32, width: int = 32, layers: int = 2,
                   projection_dim: int = 16, max_length: int = 77) -> tuple[int, int]:
    """Write random small CLIP image and text directories; return (image embed dim, text width).

    ``tokenizer`` (a transformers fast tokenizer) is saved into the text directory so that
    ``load_clip_text_encoder`` finds it offline; the text vocabulary is ``len(tokenizer)``.
    Defaults are the test size; the shapes demo uses wider ones (then trains them).
    """
    vision = CLIPVisionConfig(image_size=image_size, patch_size=8, hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=layers, num_attention_heads=2, projection_dim=projection_dim,
                              hidden_act="quick_gelu")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else len(tokenizer) - 1
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=max_length,
                          projection_dim=projection_dim, hidden_act="quick_gelu",
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
