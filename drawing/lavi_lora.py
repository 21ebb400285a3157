"""LaVi-Bridge's positional LoRA files (``lora_vis.pt``, ``lora_text.pt``) as named LoRA layers.

The released files are plain lists of fp16 tensors ``[up0, down0, up1, down1, ...]``: LaVi-Bridge
saves and loads them with cloneofsimo-lora's ``save_lora_weight`` / ``monkeypatch_or_replace_lora_extended``
(vendored in ShihaoZhaoZSH/LaVi-Bridge@5a725f3 as ``modules/lora.py``), which give pair k to the k-th
``nn.Linear``/``nn.Conv2d`` met by this walk:

    for ancestor in model.modules():               # every module whose class NAME is a target
        if type(ancestor).__name__ in targets:
            for module in ancestor.named_modules():  # each Linear/Conv2d below it, in registration order
                ...

A module under two nested targets is met twice (the second pair wins, as it replaces the first);
children of an injected LoRA layer are never met. Where the reference silently skips a module whose
next tensor has the wrong number of dimensions, or ignores extra tensors, we refuse the file.
The deltas are applied as peft LoRA layers (rank from the tensors, scale 1: ``lora_alpha = r``), so a
trainer can train them by name and write the list back with :func:`positional_list`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from bidiffuser.checkpoint import require_file
from bidiffuser.errors import BiDiffuserError, first_line

from .backend import DrawingError

# Class names each LaVi-Bridge script passes as ``target_replace_module`` (test/*.py).
UNET_TARGETS = frozenset({"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"})
TRANSFORMER_TARGETS = frozenset({"Attention", "GEGLU"})
LLAMA_TARGETS = frozenset({"LlamaAttention"})
T5_TARGETS = frozenset({"T5Attention"})
SCRIPT_RANK = 32  # ``r=32`` in every script: LoraInjected* refuse layers narrower than this


@dataclass(frozen=True)
class LoraSite:
    """One module the positional list adapts: its name in ``named_modules()`` and the layer itself."""
    name: str
    layer: nn.Module

    @property
    def kind(self) -> str:
        return "conv" if isinstance(self.layer, nn.Conv2d) else "linear"

    def describe(self) -> str:
        m = self.layer
        if isinstance(m, nn.Conv2d):
            k = "x".join(map(str, m.kernel_size))
            return f"{self.name} (Conv2d {m.in_channels}->{m.out_channels} {k})"
        return f"{self.name} (Linear {m.in_features}->{m.out_features})"

    def expected_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(up, down) shapes for a LoRA of ``rank``, as LoraInjectedLinear/Conv2d hold them."""
        m = self.layer
        if isinstance(m, nn.Conv2d):
            return (m.out_channels, rank, 1, 1), (rank, m.in_channels // m.groups, *m.kernel_size)
        return (m.out_features, rank), (rank, m.in_features)


def reference_order(model: nn.Module, targets: Sequence[str]) -> list[LoraSite]:
    """The modules ``monkeypatch_or_replace_lora_extended(model, ..., target_replace_module=targets)``
    patches, in the order it takes tensor pairs from the list.

    The reference's walk edits the tree while it walks, but it only swaps leaves (Linear/Conv2d) for
    wrappers at the same place, so walking the untouched tree meets the same names in the same order.
    Linear/Conv2d subclasses count as their base class (the reference's old diffusers built plain ones).
    """
    targets = set(targets)
    sites = []
    for prefix, ancestor in model.named_modules():
        if type(ancestor).__name__ not in targets:
            continue
        for sub, module in ancestor.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                sites.append(LoraSite(".".join(p for p in (prefix, sub) if p), module))
    return sites


def read_positional(path: str | os.PathLike, what: str) -> list[torch.Tensor]:
    """A LaVi-Bridge LoRA file: a plain list (or tuple) of tensors, read with ``weights_only=True``."""
    try:
        path = require_file(path, what)
    except BiDiffuserError as e:
        raise DrawingError(str(e)) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or not a weight file
        raise DrawingError(f"cannot read {what} {path}: {first_line(e)}") from None
    if not isinstance(obj, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in obj):
        raise DrawingError(f"{what} {path} is not a list of tensors [up0, down0, up1, down1, ...] "
                           f"(got {type(obj).__name__})")
    return list(obj)


def assign_positional(tensors: Sequence[torch.Tensor], sites: Sequence[LoraSite],
                      source: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (up, down) from a positional list, refusing any count, ndim or shape mismatch."""
    if len(tensors) != 2 * len(sites):
        raise DrawingError(f"{source}: {len(tensors)} tensors, but the model has {len(sites)} LoRA'd modules "
                           f"(expected {2 * len(sites)}: an up and a down for each)")
    named: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, site in enumerate(sites):
        m = site.layer
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or tuple(m.dilation) != (1, 1)):
            raise DrawingError(f"{source}: module {k}, {site.describe()}, is a grouped or dilated conv, "
                               "which peft's LoRA layer does not reproduce")
        up, down = tensors[2 * k], tensors[2 * k + 1]
        want_ndim = 4 if site.kind == "conv" else 2
        for i, t in ((2 * k, up), (2 * k + 1, down)):
            if t.ndim != want_ndim:
                raise DrawingError(f"{source}: tensor {i} (module {k}, {site.describe()}) has shape "
                                   f"{tuple(t.shape)}; a {site.kind} LoRA needs {want_ndim}-d tensors")
        rank = down.shape[0]
        want_up, want_down = site.expected_shapes(rank)
        if tuple(up.shape) != want_up or tuple(down.shape) != want_down:
            raise DrawingError(f"{source}: tensors {2 * k}/{2 * k + 1} (module {k}, {site.describe()}) have shapes "
                               f"up {tuple(up.shape)}, down {tuple(down.shape)}; expected up {want_up}, "
                               f"down {want_down}")
        named[site.name] = (up, down)  # a module met twice keeps its last pair, as in the reference
    return named


def apply_lora(model: nn.Module, named: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype=None) -> nn.Module:
    """peft LoRA layers on exactly the named modules, holding the given up/down matrices (scale 1).

    The matrices take the base layer's dtype (the reference casts them to ``weight.dtype``)."""
    from peft import LoraConfig, inject_adapter_in_model

    if not named:
        return model
    ranks = {name: int(down.shape[0]) for name, (_, down) in named.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {n: r for n, r in ranks.items() if r != rank}
    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=_exact(named),
                     rank_pattern={re.escape(n): r for n, r in pattern.items()},
                     alpha_pattern={re.escape(n): r for n, r in pattern.items()})
    try:
        inject_adapter_in_model(cfg, model)
    except (ValueError, RuntimeError) as e:
        raise DrawingError(f"cannot add LoRA layers to {type(model).__name__}: {first_line(e)}") from None
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (up, down) in named.items():
            layer = modules[name]
            base = layer.get_base_layer()
            layer.lora_B["default"].weight.copy_(up.to(base.weight.dtype))
            layer.lora_A["default"].weight.copy_(down.to(base.weight.dtype))
            layer.lora_A["default"].to(base.weight.device, base.weight.dtype)
            layer.lora_B["default"].to(base.weight.device, base.weight.dtype)
    model.requires_grad_(False)
    return model


def _exact(names) -> str:
    """A peft target pattern matching exactly these full module names (peft full-matches a string)."""
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def load_positional(model: nn.Module, path: str | Path, targets: Sequence[str], what: str) -> list[LoraSite]:
    """Read a LaVi-Bridge LoRA list and apply it to ``model``; the sites, in file order."""
    sites = reference_order(model, targets)
    if not sites:
        raise DrawingError(f"{what} {path}: {type(model).__name__} has no module of class "
                           f"{'/'.join(sorted(targets))} to apply it to")
    apply_lora(model, assign_positional(read_positional(path, what), sites, path))
    return sites


def positional_list(model: nn.Module, sites: Sequence[LoraSite], dtype=torch.float16) -> list[torch.Tensor]:
    """The list LaVi-Bridge saves (``[up0, down0, ...]``, fp16) from a model :func:`apply_lora` patched."""
    modules = dict(model.named_modules())
    out = []
    for site in sites:
        layer = modules[site.name]
        out += [layer.lora_B["default"].weight.detach().cpu().to(dtype),
                layer.lora_A["default"].weight.detach().cpu().to(dtype)]
    return out


def save_pickle(obj, path: str | os.PathLike) -> None:
    """``torch.save`` as the released files are, byte-stable (the archive is named the same whatever
    the file's name) and atomic."""
    import io
    from bidiffuser.checkpoint import atomic_path
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())


def save_positional(tensors: Sequence[torch.Tensor], path: str | os.PathLike) -> None:
    """Write a LaVi-Bridge LoRA file: a plain list of fp16 tensors."""
    save_pickle([t.detach().cpu().to(torch.float16).contiguous() for t in tensors], path)
