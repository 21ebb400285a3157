"""The LLM bridge: a language model's hidden states -> the U-ViT's text slot (num_text_tokens x
text_dim, the caption decoder's prefix space), so BiDiffuser can draw from a language model instead of
CLIP's few tokens (LaVi-Bridge, ELLA, ParaDiffusion connect an LM to a diffusion model the same way).

Two kinds, chosen by ``BridgeConfig.kind``:

``resampler``  ELLA's timestep-aware semantic connector: ``num_tokens`` learned latents read the LM
               states through Perceiver blocks (cross-attention over [latents, states], squared-ReLU
               MLP). With ``timestep_aware`` every layer norm is modulated by the image timestep
               (AdaLN, zero-initialised: at the start the timestep changes nothing), so the
               condition is recomputed at every denoising step. The output is a linear projection
               to text_dim (ELLA ends in a LayerNorm; the text slot's per-token norms carry meaning,
               so they are left free here).
``per_token``  LaVi-Bridge's adapter: LayerNorm, GEGLU feed-forward, LayerNorm, GEGLU feed-forward to
               text_dim, applied to each LM token; the sequence is cut or zero-padded to num_tokens.

A bridge directory holds ``config.json`` (format, version, the bridge config, the LoRA settings, the
text model it was trained with) and named-tensor safetensors: ``bridge.safetensors`` (the module),
``uvit_lora.safetensors`` and ``lm_lora.safetensors`` (LoRA A/B matrices keyed by the module they
adapt, e.g. ``in_blocks.0.attn.qkv.lora_A.weight``), the last two only when trained.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .checkpoint import atomic_path, read_json, read_state_dict, save_safetensors
from .clip import quiet_transformers
from .config_base import DictConfig
from .errors import BiDiffuserError
from .uvit import timestep_embedding

BRIDGE_CONFIG = "config.json"
BRIDGE_FORMAT, BRIDGE_VERSION = "bidiffuser-bridge", 1
BRIDGE_WEIGHTS, UVIT_LORA, LM_LORA = "bridge.safetensors", "uvit_lora.safetensors", "lm_lora.safetensors"
KINDS = ("resampler", "per_token")
UVIT_LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
LM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class BridgeConfig(DictConfig):
    kind: str = "resampler"
    lm_dim: int = 4096            # the text model's hidden size
    text_dim: int = 64            # the U-ViT's text_dim (= caption decoder hidden_dim)
    num_tokens: int = 77          # the U-ViT's num_text_tokens (its position table fixes it)
    width: int = 768              # resampler width (per_token: its feed-forward hidden size is mult x lm_dim)
    depth: int = 6                # resampler blocks
    heads: int = 8
    mult: int = 4                 # feed-forward expansion
    timestep_aware: bool = True   # resampler only: AdaLN on the image timestep
    time_channels: int = 320      # sinusoidal timestep channels (ELLA's)
    layer: int = -1               # which LM hidden state: -1 the last, -2 the second to last
    max_length: int = 128         # LM tokens read (longer prompts are cut)

    @classmethod
    def ella(cls, lm_dim: int, text_dim: int, num_tokens: int) -> "BridgeConfig":
        """ELLA's connector, with UniDiffuser's 77-token slot in place of ELLA's 64 latents."""
        return cls(kind="resampler", lm_dim=lm_dim, text_dim=text_dim, num_tokens=num_tokens, width=768, depth=6,
                   heads=8, timestep_aware=True, max_length=128)

    @classmethod
    def lavi_bridge(cls, lm_dim: int, text_dim: int, num_tokens: int) -> "BridgeConfig":
        return cls(kind="per_token", lm_dim=lm_dim, text_dim=text_dim, num_tokens=num_tokens, timestep_aware=False,
                   max_length=num_tokens)

    def validate(self) -> "BridgeConfig":
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {', '.join(KINDS)}")
        if self.kind == "per_token" and self.timestep_aware:
            problems.append("timestep_aware belongs to the resampler")
        if self.kind == "resampler" and self.width % self.heads:
            problems.append(f"width {self.width} is not a multiple of heads {self.heads}")
        if min(self.lm_dim, self.text_dim, self.num_tokens, self.width, self.depth, self.heads, self.mult,
               self.max_length) < 1:
            problems.append("sizes must be positive")
        if self.layer >= 0:
            problems.append("layer counts from the end: -1 is the last hidden state, -2 the one before")
        if problems:
            raise BiDiffuserError("bad bridge config: " + "; ".join(problems))
        return self


@dataclass
class LoraSettings(DictConfig):
    rank: int = 32
    alpha: float = 32.0           # LaVi-Bridge: scale alpha / rank = 1
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: list(UVIT_LORA_TARGETS))


# ------------------------------------------------------------------------------------------ modules
class GEGLUFeedForward(nn.Module):
    """Linear to 2 x hidden, GELU-gated, linear to ``out``."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, hidden * 2)
        self.proj_out = nn.Linear(hidden, out)

    def forward(self, x):
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class PerTokenAdapter(nn.Module):
    def __init__(self, cfg: BridgeConfig):
        super().__init__()
        hidden = cfg.mult * cfg.lm_dim
        self.norm1 = nn.LayerNorm(cfg.lm_dim)
        self.ff1 = GEGLUFeedForward(cfg.lm_dim, hidden, cfg.lm_dim)
        self.norm2 = nn.LayerNorm(cfg.lm_dim)
        self.ff2 = GEGLUFeedForward(cfg.lm_dim, hidden, cfg.text_dim)
        self.num_tokens = cfg.num_tokens

        self.checkpointing = False   # recompute the feed-forwards in backward (training memory)

    def forward(self, states, mask, time=None):
        L, n = states.shape[1], self.num_tokens
        if L >= n:
            states = states[:, :n]
        else:
            states = F.pad(states, (0, 0, 0, n - L))
        x = _maybe_checkpoint(self.checkpointing, self.ff1, self.norm1(states))
        return _maybe_checkpoint(self.checkpointing, self.ff2, self.norm2(x))


def _maybe_checkpoint(on: bool, fn, *args):
    if on and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class AdaLayerNorm(nn.Module):
    """LayerNorm whose shift and scale come from the timestep embedding (zero-initialised); without
    a time embedding it is a plain LayerNorm with a learned affine."""

    def __init__(self, dim: int, time_dim: int | None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=time_dim is None, eps=1e-6)
        self.modulation = None
        if time_dim is not None:
            self.modulation = nn.Linear(time_dim, 2 * dim)
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def forward(self, x, time):
        x = self.norm(x)
        if self.modulation is None:
            return x
        shift, scale = self.modulation(F.silu(time))[:, None].chunk(2, dim=-1)
        return x * (1 + scale) + shift


class PerceiverBlock(nn.Module):
    def __init__(self, width: int, heads: int, mult: int, time_dim: int | None):
        super().__init__()
        self.heads = heads
        self.norm_latents = AdaLayerNorm(width, time_dim)
        self.norm_states = AdaLayerNorm(width, time_dim)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.norm_ff = AdaLayerNorm(width, time_dim)
        self.ff_in = nn.Linear(width, mult * width)
        self.ff_out = nn.Linear(mult * width, width)

    def forward(self, latents, states, key_mask, time):
        B, n, W = latents.shape
        lat = self.norm_latents(latents, time)
        context = torch.cat([lat, self.norm_states(states, time)], dim=1)
        split = lambda x: x.view(B, -1, self.heads, W // self.heads).transpose(1, 2)  # noqa: E731
        k, v = self.kv(context).chunk(2, dim=-1)
        attn = F.scaled_dot_product_attention(split(self.q(lat)), split(k), split(v), attn_mask=key_mask)
        latents = latents + self.out(attn.transpose(1, 2).reshape(B, n, W))
        return latents + self.ff_out(F.relu(self.ff_in(self.norm_ff(latents, time))).square())


class Resampler(nn.Module):
    def __init__(self, cfg: BridgeConfig):
        super().__init__()
        time_dim = cfg.width if cfg.timestep_aware else None
        self.time_channels = cfg.time_channels
        self.time_mlp = (nn.Sequential(nn.Linear(cfg.time_channels, cfg.width), nn.SiLU(),
                                       nn.Linear(cfg.width, cfg.width)) if cfg.timestep_aware else None)
        self.latents = nn.Parameter(torch.randn(cfg.num_tokens, cfg.width) * cfg.width ** -0.5)
        self.time_to_latents = nn.Linear(cfg.width, cfg.width) if cfg.timestep_aware else None
        self.proj_in = nn.Linear(cfg.lm_dim, cfg.width)
        self.blocks = nn.ModuleList(PerceiverBlock(cfg.width, cfg.heads, cfg.mult, time_dim) for _ in range(cfg.depth))
        self.proj_out = nn.Linear(cfg.width, cfg.text_dim)
        self.checkpointing = False  # recompute each block in backward (training memory)

    def forward(self, states, mask, time=None):
        B = states.shape[0]
        latents = self.latents.to(states.dtype).expand(B, -1, -1)
        temb = None
        if self.time_mlp is not None:
            if time is None:
                raise BiDiffuserError("a timestep-aware bridge needs the image timestep")
            t = time.to(states.device).float().reshape(-1).expand(B) if time.numel() == 1 else time.reshape(B)
            temb = self.time_mlp(timestep_embedding(t, self.time_channels).to(states.dtype))
            latents = latents + self.time_to_latents(F.silu(temb))[:, None]
        # the latents always see themselves; padded LM tokens are masked out
        n = latents.shape[1]
        keep = torch.cat([torch.ones(B, n, dtype=torch.bool, device=states.device), mask.bool()], dim=1)
        key_mask = keep[:, None, None, :]
        states = self.proj_in(states)
        for block in self.blocks:
            latents = _maybe_checkpoint(self.checkpointing, block, latents, states, key_mask, temb)
        return self.proj_out(latents)


class Bridge(nn.Module):
    """(states B x L x lm_dim, mask B x L, image timestep B or scalar) -> B x num_tokens x text_dim."""

    def __init__(self, cfg: BridgeConfig):
        super().__init__()
        self.config = cfg.validate()
        self.net = Resampler(cfg) if cfg.kind == "resampler" else PerTokenAdapter(cfg)

    @property
    def timestep_aware(self) -> bool:
        return self.config.kind == "resampler" and self.config.timestep_aware

    def forward(self, states: torch.Tensor, mask: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(states, mask, time)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------- text model
class TextModel:
    """A transformers language model read for its hidden states: ``encode(prompts)`` gives
    (states B x L x lm_dim in float32, attention mask B x L). ``model`` may be a causal LM (LLaMA,
    EasyGen's LLM) or an encoder (T5's, BERT); it is run without gradients unless LoRA is trained.
    ``lora``: a ``LoraHooks`` switched on while the states are computed (a bridge's LM LoRA on a model
    that others use as it is)."""

    def __init__(self, model, tokenizer, layer: int = -1, max_length: int = 128, pad_to: int | None = None,
                 lora: "LoraHooks | None" = None):
        self.model, self.tokenizer, self.layer, self.max_length, self.pad_to = model, tokenizer, layer, max_length, pad_to
        self.lora = lora
        if getattr(tokenizer, "pad_token", None) is None:
            # LLaMA tokenizers have no pad token; padded positions are masked out anyway
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]):
        """(ids, mask), padded on the right: token i of a prompt is position i, as LaVi-Bridge pads (its
        per-token adapter reads position i into slot i, unmasked), whatever side the tokenizer pads on
        by default (transformers' LLaMA tokenizers pad on the left). Asked per call, so a tokenizer
        shared with a chat keeps its own setting."""
        padding = "max_length" if self.pad_to else "longest"
        batch = self.tokenizer(list(prompts), padding=padding, truncation=True, padding_side="right",
                               max_length=self.pad_to or self.max_length, return_tensors="pt")
        return batch.input_ids.to(self.device), batch.attention_mask.to(self.device)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The chosen hidden state of the tokens (autograd follows the model's own settings)."""
        model = self.model
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        extra = {"logits_to_keep": 1} if hasattr(model, "lm_head") else {}  # the vocabulary is not needed
        with self.lora.active() if self.lora is not None else nullcontext():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
        hidden = out.hidden_states if getattr(out, "hidden_states", None) is not None else out.encoder_hidden_states
        return hidden[self.layer].float()

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        with torch.no_grad():
            return self.states(ids, mask), mask


def load_text_model(path: str | os.PathLike, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from a transformers directory. Packages can make their own model types
    known through the ``bidiffuser.text_models`` entry point group (EasyGen registers its LLM so)."""
    from importlib.metadata import entry_points

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise BiDiffuserError(f"--text-model {path}: not a transformers model directory (no config.json)")
    for ep in entry_points(group="bidiffuser.text_models"):
        ep.load()()
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as e:
        raise BiDiffuserError(f"--text-model {path}: {str(e).splitlines()[0]}") from None
    auto = AutoModel if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with quiet_transformers():
        try:
            model = auto.from_pretrained(path, dtype=dtype)
        except ValueError:  # an encoder-only model (BERT, a T5 encoder) has no causal-LM head
            model = AutoModel.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval().requires_grad_(False), tokenizer


# ------------------------------------------------------------------------------------------ LoRA
def lora_target_pattern(targets) -> str:
    """Layers whose own name is a target; the U-ViT's patch embedding (a conv also named ``proj``) is not
    one of the attention / feed-forward layers LoRA is meant for."""
    return rf"^(?!patch_embed\.).*\b({'|'.join(map(re.escape, targets))})$"


@contextmanager
def _bitsandbytes_hidden():
    """Run peft code as if bitsandbytes were absent, unless something has imported it already:
    peft imports it on import (for a helper BiDiffuser never calls) and when it adds LoRA layers (to
    recognise bitsandbytes layers), and it brings torch's compiler: ~2 s of a chat's first picture.
    While bitsandbytes is not imported no layer can be one of its layers, so nothing peft does here
    changes; peft's memo that bitsandbytes is absent is dropped afterwards, for a later 8-bit model."""
    if "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # meanwhile `import bitsandbytes` raises ImportError
    try:
        yield
    finally:
        del sys.modules["bitsandbytes"]
        if "peft.import_utils" in sys.modules:
            from peft import import_utils
            for name in ("is_bnb_available", "is_bnb_4bit_available"):
                getattr(getattr(import_utils, name, None), "cache_clear", lambda: None)()


def add_lora(module: nn.Module, settings: LoraSettings) -> nn.Module:
    """peft LoRA layers on ``settings.targets`` (module names' last part), in place; the base
    weights are frozen, only the A/B matrices train."""
    with _bitsandbytes_hidden():
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                         target_modules=lora_target_pattern(settings.targets))
        module.requires_grad_(False)
        inject_adapter_in_model(cfg, module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return module


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA matrices by the module they adapt: ``...qkv.lora_A.weight`` (peft's adapter name dropped)."""
    return {k.replace(".default", ""): v for k, v in module.state_dict().items() if ".lora_" in k}


def load_lora(module: nn.Module, sd: dict[str, torch.Tensor], source) -> None:
    """Fill the LoRA matrices ``add_lora`` made from a ``lora_state_dict``, strictly."""
    own = {k.replace(".default", ""): k for k in module.state_dict() if ".lora_" in k}
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise BiDiffuserError(f"{source}: LoRA weights do not fit the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    module.load_state_dict({own[k]: v for k, v in sd.items()}, strict=False)


class LoraHooks:
    """LoRA matrices (``lora_state_dict``'s layout) applied to a model without changing it: inside
    ``active()``, forward hooks add ``lora_B(lora_A(x)) * alpha / rank`` to each adapted layer's output,
    as peft's LoRA layer does (in float32, then back to the layer's dtype), and only for calls from the
    thread that switched them on. Outside, the model is exactly itself, so the bridge can read through
    a model that answers a chat meanwhile (EasyGen hands its own LLM over). Checked strictly: every
    target layer of the model has its matrices, every matrix has its layer, with matching shapes."""

    def __init__(self, model: nn.Module, settings: LoraSettings, sd: dict[str, torch.Tensor], source):
        if hasattr(model, "get_base_model"):  # a peft model (a chat LoRA left unmerged): its layers' names
            model = model.get_base_model()
        pattern = re.compile(lora_target_pattern(settings.targets))
        layers = {name: m for name, m in model.named_modules() if pattern.match(name)}
        pairs = {k.rsplit(".lora_", 1)[0] for k in sd}
        missing = sorted(f"{n}.lora_{ab}.weight" for n in layers for ab in "AB" if f"{n}.lora_{ab}.weight" not in sd)
        unexpected = sorted(k for k in sd if k.rsplit(".lora_", 1)[0] not in layers
                            or not k.endswith((".lora_A.weight", ".lora_B.weight")))
        if missing or unexpected:
            raise BiDiffuserError(f"{source}: LoRA weights do not fit the model "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.scale = settings.alpha / settings.rank
        self.weights = {}
        for name in sorted(pairs):
            layer, a, b = layers[name], sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"]
            out_f, in_f = _linear_shape(layer)
            if a.shape != (settings.rank, in_f) or b.shape != (out_f, settings.rank):
                raise BiDiffuserError(f"{source}: LoRA weights of {name} are {tuple(a.shape)} and {tuple(b.shape)}; "
                                      f"its layer ({in_f} -> {out_f}) at rank {settings.rank} needs "
                                      f"{(settings.rank, in_f)} and {(out_f, settings.rank)}")
            device = next(layer.parameters(), a).device  # kept beside the layer: no copy per call
            self.weights[name] = (layer, a.to(device, torch.float32), b.to(device, torch.float32))
        self._lock = threading.RLock()
        self._owner: int | None = None

    def _hook(self, a: torch.Tensor, b: torch.Tensor):
        def hook(module, args, output):
            if threading.get_ident() != self._owner:
                return None
            x = args[0]
            delta = F.linear(F.linear(x.to(a.device, torch.float32), a.to(x.device)), b.to(x.device)) * self.scale
            return (output + delta).to(output.dtype)
        return hook

    @contextmanager
    def active(self):
        with self._lock:  # one reader at a time; the same thread may nest
            if self._owner is not None:
                yield
                return
            handles = [layer.register_forward_hook(self._hook(a, b)) for layer, a, b in self.weights.values()]
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None
                for h in handles:
                    h.remove()


def _linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer, plain, peft-wrapped or quantized."""
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return int(layer.out_features), int(layer.in_features)
    weight = getattr(layer, "weight", None)
    if weight is None or weight.ndim != 2:
        raise BiDiffuserError(f"LoRA needs a linear layer; {type(layer).__name__} is not one")
    return tuple(weight.shape)


def set_lora_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer in ``module`` on or off (off: the base model exactly)."""
    with _bitsandbytes_hidden():
        from peft.tuners.tuners_utils import BaseTunerLayer

    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            # the flag behind ``enable_adapters``, which would also mark the LoRA weights trainable
            # (not allowed on the inference tensors a sampling pipeline holds)
            m._disable_adapters = not enabled


# ---------------------------------------------------------------------------------------- directory
@dataclass
class BridgeFiles:
    """A bridge directory, read: its config now, its weight files when asked for (``weights``,
    ``uvit_lora_weights``, ``lm_lora_weights`` read the file on each call), so loading a model that
    has a bridge costs nothing until it draws."""
    root: Path
    config: BridgeConfig
    uvit_lora: LoraSettings | None = None
    lm_lora: LoraSettings | None = None
    text_model: str | None = None     # the text model it was trained with (a relative path starts at root)
    info: dict = field(default_factory=dict)

    def weights(self) -> dict[str, torch.Tensor]:
        return read_state_dict(self.root / BRIDGE_WEIGHTS, "bridge weights")

    def uvit_lora_weights(self) -> dict[str, torch.Tensor] | None:
        return read_state_dict(self.root / UVIT_LORA, "uvit_lora weights") if self.uvit_lora else None

    def lm_lora_weights(self) -> dict[str, torch.Tensor] | None:
        return read_state_dict(self.root / LM_LORA, "lm_lora weights") if self.lm_lora else None

    def build(self, device="cpu", dtype=torch.float32) -> Bridge:
        bridge = Bridge(self.config)
        missing, unexpected = bridge.load_state_dict(self.weights(), strict=False)
        if missing or unexpected:
            raise BiDiffuserError(f"{self.root / BRIDGE_WEIGHTS} does not fit its config "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return bridge.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_bridge(directory: str | os.PathLike, config: BridgeConfig, bridge_sd: dict[str, torch.Tensor], *,
                uvit_lora: tuple[LoraSettings, dict] | None = None, lm_lora: tuple[LoraSettings, dict] | None = None,
                text_model: str | None = None, info: dict | None = None) -> Path:
    """Write a bridge directory; ``config.json`` goes last, so a half-written one does not read as a bridge."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / BRIDGE_CONFIG).unlink(missing_ok=True)
    save_safetensors({k: v.float() for k, v in bridge_sd.items()}, root / BRIDGE_WEIGHTS)
    meta = {"format": BRIDGE_FORMAT, "version": BRIDGE_VERSION, "bridge": config.to_dict(),
            "text_model": text_model, "uvit_lora": None, "lm_lora": None, "info": info or {}}
    for key, file, lora in (("uvit_lora", UVIT_LORA, uvit_lora), ("lm_lora", LM_LORA, lm_lora)):
        if lora is not None:
            save_safetensors({k: v.float() for k, v in lora[1].items()}, root / file)
            meta[key] = lora[0].to_dict()
        else:
            (root / file).unlink(missing_ok=True)
    with atomic_path(root / BRIDGE_CONFIG) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return root


def bridge_fingerprint(directory: str | os.PathLike) -> str:
    """sha256 (hex) of a bridge directory's files (config and weights), for result files and caches."""
    import hashlib

    from .checkpoint import fingerprint_file
    root = Path(directory)
    h = hashlib.sha256()
    for name in (BRIDGE_CONFIG, BRIDGE_WEIGHTS, UVIT_LORA, LM_LORA):
        if (root / name).is_file():
            h.update(f"{name}:{fingerprint_file(root / name)}\n".encode())
    return h.hexdigest()


def is_bridge_dir(directory: str | os.PathLike | None) -> bool:
    if directory is None or not (Path(directory) / BRIDGE_CONFIG).is_file():
        return False
    try:
        return json.loads((Path(directory) / BRIDGE_CONFIG).read_text()).get("format") == BRIDGE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_bridge(directory: str | os.PathLike) -> BridgeFiles:
    root = Path(directory)
    path = root / BRIDGE_CONFIG
    if not path.is_file():
        raise BiDiffuserError(f"{root} is not a bridge directory (no {BRIDGE_CONFIG}); train one with "
                              f"`bidiffuser train --bridge-stage distill`")
    raw = read_json(path, "bridge config")
    try:
        if not isinstance(raw, dict) or raw.get("format") != BRIDGE_FORMAT:
            raise ValueError(f"'format' is not '{BRIDGE_FORMAT}'")
        if raw.get("version") != BRIDGE_VERSION:
            raise ValueError(f"unsupported version {raw.get('version')!r} (expected {BRIDGE_VERSION})")
        lora = {key: LoraSettings.from_dict(raw[key]) if raw.get(key) else None for key in ("uvit_lora", "lm_lora")}
        files = BridgeFiles(root=root, config=BridgeConfig.from_dict(raw["bridge"]).validate(), **lora,
                            text_model=raw.get("text_model"), info=raw.get("info") or {})
        for file in [BRIDGE_WEIGHTS] + [name for key, name in (("uvit_lora", UVIT_LORA), ("lm_lora", LM_LORA))
                                        if lora[key]]:
            if not (root / file).is_file():
                raise ValueError(f"{file} is missing")
    except (KeyError, TypeError, ValueError) as e:
        raise BiDiffuserError(f"{path}: bad bridge config: {e}") from None
    return files


# ---------------------------------------------------------------------------------------- condition
TextCondition = Callable[[torch.Tensor], torch.Tensor]


def bridge_condition(bridge: Bridge, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | TextCondition:
    """What the sampler conditions on: a fixed text latent, or (timestep-aware) a function of the
    image timestep, recomputed at every step."""
    if not bridge.timestep_aware:
        with torch.inference_mode():
            return bridge(states, mask).float()

    def at(t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return bridge(states, mask, t).float()
    return at


def check_fits(config: BridgeConfig, text_dim: int, num_tokens: int, lm_dim: int | None, where) -> None:
    problems = []
    if config.text_dim != text_dim or config.num_tokens != num_tokens:
        problems.append(f"it writes {config.num_tokens} x {config.text_dim} but the U-ViT reads "
                        f"{num_tokens} x {text_dim}")
    if lm_dim is not None and config.lm_dim != lm_dim:
        problems.append(f"it reads {config.lm_dim}-d states but the text model gives {lm_dim}-d")
    if problems:
        raise BiDiffuserError(f"bridge {where} does not fit: " + "; ".join(problems))

