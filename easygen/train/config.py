"""Training configuration: one dataclass, read from a JSON (or YAML) file plus ``key=value``
overrides on the command line, saved next to every checkpoint so a run can be resumed or exported
without repeating its flags."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from bidiffuser.errors import first_line

from ..errors import EasyGenError

STAGES = ("pretrain", "instruct")
STRATEGIES = ("ddp", "fsdp", "deepspeed")


@dataclass
class TrainConfig:
    stage: str = "pretrain"              # pretrain: projector only, LLM frozen; instruct: LLM + projector
    model: str = ""                      # EasyGen directory, or a base LLaMA/Vicuna directory
    projector: str | None = None         # projector file for a base LLaMA (e.g. stage 1's output)
    bidiffuser: str | None = None        # BiDiffuser directory (default: MODEL/bidiffuser)
    data: str = ""                       # data config (datasets, roots, weights, splits)
    features: str | None = None          # feature store directory (see `easygen features`)
    output_dir: str = "runs/easygen"
    strategy: str = "ddp"                # ddp | fsdp (FSDP2 per decoder layer) | deepspeed
    deepspeed_config: str | None = None  # e.g. scripts/zero2.json
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    train_projector: bool = True         # instruct: False freezes the projector (the original's LoRA run)
    train_lm_head: bool = False          # pretrain: also train lm_head (the original's stage 1)
    caption_text_features: bool = False  # also train each caption on features made from its own text
    projector_hidden_size: int = 3072    # for a new projector (stage 1 from a plain LLaMA)
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.04
    max_grad_norm: float = 1.0          # 0 = no clipping
    epochs: int = 1
    max_steps: int | None = None         # optimizer steps; overrides epochs
    micro_batch_size: int = 4            # per rank
    grad_accum: int = 1
    max_length: int = 2048
    group_by_length: bool = False        # micro-batches of similar token length (less padding; LLaVA's option)
    activation_checkpointing: bool = False
    precision: str = "auto"              # auto (bf16 where supported, else fp32) | bf16 | fp32
    feature_steps: int = 50              # BiDiffuser settings for features not yet in the store
    feature_scale: float = 7.0
    feature_seed: int = 1234
    eval_every: int = 0                  # optimizer steps between eval-loss passes (0 = only at the end)
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    seed: int = 42
    resume: bool = True                  # continue from the last complete checkpoint in output_dir

    def validate(self) -> "TrainConfig":
        problems = []
        if self.stage not in STAGES:
            problems.append(f"stage must be one of {', '.join(STAGES)}")
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {', '.join(STRATEGIES)}")
        if not self.model:
            problems.append("model is required")
        if not self.data:
            problems.append("data is required")
        if self.strategy == "deepspeed" and not self.deepspeed_config:
            problems.append("strategy deepspeed needs deepspeed_config (see scripts/zero2.json)")
        if self.lora and self.stage == "pretrain":
            problems.append("lora applies to stage instruct (stage pretrain trains only the projector)")
        if self.train_lm_head and self.stage != "pretrain":
            problems.append("train_lm_head applies to stage pretrain (stage instruct trains the LLM already)")
        if not self.train_projector and self.stage == "pretrain":
            problems.append("train_projector=false leaves nothing to train in stage pretrain")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append("precision must be auto, bf16 or fp32")
        if self.max_grad_norm < 0:
            problems.append("max_grad_norm must be >= 0 (0 = no clipping)")
        for name in ("micro_batch_size", "grad_accum", "max_length", "epochs", "keep_last"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if problems:
            raise EasyGenError("bad training config: " + "; ".join(problems))
        return self

    # Settings that fix the data order and what is trained: a resumed run must keep them.
    RESUME_KEYS = ("stage", "model", "projector", "data", "lora", "lora_r", "lora_alpha", "lora_targets",
                   "micro_batch_size", "grad_accum", "epochs", "max_steps", "seed", "strategy", "max_length",
                   "train_projector", "train_lm_head", "caption_text_features", "group_by_length")

    def resume_mismatch(self, saved: dict) -> list[str]:
        """The resume-relevant settings that differ from a run's saved ``train_config.json``."""
        # a setting newer than the saved run had its default then
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        return [f"{k} {saved.get(k, defaults.get(k))!r} -> {getattr(self, k)!r}" for k in self.RESUME_KEYS
                if saved.get(k, defaults.get(k)) != getattr(self, k)]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def _parse_value(text: str):
    """``key=value`` values: JSON when it parses (numbers, true/false, null, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# Named recipes (``easygen train --preset NAME``): ours, and the original EasyGen's as its training
# scripts and code run them. docs/training.md compares them; any setting can still be overridden.
PRESETS: dict[str, dict] = {
    "stage1": dict(stage="pretrain", lr=2e-3, warmup_ratio=0.03),
    "lora": dict(stage="instruct", lora=True, lora_r=8, lora_alpha=16, lr=2e-4,
                 lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"], train_projector=True),
    "original-stage1": dict(stage="pretrain", lr=2e-5, warmup_ratio=0.04, train_lm_head=True,
                            caption_text_features=True, micro_batch_size=4, grad_accum=4, max_length=2048,
                            activation_checkpointing=True),
    "original-lora": dict(stage="instruct", lora=True, lora_r=8, lora_alpha=32, lora_dropout=0.05,
                          lora_targets=["q_proj", "v_proj"], train_projector=False, lr=2e-5, warmup_ratio=0.03,
                          micro_batch_size=32, grad_accum=4, max_length=2048, activation_checkpointing=True),
}


def load_config(path: str | None, overrides: list[str] = (), preset: str | None = None, **defaults) -> TrainConfig:
    """``preset`` values, then ``defaults``, then file values, then ``key=value`` overrides; unknown
    keys are an error."""
    if preset is not None and preset not in PRESETS:
        raise EasyGenError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    values = {**PRESETS.get(preset, {}), **defaults}
    if path:
        p = Path(path)
        if not p.is_file():
            raise EasyGenError(f"training config not found: {p}")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml
                loaded = yaml.safe_load(text) or {}
            else:
                loaded = json.loads(text)
        except Exception as e:  # JSON or YAML syntax: one line naming the file
            raise EasyGenError(f"{p}: cannot parse: {first_line(e)}") from None
        if not isinstance(loaded, dict):
            raise EasyGenError(f"{p}: expected a mapping of settings")
        values.update(loaded)
    for item in overrides:
        if "=" not in item:
            raise EasyGenError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        values[key.replace("-", "_")] = _parse_value(value)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise EasyGenError(f"unknown training settings: {', '.join(unknown)}")
    return TrainConfig(**values).validate()
