"""Turn a training checkpoint into a standalone model directory the builder loads.

The model is rebuilt exactly as training built it (from the run's ``train_config.json``), the
checkpoint's trainable weights are read into it in one process, and the result is written as an
EasyGen directory (safetensors). LoRA runs export merged (default) or as a PEFT adapter directory
carrying ``projector.safetensors``, loadable with ``--model-base``. Only a checkpoint signed with
this installation's key is read (its files are pickles; see ``bidiffuser.checkpoint_signature``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from bidiffuser.checkpoint import atomic_dir, read_json
from bidiffuser.train_checkpoint import STATE_FILE, complete_checkpoints, load_weights_only, open_checkpoint

from ..builder import PROJECTOR_FILE, save_pretrained, save_projector
from ..errors import EasyGenError
from .config import TrainConfig


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) from either a run directory or one of its checkpoints."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path, path.parent.parent
    found = complete_checkpoints(path / "checkpoints")
    if not found:
        raise EasyGenError(f"no complete checkpoint under {path}/checkpoints")
    return found[-1], path


def _load_deepspeed_weights(ckpt: Path, model) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    open_checkpoint(ckpt)  # its files are pickles: only a signed checkpoint
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = trainable - set(sd)
    if missing:
        raise EasyGenError(f"{ckpt}: DeepSpeed checkpoint lacks {len(missing)} trained weights, e.g. {sorted(missing)[0]}")
    model.load_state_dict({k: v for k, v in sd.items() if k in trainable}, strict=False)


def export(path: str | Path, out: str | Path, lora_adapter: bool = False) -> Path:
    from .loop import build_model

    ckpt, run = find_checkpoint(path)
    cfg = TrainConfig(**read_json(run / "train_config.json", "the run's settings"))
    torch.manual_seed(cfg.seed)  # the same construction as the run (new projector, LoRA init)
    model, loaded = build_model(cfg)
    if cfg.strategy == "deepspeed":
        _load_deepspeed_weights(ckpt, model)
    else:
        load_weights_only(ckpt, model)
    model.eval()
    bidiffuser_dir = loaded.bidiffuser.config.root if loaded.bidiffuser is not None else None
    if cfg.lora and lora_adapter:
        with atomic_dir(out, marker="adapter_config.json") as tmp:
            model.save_pretrained(str(tmp))
            save_projector(model.base_model.model, tmp / PROJECTOR_FILE)
            loaded.tokenizer.save_pretrained(str(tmp))
        return Path(out)
    if lora_adapter:
        raise EasyGenError("--lora-adapter: this run did not train a LoRA adapter")
    if cfg.lora:
        model = model.merge_and_unload()
    return save_pretrained(model, loaded.tokenizer, out, bidiffuser_dir)
