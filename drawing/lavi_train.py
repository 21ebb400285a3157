"""Train LaVi-Bridge on its own bases, as ShihaoZhaoZSH/LaVi-Bridge@5a725f3's ``train/t5_unet.py``,
``train/llama2_unet.py`` and ``train/t5_transformer.py`` do, and write the result in its released layout.

The recipe (the scripts'): a ``TextAdapter`` (LM width -> (LM + vision text width) / 2 -> vision text
width, as the released adapters) and LoRA rank 32, scale 1, dropout 0.1 on the vision model (SD1.x
U-Net: every Linear/Conv2d under ResnetBlock2D/Attention/GEGLU; PixArt: under Attention/GEGLU) and on
the LM's attention (T5Attention / LlamaAttention); cloneofsimo-lora's init (up = 0, down ~ N(0, 1/r)).
AdamW, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8; lr 1e-4 for the vision LoRA and the adapter
(PixArt: 2e-5) and 5e-6 for the LM LoRA; a constant lr (the scripts ask diffusers for
``get_scheduler("constant", num_warmup_steps=500)``, and "constant" ignores the warm-up); gradients
clipped at 1.0. DDPM noise from the base's scheduler config, epsilon MSE, latents = VAE sample x 0.18215,
77 right-padded tokens (PixArt: 120 and the mask, given to T5 and the transformer). Everything runs in
train mode as the scripts run it (the adapter's and the LoRA layers' dropout 0.1, T5's own dropout).

Conventions of the project's trainers (``bidiffuser.train``): torchrun (DDP; gloo on CPU), a
resumable seeded data order, sharded checkpoints with every rank's RNG, exact resume; every random
draw of an example (flip, VAE sample, timestep, noise) comes from ``sample_generator(seed, epoch, index)``.

Writes ``OUT/adapter/`` (config.json + diffusion_pytorch_model.safetensors, what the scripts'
``save_pretrained`` writes), ``OUT/lora_vis.pt`` and ``OUT/lora_text.pt`` (fp16 lists as
``save_lora_weight`` writes them), the same LoRAs by module name (``OUT/lora_vis.safetensors``,
``OUT/lora_text.safetensors``: ``<module>.lora_A.weight`` = down, ``<module>.lora_B.weight`` = up, float32)
and ``OUT/lavi_train.json``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bidiffuser.checkpoint import atomic_path, save_safetensors
from bidiffuser.distributed import barrier, init_distributed, shutdown
from bidiffuser.errors import BiDiffuserError
from bidiffuser.train import LossLog, _check_resume, _run_signature, sample_generator, step_plan
from bidiffuser.train_checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint

from .backend import DrawingError
from .lavi_adapter import TextAdapter, save_adapter
from .lavi_bridge import COMBOS, VAE_SCALE, _from_pretrained
from .lavi_lora import (LLAMA_TARGETS, T5_TARGETS, TRANSFORMER_TARGETS, UNET_TARGETS, LoraSite, apply_lora,
                        positional_list, reference_order, save_positional)
from .lavi_text import LlamaText, T5Text
from .lavi_train_data import image_tensor, read_rows

# lr of the vision LoRA and the adapter in each script (the LM LoRA's is 5e-6 in all three)
SCRIPT_LR = {"llama2_unet": 1e-4, "t5_unet": 1e-4, "t5_transformer": 2e-5}
SCRIPT_DROPOUT = 0.1  # cloneofsimo-lora's LoraInjected* default and the adapter's FeedForward
_RUN_KEYS = ("combo", "resolution", "lora_rank", "text_lora", "adapter_int_dim", "dropout", "lr", "lm_lr",
             "weight_decay", "warmup_steps", "max_grad_norm", "batch_size", "seed", "diffusion", "text_model")


@dataclass
class LaviTrainConfig:
    combo: str                      # llama2_unet | t5_unet | t5_transformer
    data: str                       # captions TSV: image_path<TAB>caption
    out: str                        # the layout folder to write
    diffusion: str                  # SD1.x or PixArt diffusers folder (unet|transformer, vae, scheduler)
    text_model: str                 # Llama-2 or t5-large transformers folder
    image_root: str | None = None
    resolution: int = 512
    lora_rank: int = 32
    text_lora: bool = True          # False: the LM stays frozen; lora_text.pt is then written as zeros
    adapter_int_dim: int | None = None  # default (LM width + vision text width) // 2, as released
    dropout: float = SCRIPT_DROPOUT  # LoRA layers' and adapter's (the LM's own comes from its config)
    lr: float | None = None         # vision LoRA and adapter; default the script's
    lm_lr: float = 5e-6
    weight_decay: float = 1e-2
    warmup_steps: int = 0           # linear warm-up to a constant lr; the scripts' is in effect 0
    max_grad_norm: float = 1.0
    batch_size: int = 1             # per process
    steps: int | None = None
    epochs: int = 1
    grad_accum: int = 1             # step_plan's unit; LaVi-Bridge accumulates nothing
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    seed: int = 42
    device: str | None = None
    run_dir: str | None = None      # default OUT/checkpoints
    skip_bad_rows: bool = False

    def resolved(self) -> "LaviTrainConfig":
        cfg = dataclasses.replace(self, lr=self.lr if self.lr is not None else SCRIPT_LR.get(self.combo, 1e-4),
                                  diffusion=str(Path(self.diffusion).resolve()),
                                  text_model=str(Path(self.text_model).resolve()))
        problems = []
        if cfg.combo not in COMBOS:
            problems.append(f"combo must be one of {', '.join(COMBOS)} (got {cfg.combo!r})")
        if cfg.resolution < 8 or cfg.resolution % (16 if cfg.combo == "t5_transformer" else 8):
            problems.append("resolution must be a positive multiple of 8 (PixArt: 16)")
        if cfg.lora_rank < 1 or (cfg.adapter_int_dim is not None and cfg.adapter_int_dim < 1):
            problems.append("lora rank and adapter width must be >= 1")
        if not 0.0 <= cfg.dropout < 1.0:
            problems.append("dropout must lie in [0, 1)")
        if (cfg.lr or 0) <= 0 or cfg.lm_lr <= 0 or cfg.weight_decay < 0 or cfg.warmup_steps < 0:
            problems.append("learning rates must be > 0, weight decay and warm-up steps >= 0")
        if min(cfg.epochs, cfg.batch_size, cfg.save_every, cfg.log_every, cfg.keep_last) < 1 or (cfg.steps or 1) < 1:
            problems.append("steps, epochs, batch size, save/log intervals and keep-last must be >= 1")
        if problems:
            raise BiDiffuserError("bad lavi-bridge training settings: " + "; ".join(problems))
        return cfg

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.out) / "checkpoints"


def _lora_dropout(layer: nn.Module, p: float) -> None:
    """cloneofsimo-lora drops the LoRA branch's OUTPUT, ``dropout(up(down(x))) * scale``; peft's own
    dropout acts on its input. A hook on ``lora_B`` gives the former (peft adds ``lora_B(..) * scaling``)."""
    if p > 0:
        layer.lora_B["default"].register_forward_hook(lambda m, args, out: F.dropout(out, p, m.training))


def add_trainable_lora(model: nn.Module, targets, rank: int, dropout: float) -> list[LoraSite]:
    """LoRA on the modules the reference injects, initialised as cloneofsimo-lora's
    ``inject_trainable_lora_extended``: up = 0, down ~ N(0, 1/rank) (from the global generator)."""
    sites = reference_order(model, targets)
    if not sites:
        raise DrawingError(f"{type(model).__name__} has no module of class {'/'.join(sorted(targets))} for LoRA")
    named = {}
    for site in sites:
        if site.name not in named:
            up_shape, down_shape = site.expected_shapes(rank)
            named[site.name] = (torch.zeros(up_shape), torch.randn(down_shape) / rank)
    apply_lora(model, named)
    modules = dict(model.named_modules())
    for name in named:
        layer = modules[name]
        for p in (*layer.lora_A["default"].parameters(), *layer.lora_B["default"].parameters()):
            p.requires_grad_(True)
        _lora_dropout(layer, dropout)
    return sites


def adapter_dropout(adapter: TextAdapter, p: float) -> TextAdapter:
    """The reference adapter's FeedForward holds ``Dropout(0.1)`` where ours (inference) holds an identity."""
    for ff in (adapter.ff1, adapter.ff2):
        ff.net[1] = nn.Dropout(p)
    return adapter


class Trainee(nn.Module):
    """What trains: the LoRA'd vision model, the adapter and (with text LoRA) the LM. A frozen LM stays
    outside, so DDP and the checkpoints never carry it."""

    def __init__(self, combo: str, vis: nn.Module, adapter: TextAdapter, text, text_trains: bool, noise_scheduler):
        super().__init__()
        self.spec = COMBOS[combo]
        self.vis, self.adapter = vis, adapter
        self.lm = text.model if text_trains else None
        self._text, self._noise = text, noise_scheduler

    def forward(self, captions: list[str], latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        spec = self.spec
        with torch.set_grad_enabled(self.lm is not None and torch.is_grad_enabled()):
            states, mask = self._text.encode(captions, spec.max_length, spec.masked)
        context = self.adapter(states)
        noisy = self._noise.add_noise(latents, noise, timesteps)
        if spec.diffusion == "unet":
            pred = self.vis(noisy, timesteps, context).sample
        else:
            pred = self.vis(noisy, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=timesteps,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            pred = pred.chunk(2, dim=1)[0]  # the learned-sigma half is not trained
        return F.mse_loss(pred.float(), noise.float(), reduction="mean")


@dataclass
class Parts:
    trainee: Trainee
    vae: nn.Module
    vis_sites: list[LoraSite]
    text_sites: list[LoraSite]
    text: object


def build(cfg: LaviTrainConfig, device) -> Parts:
    """The bases from their folders, LoRA and the adapter added (seeded by the caller)."""
    from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel, UNet2DConditionModel

    spec = COMBOS[cfg.combo]
    base, text_dir = Path(cfg.diffusion), Path(cfg.text_model)
    vis_cls, sub = ((UNet2DConditionModel, "unet") if spec.diffusion == "unet"
                    else (PixArtTransformer2DModel, "transformer"))
    vis = _from_pretrained(vis_cls, base / sub, f"{spec.diffusion} of {base.name}", torch_dtype=torch.float32)
    vae = _from_pretrained(AutoencoderKL, base / "vae", f"VAE of {base.name}", torch_dtype=torch.float32)
    noise_scheduler = _from_pretrained(DDPMScheduler, base / "scheduler", f"scheduler of {base.name}")
    text = (LlamaText if spec.text == "llama" else T5Text).load(text_dir, device, torch.float32)

    vis_sites = add_trainable_lora(vis, UNET_TARGETS if spec.diffusion == "unet" else TRANSFORMER_TARGETS,
                                   cfg.lora_rank, cfg.dropout)
    text_targets = LLAMA_TARGETS if spec.text == "llama" else T5_TARGETS
    text_sites = (add_trainable_lora(text.model, text_targets, cfg.lora_rank, cfg.dropout) if cfg.text_lora
                  else reference_order(text.model, text_targets))
    out_dim = vis.config.cross_attention_dim if spec.diffusion == "unet" else vis.config.caption_channels
    int_dim = cfg.adapter_int_dim or (text.hidden_size + out_dim) // 2
    adapter = adapter_dropout(TextAdapter(text.hidden_size, int_dim, out_dim), cfg.dropout)
    text.model.train()  # as the scripts: T5's own dropout is on (whether or not its LoRA trains)
    trainee = Trainee(cfg.combo, vis.train(), adapter.train(), text, cfg.text_lora, noise_scheduler).to(device)
    return Parts(trainee, vae.to(device).eval(), vis_sites, text_sites, text)


def encode_images(vae, paths: list[str], resolution: int, gens: list[torch.Generator], device,
                  num_train_timesteps: int = 1000):
    """(latents, noise, timesteps): per example its flip, VAE sample, noise and timestep, in that order."""
    pixels = torch.stack([image_tensor(p, resolution, g) for p, g in zip(paths, gens)]).to(device)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in gens]).to(device)
    latents = (dist.mean + dist.std * eps) * VAE_SCALE
    timesteps = torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g) for g in gens]).to(device)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(device)
    return latents, noise, timesteps


def _optimizer(parts: Parts, cfg: LaviTrainConfig):
    """The scripts' groups: vision LoRA, LM LoRA, adapter."""
    t = parts.trainee
    groups = [{"params": [p for p in t.vis.parameters() if p.requires_grad], "lr": cfg.lr}]
    if t.lm is not None:
        groups.append({"params": [p for p in t.lm.parameters() if p.requires_grad], "lr": cfg.lm_lr})
    groups.append({"params": list(t.adapter.parameters()), "lr": cfg.lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)


def write_layout(out: Path, parts: Parts, cfg: LaviTrainConfig, step: int) -> Path:
    """The released layout plus the named safetensors (rank 0 only)."""
    t = parts.trainee
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(t.adapter, out / "adapter", safetensors=True)
    save_positional(positional_list(t.vis, parts.vis_sites), out / "lora_vis.pt")
    _save_named(t.vis, parts.vis_sites, out / "lora_vis.safetensors", cfg)
    if t.lm is not None:
        save_positional(positional_list(t.lm, parts.text_sites), out / "lora_text.pt")
        _save_named(t.lm, parts.text_sites, out / "lora_text.safetensors", cfg)
    else:
        # LaVi-Bridge's test scripts always read lora_text.pt and take one (up, down) pair per module,
        # failing on a shorter list: an all-zero list of full length adds exactly nothing.
        zeros = [torch.zeros(s) for site in parts.text_sites for s in site.expected_shapes(cfg.lora_rank)]
        save_positional(zeros, out / "lora_text.pt")
        (out / "lora_text.safetensors").unlink(missing_ok=True)
    # absolute base paths: the lavi-bridge backend reads them to load OUT without options
    info = {"combo": cfg.combo, "diffusion": str(Path(cfg.diffusion).resolve()),
            "text_model": str(Path(cfg.text_model).resolve()), "steps": step,
            "text_lora": cfg.text_lora, "lora_rank": cfg.lora_rank,
            "load": 'drawing.load_backend("lavi-bridge", OUT)  (combo and bases read from this file)',
            "config": dataclasses.asdict(cfg)}
    with atomic_path(out / "lavi_train.json") as tmp:
        Path(tmp).write_text(json.dumps(info, indent=1) + "\n")
    return out


def _save_named(model: nn.Module, sites: list[LoraSite], path: Path, cfg: LaviTrainConfig) -> None:
    modules = dict(model.named_modules())
    sd = {}
    for site in sites:
        layer = modules[site.name]
        sd[f"{site.name}.lora_A.weight"] = layer.lora_A["default"].weight.detach().float().cpu()
        sd[f"{site.name}.lora_B.weight"] = layer.lora_B["default"].weight.detach().float().cpu()
    save_safetensors(sd, path, {"format": "pt", "rank": str(cfg.lora_rank), "alpha": str(cfg.lora_rank),
                                "combo": cfg.combo})


def train_lavi(cfg: LaviTrainConfig) -> Path:
    """Run (or resume) a LaVi-Bridge training and write its layout; returns ``cfg.out``."""
    cfg = cfg.resolved()
    out = Path(cfg.out)
    if out.resolve() in (Path(cfg.diffusion), Path(cfg.text_model)):
        raise BiDiffuserError(f"--out {out} is an input of this run; write a new folder")
    for flag, path in (("--diffusion", cfg.diffusion), ("--text-model", cfg.text_model)):
        if not Path(path).is_dir():
            raise BiDiffuserError(f"{flag}: no folder {path}")
    rows, skipped = read_rows(cfg.data, cfg.image_root, cfg.skip_bad_rows)
    env = init_distributed(cfg.device)
    run = cfg.run_path
    if env.is_main:
        if skipped:
            print(f"{cfg.data}: skipped {skipped} malformed row(s)")
        run.mkdir(parents=True, exist_ok=True)
        (run / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # the same initial LoRA and adapter on every rank and every rerun
        parts = build(cfg, env.device)
    torch.manual_seed(cfg.seed + 1 + env.rank)  # dropout: its own stream per rank (a resume restores it)
    trainee = parts.trainee

    sampler, steps_per_epoch, total_steps = step_plan(cfg, len(rows), env)
    model = trainee
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(trainee, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    optimizer = _optimizer(parts, cfg)
    from transformers import get_constant_schedule_with_warmup
    scheduler = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    signature = _run_signature(cfg, rows, total_steps, _RUN_KEYS)
    signature.pop("total_steps")  # a run stopped by --steps K goes on with a larger --steps
    step = 0
    previous = complete_checkpoints(run)
    if previous:
        saved = json.loads((previous[-1] / "trainer_state.json").read_text()).get("run", {})
        _check_resume(previous[-1], saved, signature)
        state = load_checkpoint(previous[-1], model, optimizer, env)
        step = state["step"]
        if step > total_steps:
            raise BiDiffuserError(f"{previous[-1]} is at step {step}, past --steps {total_steps}; "
                                  f"give more steps, or a new --out / --run-dir")
        scheduler.load_state_dict(state["scheduler"])
        if env.is_main:
            print(f"resumed from {previous[-1]} at step {step}")

    params = [p for p in trainee.parameters() if p.requires_grad]
    bar = tqdm(total=total_steps, initial=step, desc=f"lavi-bridge {cfg.combo}", disable=not env.is_main,
               dynamic_ncols=True)
    log = LossLog(run / "log.jsonl" if env.is_main else None, cfg.batch_size * env.world_size, env)
    try:  # the bar closes before an error is printed
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            indices = sampler.epoch(epoch)[in_epoch]
            gens = [sample_generator(cfg.seed, epoch, i) for i in indices]
            latents, noise, timesteps = encode_images(parts.vae, [rows[i][0] for i in indices], cfg.resolution, gens,
                                                      env.device, trainee._noise.config.num_train_timesteps)
            loss = model([rows[i][1] for i in indices], latents, noise, timesteps)
            if not torch.isfinite(loss):
                raise BiDiffuserError(f"loss is {loss.item()} at step {step + 1}; lower --lr or check the data")
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            log.add({"loss": loss.item()}, 1)
            log.step(step, epoch, scheduler.get_last_lr()[0], bar, step % cfg.log_every == 0 or step == total_steps)
            if step % cfg.save_every == 0 or step == total_steps:
                save_checkpoint(run, step, model, optimizer, {"scheduler": scheduler.state_dict(), "run": signature},
                                env, keep_last=cfg.keep_last)
    finally:
        bar.close()
        log.close()
    if env.is_main:
        write_layout(out, parts, cfg, step)
        print(f"wrote LaVi-Bridge {cfg.combo} layout {out} (step {step})")
    barrier()
    shutdown()
    return out
