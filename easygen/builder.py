"""The one model loader, used by the CLI, the evaluation and any server (as LLaVA's builder is).

``load_pretrained`` understands four layouts:

(a) our EasyGen directory: config.json with ``model_type: "easygen"``, safetensors, tokenizer;
(b) a base LLaMA/Vicuna HF directory plus a projector file (``projector=``);
(c) a base (a or b) plus a PEFT LoRA adapter directory (``lora=``, or ``model_path`` is the adapter
    and ``model_base`` the base, as in LLaVA); the adapter directory may carry the projector that
    was trained with it as ``projector.safetensors``; ``merge_lora`` folds the adapter in;
(d) EasyGen's released checkpoints: config.json with ``model_type: "diffllama"``, HF shards with
    the projector under ``model.fastchat_proj.fc1/fc2``.

The BiDiffuser directory comes from ``bidiffuser=`` or, when absent, ``MODEL_DIR/bidiffuser``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from bidiffuser.checkpoint import (CheckpointError, atomic_dir, load_strict, read_json, read_state_dict,
                                   save_safetensors, strip_prefix)
from bidiffuser.cliutil import resolve_device, torch_dtype
from bidiffuser.errors import BiDiffuserError
from bidiffuser.bridge import is_bridge_dir
from bidiffuser.model_dir import read_config
from bidiffuser.pipeline import BiDiffuser
from bidiffuser.precision import Precision
from drawing.bidiffuser_backend import BiDiffuserBackend
from drawing.registry import BACKENDS

from .generation import TransformersEngine
from .llama_tokenizer import load_tokenizer
from .model import EasyGenConfig, EasyGenForCausalLM
from .projector import build_projector
from .processor import EasyGenProcessor

PROJECTOR_FILE = "projector.safetensors"
# Where each known layout keeps the projector: EasyGen's release, then ours.
PROJECTOR_PREFIXES = ("model.fastchat_proj.", "projector.")
# Keys of the original code's unused variant head (clip_proj): dropped on load.
UNUSED_PREFIXES = ("model.clip_proj.",)
# config.json fields that describe a file, not a model.
CONFIG_NOISE = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")


@dataclass
class LoadedModel:
    model: EasyGenForCausalLM
    tokenizer: object
    processor: EasyGenProcessor
    bidiffuser: BiDiffuser | None
    layout: str  # which of the four layouts was read (for logs and result files)
    # what answers prompts: the model in this process (default) or vLLM (easygen.vllm_engine.use_vllm)
    llm: object = field(default=None)
    # what draws image replies (a drawing.DrawingBackend): BiDiffuser by default, or a released system
    drawer: object = field(default=None)

    def __post_init__(self):
        if self.llm is None:
            self.llm = TransformersEngine(self.model, self.processor)
        if self.drawer is None and self.bidiffuser is not None:
            self.drawer = BiDiffuserBackend(self.bidiffuser)

    @property
    def draw_with(self) -> str:
        """How image replies are drawn: "bridge" or "clip" (BiDiffuser), a released system's backend
        name ("ella", "lavi-bridge", "paradiffusion"), or "none"."""
        if self.drawer is None:
            return "none"
        return self.drawer.path if isinstance(self.drawer, BiDiffuserBackend) else self.drawer.name


def read_hf_weights(directory: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory: ``*.safetensors`` shards, else ``pytorch_model*.bin``
    (read with weights_only=True), converted to ``dtype`` tensor by tensor as they are read."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    files = [f for f in files if f.name != PROJECTOR_FILE]
    if not files:
        raise CheckpointError(f"no model weights (*.safetensors or pytorch_model*.bin) in {directory}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_state_dict(f, "model weights", dtype=dtype))
    return sd


def _projector_key(key: str, bare_ok: bool = False) -> str | None:
    """``fc1.weight`` etc. when ``key`` belongs to the projector, else None."""
    for prefix in PROJECTOR_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    else:
        if not bare_ok:
            return None
    return key if key.startswith(("fc1.", "fc2.")) else None


def split_projector(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(LLM weights, projector weights named fc1.* / fc2.*), whichever naming the file used."""
    llm, proj = {}, {}
    for k, v in sd.items():
        if k.startswith(UNUSED_PREFIXES):
            continue
        name = _projector_key(k)
        (proj if name else llm)[name or k] = v
    return llm, proj


def read_projector(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A projector file in any known naming (ours, EasyGen's ``model.fastchat_proj.*``, bare fc1/fc2)."""
    sd = strip_prefix(read_state_dict(path, "projector"))
    proj = {_projector_key(k, bare_ok=True): v for k, v in sd.items()}
    unexpected = [k for k in sd if _projector_key(k, bare_ok=True) is None]
    if unexpected or "fc1.weight" not in proj:
        raise CheckpointError(f"{path} is not a projector file (expected fc1.* / fc2.* keys; "
                              f"got {', '.join(list(sd)[:4])})")
    return proj


def projector_sizes(proj: dict[str, torch.Tensor]) -> dict:
    """Projector type and sizes read off the weight shapes."""
    fc1 = proj["fc1.weight"]
    if "fc2.weight" in proj:
        return {"projector_type": "mlp", "mm_hidden_size": fc1.shape[1], "projector_hidden_size": fc1.shape[0]}
    return {"projector_type": "linear", "mm_hidden_size": fc1.shape[1]}


def _config_from_json(raw: dict, **overrides) -> EasyGenConfig:
    fields = {k: v for k, v in raw.items() if k not in CONFIG_NOISE}
    fields.update(overrides)
    try:
        return EasyGenConfig(**fields)
    except (TypeError, ValueError) as e:
        raise BiDiffuserError(f"bad model config: {e}") from None


def _build(config: EasyGenConfig, llm: dict, proj: dict, source, dtype: torch.dtype) -> EasyGenForCausalLM:
    """Build on the meta device and adopt the loaded tensors: no random init, no second copy."""
    sd = {k: v.to(dtype) for k, v in llm.items()}
    sd.update({f"projector.{k}": v.to(dtype) for k, v in proj.items()})
    if config.tie_word_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = EasyGenForCausalLM(config)
    load_strict(model, sd, source, assign=True)
    # Rotary frequencies are a non-persistent buffer: not in any file, so rebuild it off meta.
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _load_llm(path: Path, projector: str | None, dtype: torch.dtype,
              new_projector: tuple[int, int] | None = None) -> tuple[EasyGenForCausalLM, str]:
    """Layouts (a), (b), (d): a model directory, with the projector inside it or in ``projector``.
    ``new_projector=(in_dim, hidden)`` gives a plain LLaMA a freshly initialised projector (stage 1)."""
    if not path.is_dir():
        raise BiDiffuserError(f"model directory not found: {path}")
    raw = read_json(path / "config.json", "model config")
    model_type = raw.get("model_type")
    llm, proj = split_projector(read_hf_weights(path, dtype))
    if projector is not None:
        proj = read_projector(projector)
    elif not proj and (path / PROJECTOR_FILE).exists():
        proj = read_projector(path / PROJECTOR_FILE)
    if model_type == "easygen":
        layout = "easygen"
    elif model_type in ("diffllama", "llama"):
        layout = "easygen-released" if model_type == "diffllama" else "llama+projector"
        if not proj and new_projector is not None:
            proj = build_projector("mlp", *new_projector, raw["hidden_size"]).state_dict()
            layout = "llama+new-projector"
        if not proj:
            raise BiDiffuserError(f"{path} is a plain LLaMA directory: give the projector file "
                                  f"(--projector) or a LoRA adapter that carries one")
    else:
        raise BiDiffuserError(f"{path}/config.json: model_type {model_type!r} is not easygen, diffllama or llama")
    overrides = projector_sizes(proj) if proj and model_type != "easygen" else {}
    config = _config_from_json(raw, **overrides)
    return _build(config, llm, proj, path, dtype), layout


def _apply_lora(model, adapter: Path, merge: bool):
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    return model.merge_and_unload() if merge else model


def _tokenizer(*candidates: Path):
    for d in candidates:
        if d is not None and any((d / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            return load_tokenizer(d)
    raise BiDiffuserError(f"no tokenizer found in {', '.join(str(c) for c in candidates if c)}")


# BiDiffuser's ways, then the released systems' backends (drawn from their own files: ``drawer=``)
DRAW_WITH = ("auto", "bridge", "clip") + tuple(b for b in BACKENDS if b != "bidiffuser")


def find_bridge_dir(bridge: str | os.PathLike | None, *model_dirs) -> Path | None:
    """``bridge`` when given, else the first ``bridge/`` bridge directory inside the model directories."""
    if bridge:
        return Path(bridge)
    return next((Path(d) / "bridge" for d in model_dirs if d and is_bridge_dir(Path(d) / "bridge")), None)


def resolve_bridge_dir(bridge, draw_with: str, *model_dirs) -> Path | None:
    """The bridge directory image replies are drawn through, or None for the CLIP path."""
    if draw_with not in DRAW_WITH:
        raise BiDiffuserError(f"--draw-with must be one of {', '.join(DRAW_WITH)} (got {draw_with!r})")
    if draw_with not in ("auto", "bridge"):
        return None
    found = find_bridge_dir(bridge, *model_dirs)
    if draw_with == "bridge" and found is None:
        raise BiDiffuserError(f"--draw-with bridge: {model_dirs[-1]} has no bridge/ directory; give one with --bridge")
    return found


def find_bidiffuser_dir(bidiffuser: str | os.PathLike | None, *model_dirs) -> Path | None:
    """``bidiffuser`` when given, else the first ``bidiffuser/`` inside the model directories
    (adapter first, then base), else None."""
    if bidiffuser:
        return Path(bidiffuser)
    return next((Path(d) / "bidiffuser" for d in model_dirs if d and (Path(d) / "bidiffuser").is_dir()), None)


def load_pretrained(model_path: str | os.PathLike, model_base: str | os.PathLike | None = None,
                    lora: str | os.PathLike | None = None, projector: str | os.PathLike | None = None,
                    merge_lora: bool = False, bidiffuser: str | os.PathLike | None = None,
                    device: str | torch.device | None = None, dtype: str | torch.dtype = "float32",
                    load_bidiffuser: bool = True, new_projector_hidden: int | None = None,
                    bidiffuser_dtype: str = "auto", quantization: str | None = None,
                    bridge: str | os.PathLike | None = None, draw_with: str = "auto",
                    drawer: str | os.PathLike | None = None, drawer_options: dict | None = None) -> LoadedModel:
    """Load an EasyGen model in any of the four layouts (see the module docstring).

    ``dtype`` is the LLM's; ``bidiffuser_dtype`` names BiDiffuser's precision policy
    (``bidiffuser.precision.Precision.named``: by default the original's, whatever the LLM's).
    ``quantization`` ("8bit", "4bit") loads the LLM's decoder layers through bitsandbytes.

    ``new_projector_hidden``: a plain LLaMA without a projector gets a new random one of this hidden
    size, its input width read from the BiDiffuser directory (how stage 1 starts).

    ``draw_with`` says how image replies are drawn: "clip" (the description re-encoded by CLIP, as
    EasyGen's released weights do), "bridge" (the LLM's own hidden states over the description,
    through the bridge directory ``bridge`` or ``MODEL_DIR/bridge``), "auto" (the bridge when the
    model has one), or a released system drawing from its own files under ``drawer`` ("ella",
    "lavi-bridge", "paradiffusion"; ``drawer_options`` go to ``drawing.load_backend``); BiDiffuser
    still reads the user's images."""

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    model_path = Path(model_path)
    adapter = Path(lora) if lora else None
    base = model_path
    if adapter is None and (model_path / "adapter_config.json").is_file():
        adapter = model_path
        if model_base is None:
            raise BiDiffuserError(f"{model_path} is a LoRA adapter: give its base model with --model-base")
        base = Path(model_base)
    elif model_base is not None and adapter is None:
        raise BiDiffuserError("--model-base is only used with a LoRA adapter (--lora or an adapter --model-path)")

    if adapter is not None:
        if not (adapter / "adapter_config.json").is_file():
            raise BiDiffuserError(f"not a PEFT LoRA adapter directory (no adapter_config.json): {adapter}")
        if projector is None and (adapter / PROJECTOR_FILE).exists():
            projector = adapter / PROJECTOR_FILE  # trained with the adapter: supersedes the base's

    bidiffuser_dir = find_bidiffuser_dir(bidiffuser, adapter, base)
    new_projector = None
    if new_projector_hidden is not None:
        if bidiffuser_dir is None:
            raise BiDiffuserError("a new projector needs the BiDiffuser directory (--bidiffuser) for its input width")
        new_projector = (read_config(bidiffuser_dir).caption_decoder.n_embd, new_projector_hidden)

    # a released system's backend first: with --drawer-offload it visits the device before the LLM fills it
    released = load_drawer(draw_with, drawer, device, drawer_options)
    model, layout = _load_llm(base, projector, dtype, new_projector)
    if quantization is not None:
        if merge_lora:
            raise BiDiffuserError("a LoRA adapter cannot be merged into a quantized model: leave out --merge-lora")
        from .quantize import quantize_llm
        quantize_llm(model, quantization, device, dtype)
        layout += f"+{quantization}"
    if adapter is not None:
        model = _apply_lora(model, adapter, merge_lora)
        layout += "+lora" + ("(merged)" if merge_lora else "")
    model = model.to(device).eval()
    tokenizer = _tokenizer(adapter, base)
    processor = EasyGenProcessor(tokenizer, num_image_tokens=model.config.num_image_tokens)

    bridge_dir = resolve_bridge_dir(bridge, draw_with, adapter, base)
    pipe = None
    if load_bidiffuser and bidiffuser_dir is not None:
        # the bridge reads this very LLM: its hidden states over the description are the drawing's condition
        pipe = BiDiffuser.from_pretrained(bidiffuser_dir, device=device,
                                          precision=Precision.named(bidiffuser_dtype, device), bridge=bridge_dir,
                                          text_model=(model, tokenizer) if bridge_dir is not None else None)
        width = pipe.config.caption_decoder.n_embd
        if width != model.config.mm_hidden_size:
            raise BiDiffuserError(f"BiDiffuser {bidiffuser_dir} gives {width}-d image features but the model's "
                                  f"projector expects {model.config.mm_hidden_size}")
    return LoadedModel(model, tokenizer, processor, pipe, layout, drawer=released)


def load_drawer(draw_with: str, drawer: str | os.PathLike | None, device, options: dict | None = None):
    """The released system's backend ``--draw-with`` names (None for BiDiffuser's own ways)."""
    if draw_with not in DRAW_WITH:
        raise BiDiffuserError(f"--draw-with must be one of {', '.join(DRAW_WITH)} (got {draw_with!r})")
    if draw_with in ("auto", "bridge", "clip"):
        if drawer is not None:
            raise BiDiffuserError(f"--drawer is the files of a released system: use it with --draw-with "
                                  f"{'|'.join(DRAW_WITH[3:])}")
        return None
    if drawer is None:
        raise BiDiffuserError(f"--draw-with {draw_with} needs --drawer DIR (the {draw_with} files as downloaded)")
    from drawing import load_backend
    from drawing.backend import Offloaded
    options = dict(options or {})
    target = options.pop("device", device)
    # steps, guidance, width, height: this server's defaults instead of the reference's
    settings = {k: options.pop(k) for k in ("steps", "guidance", "width", "height") if k in options}
    offload = options.pop("offload", False)
    # loaded on its device (so each part gets the dtype its reference uses there), before the LLM is
    backend = load_backend(draw_with, drawer, device=target, **options)
    backend.defaults = backend.defaults.override(**settings)
    # offload: the weights wait on the CPU and visit the device only while drawing
    return Offloaded(backend, target) if offload else backend


def save_pretrained(model: EasyGenForCausalLM, tokenizer, out_dir: str | os.PathLike,
                    bidiffuser_dir: str | os.PathLike | None = None) -> Path:
    """Write a standalone EasyGen directory (layout a), atomically: a crash never leaves a
    half-written model. ``bidiffuser_dir`` is linked as ``bidiffuser/`` so loading finds it."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if bidiffuser_dir is not None:
            (tmp / "bidiffuser").symlink_to(Path(bidiffuser_dir).resolve(), target_is_directory=True)
    return Path(out_dir)


def save_projector(model: EasyGenForCausalLM, path: str | os.PathLike) -> None:
    """The projector alone (stage 1's output; what a LoRA adapter directory carries)."""
    save_safetensors(model.projector.state_dict(), path)
