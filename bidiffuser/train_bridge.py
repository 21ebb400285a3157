"""``bidiffuser train --bridge-stage distill|t2i``: train an LLM bridge (bidiffuser.bridge) on the same
captions TSV, checkpoints, exact resume and torchrun launch as ``bidiffuser train``.

Stage ``distill`` (A; GILL's recipe): the bridge learns to be a drop-in for the CLIP path,

    loss = MSE(bridge(LM(caption), n), encode_prefix(CLIP text(teacher caption)))

with n uniform in 1..N per row (a timestep-aware bridge learns the same target at every timestep;
images are not read). The teacher caption is the row's own (``distill_teacher="same"``, GILL's), or
the first caption of the row's image in the file (``"first"``): a description longer than CLIP's
context then learns the latent of a short caption of the same picture, where CLIP's own reading of
it would be cut off. Stage ``t2i`` (B): the text-to-image diffusion objective through the U-ViT, the
image (and its CLIP embedding) noised at n, the text slot filled by the bridge at t_text = 0:

    loss = MSE(img_out, eps_img) + MSE(clip_out, eps_clip)

With probability ``uncond_prob`` a row's text is UniDiffuser's "true uncond" input instead (Gaussian
noise at t_text = N), so classifier-free guidance keeps a trained branch. The U-ViT gets LoRA (peft) on
``qkv``, ``proj``, ``fc1``, ``fc2``; the LM stays frozen unless ``lm_lora_rank`` asks for LoRA on its
attention (stage t2i; a preset's LM LoRA waits for that stage). Only the bridge and the LoRA matrices
train, checkpoint and are written (their EMA with ``ema_decay``). The result is a bridge directory
(``config.json`` + named safetensors); stage B usually starts from stage A's (``init``), whose LoRAs
carry on. The text model runs in the run's ``dtype``. Every random draw of a row comes from
``train.sample_generator(seed, epoch, index)``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from .autoencoder import sample_posterior
from .bridge import (LM_LORA, LM_LORA_TARGETS, UVIT_LORA_TARGETS, Bridge, BridgeConfig, LoraHooks, LoraSettings,
                     TextModel, add_lora, check_fits, load_lora, load_text_model, lora_state_dict, read_bridge,
                     save_bridge)
from .captions import read_caption_tsv
from .distributed import barrier, init_distributed, shutdown
from .errors import BiDiffuserError
from .images import load_image
from .model_dir import read_config
from .sampler import NoiseSchedule
from .train import (EMA, KILL_ENV, LossLog, _check_resume, _gradient_sync, _noise_mse, _run_signature, gather_full,
                    lr_scheduler, sample_generator, snr_weights, step_plan)
from .train_checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from .uvit import load_uvit

STAGES = ("distill", "t2i")
# Published hyper-parameters. LaVi-Bridge: per-token adapter, LoRA rank 32 (scale 1, dropout 0.1) on the
# vision model and the LM's attention, lr 1e-4 (adapter, vision LoRA) and 5e-6 (LM LoRA). ELLA: the
# timestep-aware resampler (width 768, 6 blocks, 8 heads, 128 LM tokens); the diffusion model is frozen.
PRESETS = {
    "lavi-bridge": dict(kind="per_token", timestep_aware=False, uvit_lora_rank=32, lm_lora_rank=32, lora_dropout=0.1,
                        lr=1e-4, lm_lr=5e-6),
    "ella": dict(kind="resampler", timestep_aware=True, width=768, depth=6, heads=8, max_length=128,
                 uvit_lora_rank=0, lm_lora_rank=0, lr=1e-4),
}
DEFAULTS = dict(kind="resampler", timestep_aware=True, width=768, depth=6, heads=8, max_length=128, layer=-1,
                uvit_lora_rank=32, lm_lora_rank=0, lora_dropout=0.1, lr=1e-4, lm_lr=5e-6)
_RUN_KEYS = ("stage", "seed", "batch_size", "grad_accum", "warmup_ratio", "weight_decay", "max_grad_norm",
             "lr_schedule", "uncond_prob", "snr_gamma", "lora_alpha", "distill_teacher", "ema_decay", *DEFAULTS)


@dataclass
class BridgeTrainConfig:
    model: str                          # BiDiffuser directory (frozen; the U-ViT gets LoRA in stage t2i)
    data: str                           # captions TSV: image_path<TAB>caption
    out: str                            # the bridge directory to write
    text_model: str                     # transformers directory of the language model (or an EasyGen model)
    stage: str = "distill"
    init: str | None = None             # a bridge directory to start from (stage t2i: stage distill's output)
    preset: str | None = None           # lavi-bridge | ella: fills the settings below that are left unset
    kind: str | None = None
    timestep_aware: bool | None = None
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    max_length: int | None = None
    layer: int | None = None            # LM hidden state read: -1 last, -2 second to last
    uvit_lora_rank: int | None = None   # stage t2i; 0: no U-ViT LoRA (the bridge alone trains)
    lm_lora_rank: int | None = None     # 0: the LM stays frozen
    lora_alpha: float | None = None     # default: the rank (LoRA scale 1, as LaVi-Bridge)
    lora_dropout: float | None = None
    lr: float | None = None             # bridge and U-ViT LoRA
    lm_lr: float | None = None          # LM LoRA
    uncond_prob: float = 0.1            # stage t2i: share of rows trained as "true uncond"
    distill_teacher: str = "same"       # stage distill: CLIP reads the row's caption (same) or its image's first (first)
    snr_gamma: float | None = None
    image_root: str | None = None
    run_dir: str | None = None
    steps: int | None = None
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    strategy: str = "ddp"
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    seed: int = 42
    device: str | None = None
    dtype: str = "float32"              # bfloat16: the frozen encoders and the text model's weights, autocast
    skip_bad_rows: bool = False
    encode_once: bool = False           # frozen encodings (LM states, CLIP targets, image posteriors) once
    ema_decay: float | None = None      # an EMA of the trained weights, written instead of the raw ones
    activation_checkpointing: bool = False  # recompute the bridge's, U-ViT's and LoRA'd LM's blocks in backward

    def resolved(self) -> "BridgeTrainConfig":
        """Unset settings from the preset, then from DEFAULTS; checked."""
        if self.preset is not None and self.preset not in PRESETS:
            raise BiDiffuserError(f"unknown bridge preset {self.preset!r} (known: {', '.join(PRESETS)})")
        fill = {**DEFAULTS, **PRESETS.get(self.preset, {})}
        if self.stage == "distill":  # a preset's LM LoRA is for its stage t2i; distilling keeps the LM frozen
            fill["lm_lora_rank"] = 0
        cfg = dataclasses.replace(self, **{k: v for k, v in fill.items() if getattr(self, k) is None})
        problems = []
        if cfg.stage not in STAGES:
            problems.append(f"bridge stage must be one of {', '.join(STAGES)}")
        if cfg.uvit_lora_rank < 0 or cfg.lm_lora_rank < 0:
            problems.append("LoRA ranks must be >= 0")
        if cfg.stage == "distill" and cfg.lm_lora_rank:
            problems.append("LM LoRA trains in stage t2i (distillation keeps the LM frozen)")
        if cfg.ema_decay is not None and not 0.0 <= cfg.ema_decay < 1.0:
            problems.append("ema_decay must lie in [0, 1)")
        if cfg.distill_teacher not in ("same", "first"):
            problems.append("distill_teacher must be same or first")
        if not 0.0 <= cfg.uncond_prob < 1.0:
            problems.append("uncond_prob must lie in [0, 1)")
        if cfg.strategy not in ("ddp", "fsdp") or cfg.dtype not in ("float32", "bfloat16"):
            problems.append("strategy must be ddp or fsdp, dtype float32 or bfloat16")
        if min(cfg.epochs, cfg.batch_size, cfg.grad_accum, cfg.save_every, cfg.log_every) < 1 or (cfg.steps or 1) < 1:
            problems.append("steps, epochs, batch size, grad accum, save/log intervals must be >= 1")
        if cfg.lr <= 0 or cfg.lm_lr <= 0 or not 0.0 <= cfg.warmup_ratio <= 1.0:
            problems.append("learning rates must be > 0, warmup_ratio in [0, 1]")
        if cfg.lr_schedule not in ("cosine", "constant"):
            problems.append("lr_schedule must be cosine or constant")
        if problems:
            raise BiDiffuserError("bad bridge training settings: " + "; ".join(problems))
        return cfg

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.out) / "checkpoints"


class BridgeTrainee(nn.Module):
    """What trains: the bridge, and (stage t2i) the LoRA'd U-ViT and optionally the LoRA'd LM. The
    frozen LM without LoRA stays outside, so DDP and checkpoints never carry it."""

    def __init__(self, bridge: Bridge, uvit: nn.Module | None, lm: nn.Module | None, text: TextModel,
                 schedule: NoiseSchedule, data_type: int, uncond_prob: float, snr_gamma: float | None):
        super().__init__()
        self.bridge, self.uvit, self.lm = bridge, uvit, lm
        self._text, self._schedule, self._data_type = text, schedule, data_type
        self._uncond_prob, self._snr_gamma = uncond_prob, snr_gamma

    def forward(self, gens, states=None, mask=None, ids=None, target=None, z=None, clip_img=None):
        """(loss, terms) of one micro-batch; called through the DDP/FSDP wrapper so gradients sync.
        The LM's states come in ready (frozen LM) or are computed here from ``ids`` (LoRA'd LM)."""
        if ids is not None:
            states = self._text.states(ids, mask)
        if target is not None:
            return distill_loss(self.bridge, self._schedule, states, mask, target, gens)
        return t2i_loss(self.uvit, self.bridge, self._schedule, states, mask, z, clip_img, gens, self._uncond_prob,
                        self._data_type, self._snr_gamma)


def _build(cfg: BridgeTrainConfig, source, text: TextModel, device, schedule: NoiseSchedule, init):
    """(trainee, bridge config, U-ViT LoRA settings, LM LoRA settings, kept), from ``init`` (a read bridge
    directory) when given. The init bridge's LoRAs carry on: trained on in stage t2i (its settings win over
    the rank flags), and in stage distill left as they are (the LM reads through its LoRA, frozen) and
    written back unchanged: ``kept`` maps "uvit_lora" / "lm_lora" to those (settings, weights)."""
    u = source.uvit
    if init is not None:
        bcfg = init.config
    else:
        bcfg = BridgeConfig(kind=cfg.kind, lm_dim=text.hidden_size, text_dim=u.text_dim, num_tokens=u.num_text_tokens,
                            width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                            timestep_aware=cfg.timestep_aware and cfg.kind == "resampler",
                            layer=cfg.layer, max_length=cfg.max_length).validate()
    check_fits(bcfg, u.text_dim, u.num_text_tokens, text.hidden_size, cfg.init or "being trained")
    text.layer, text.max_length = bcfg.layer, bcfg.max_length
    text.pad_to = bcfg.num_tokens if bcfg.kind == "per_token" else None
    bridge = init.build(device) if init is not None else Bridge(bcfg).to(device)
    bridge.train().requires_grad_(True)
    bridge.net.checkpointing = cfg.activation_checkpointing
    uvit = uvit_lora = lm = lm_lora = None
    kept = {}
    init_uvit, init_lm = (init.uvit_lora, init.lm_lora) if init is not None else (None, None)
    if cfg.stage == "t2i":
        uvit = load_uvit(source.path("uvit"), u, device, torch.float32)
        uvit_lora = init_uvit or (
            LoraSettings(cfg.uvit_lora_rank, cfg.lora_alpha or cfg.uvit_lora_rank, cfg.lora_dropout, list(UVIT_LORA_TARGETS))
            if cfg.uvit_lora_rank else None)
        if uvit_lora is not None:
            add_lora(uvit, uvit_lora)
            if init_uvit:
                load_lora(uvit, init.uvit_lora_weights(), cfg.init)
        else:
            uvit.requires_grad_(False)
        uvit.to(device).train()
        for block in [*uvit.in_blocks, uvit.mid_block, *uvit.out_blocks]:
            block.use_checkpoint = cfg.activation_checkpointing
        lm_lora = init_lm or (LoraSettings(cfg.lm_lora_rank, cfg.lora_alpha or cfg.lm_lora_rank, cfg.lora_dropout,
                                           list(LM_LORA_TARGETS)) if cfg.lm_lora_rank else None)
        if lm_lora is not None:
            lm = add_lora(text.model, lm_lora).train()
            if init_lm:
                load_lora(lm, init.lm_lora_weights(), init.root / LM_LORA)
            for p in lm.parameters():  # trained weights stay float32 on a bfloat16 LM (peft makes them its dtype)
                if p.requires_grad:
                    p.data = p.data.float()
            if cfg.activation_checkpointing:
                if not getattr(lm, "supports_gradient_checkpointing", False):
                    raise BiDiffuserError(f"--activation-checkpointing: the text model ({type(lm).__name__}) does "
                                          f"not support gradient checkpointing")
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        if init_uvit:
            kept["uvit_lora"] = (init_uvit, init.uvit_lora_weights())
        if init_lm:
            kept["lm_lora"] = (init_lm, init.lm_lora_weights())
            text.lora = LoraHooks(text.model, init_lm, kept["lm_lora"][1], init.root / LM_LORA)
    trainee = BridgeTrainee(bridge, uvit, lm, text, schedule, source.data_type, cfg.uncond_prob, cfg.snr_gamma)
    return trainee, bcfg, uvit_lora, lm_lora, kept


def _wrap(trainee: BridgeTrainee, cfg: BridgeTrainConfig, env):
    model = trainee
    if env.distributed and cfg.strategy == "fsdp":
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if cfg.dtype == "bfloat16" else MixedPrecisionPolicy())
        units = list(getattr(trainee.bridge.net, "blocks", []))
        if trainee.uvit is not None:
            units += [*trainee.uvit.in_blocks, trainee.uvit.mid_block, *trainee.uvit.out_blocks]
        for unit in units:
            fully_shard(unit, mp_policy=mp)
        fully_shard(trainee, mp_policy=mp)
    elif env.distributed:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(trainee, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    groups = [{"params": [p for p in trainee.bridge.parameters()], "lr": cfg.lr}]
    if trainee.uvit is not None and any(p.requires_grad for p in trainee.uvit.parameters()):
        groups.append({"params": [p for p in trainee.uvit.parameters() if p.requires_grad], "lr": cfg.lr})
    if trainee.lm is not None:
        groups.append({"params": [p for p in trainee.lm.parameters() if p.requires_grad], "lr": cfg.lm_lr})
    return model, torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


class _Encodings:
    """The frozen inputs of a batch: the LM's states (frozen LM), the distillation targets, the images'
    posteriors and CLIP embeddings. With ``once`` every caption and image is encoded once, each on its
    own (so a caption's states do not depend on the padding of the batch it first came in)."""

    def __init__(self, pipe, text: TextModel, once: bool):
        self.pipe, self.text, self.once = pipe, text, once
        self.cache: dict = {}

    def _memo(self, kind: str, key: str, make):
        if (kind, key) not in self.cache:
            self.cache[(kind, key)] = make()
        return self.cache[(kind, key)]

    def states(self, captions: list[str]):
        if not self.once:
            return self.text.encode(captions)
        per = [self._memo("states", c, lambda c=c: self.text.encode([c])) for c in captions]
        L = max(s.shape[1] for s, _ in per)
        states = torch.cat([F.pad(s, (0, 0, 0, L - s.shape[1])) for s, _ in per])
        return states, torch.cat([F.pad(m, (0, L - m.shape[1])) for _, m in per])

    def targets(self, captions: list[str]) -> torch.Tensor:
        if not self.once:
            return self.pipe.encode_prompts(captions).clone()
        return torch.cat([self._memo("x0", c, lambda c=c: self.pipe.encode_prompts([c])) for c in captions]).clone()

    def images(self, paths: list[str], gens):
        if self.once:
            enc = [self._memo("img", p, lambda p=p: self.pipe.encode_image_posteriors([load_image(p)])) for p in paths]
            mean, std, clip = (torch.cat([e[i] for e in enc]) for i in range(3))
        else:
            mean, std, clip = self.pipe.encode_image_posteriors([load_image(p) for p in paths])
        return sample_posterior(mean, std, gens).clone(), clip.clone()


def distill_loss(bridge, schedule: NoiseSchedule, states, mask, target, gens) -> tuple[torch.Tensor, dict]:
    n = torch.cat([schedule.sample_timesteps(1, g) for g in gens]).to(states.device)
    out = bridge(states, mask, n if bridge.timestep_aware else None)
    loss = (out.float() - target).pow(2).mean()
    return loss, {"distill": loss.item()}


def t2i_loss(uvit, bridge, schedule: NoiseSchedule, states, mask, z, clip_img, gens, uncond_prob: float,
             data_type: int = 1, snr_gamma: float | None = None) -> tuple[torch.Tensor, dict]:
    dev = z.device
    draw = lambda shape: torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)  # noqa: E731
    n = torch.cat([schedule.sample_timesteps(1, g) for g in gens])
    eps_img, eps_clip = draw(z.shape[1:]), draw(clip_img.shape[1:])
    text = bridge(states, mask, n.to(dev) if bridge.timestep_aware else None)
    t_text = torch.zeros(len(gens), dtype=torch.long)
    if uncond_prob:
        drop = torch.stack([torch.rand((), generator=g) < uncond_prob for g in gens])
        text = torch.where(drop[:, None, None].to(dev), draw(text.shape[1:]).to(text.dtype), text)
        t_text = torch.where(drop, schedule.N, t_text)
    img_out, clip_out, _ = uvit(schedule.add_noise(z, eps_img, n), schedule.add_noise(clip_img, eps_clip, n),
                                text, n.to(dev), t_text.to(dev), data_type)
    w = snr_weights(schedule, n, snr_gamma)
    terms = {"img": _noise_mse(img_out, eps_img, w), "clip": _noise_mse(clip_out, eps_clip, w)}
    loss = terms["img"] + terms["clip"]
    return loss, {k: v.item() for k, v in terms.items()}


def train_bridge(cfg: BridgeTrainConfig, text_model=None) -> Path:
    """Run (or resume) a bridge training stage and write the bridge directory; returns its path.
    ``text_model``: a loaded ``(model, tokenizer)`` instead of loading ``cfg.text_model``."""
    from .pipeline import BiDiffuser

    cfg = cfg.resolved()
    out = Path(cfg.out)
    if out.resolve() == Path(cfg.model).resolve() or (cfg.init and out.resolve() == Path(cfg.init).resolve()):
        raise BiDiffuserError(f"--out {out} is an input of this run; write a new directory")
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    rows, skipped = read_caption_tsv(cfg.data, cfg.image_root, "skip" if cfg.skip_bad_rows else "raise",
                                     check_images=cfg.stage == "t2i")
    env = init_distributed(cfg.device)
    run = cfg.run_path
    if env.is_main:
        if skipped:
            print(f"{cfg.data}: skipped {skipped} malformed row(s)")
        run.mkdir(parents=True, exist_ok=True)
        (run / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    source = read_config(cfg.model)
    init = read_bridge(cfg.init) if cfg.init else None
    amp = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    pipe = BiDiffuser(source, device=env.device, dtype=amp)
    # The text model in the run's dtype (a 7B LLM in bfloat16: 13.5 GB, not 27); under FSDP a LoRA'd LM stays
    # float32, as every sharded weight does (FSDP's mixed precision casts it for compute).
    lm_trains = cfg.stage == "t2i" and bool(cfg.lm_lora_rank or (init is not None and init.lm_lora))
    lm_dtype = amp if not (lm_trains and env.distributed and cfg.strategy == "fsdp") else torch.float32
    model_, tokenizer = text_model if text_model is not None else load_text_model(cfg.text_model, env.device, lm_dtype)
    text = TextModel(model_, tokenizer)
    schedule = NoiseSchedule.stable_diffusion()
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # the same initial bridge and LoRA weights on every rank and every rerun
        trainee, bcfg, uvit_lora, lm_lora, kept = _build(cfg, source, text, env.device, schedule, init)
    torch.manual_seed(cfg.seed + 1 + env.rank)  # LoRA dropout: its own stream per rank (a resume restores it)

    sampler, steps_per_epoch, total_steps = step_plan(cfg, len(rows), env)
    model, optimizer = _wrap(trainee, cfg, env)
    ema = EMA(trainee, cfg.ema_decay) if cfg.ema_decay is not None else None
    scheduler = lr_scheduler(optimizer, cfg, total_steps)
    autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) \
        if amp == torch.bfloat16 and cfg.strategy != "fsdp" else nullcontext
    signature = {**_run_signature(cfg, rows, total_steps, _RUN_KEYS), "init": cfg.init}
    step = 0
    previous = complete_checkpoints(run)
    if previous:
        state = load_checkpoint(previous[-1], model, optimizer, env, ema.state() if ema else None,
                                check=lambda saved: _check_resume(previous[-1], saved.get("run", {}), signature))
        step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        if env.is_main:
            print(f"resumed from {previous[-1]} at step {step}")

    encodings = _Encodings(pipe, text, once=cfg.encode_once)
    # the caption CLIP reads for each row's distillation target
    first = {}
    for image, caption in rows:
        first.setdefault(image, caption)
    teacher = [c if cfg.distill_teacher == "same" else first[image] for image, c in rows]
    samples_per_step = cfg.batch_size * cfg.grad_accum * env.world_size
    bar = tqdm(total=total_steps, initial=step, desc=f"bridge {cfg.stage}", disable=not env.is_main, dynamic_ncols=True)
    log = LossLog(run / "log.jsonl" if env.is_main else None, samples_per_step, env)
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        micro = sampler.epoch(epoch)[in_epoch * cfg.grad_accum:(in_epoch + 1) * cfg.grad_accum]
        for k, indices in enumerate(micro):
            gens = [sample_generator(cfg.seed, epoch, i) for i in indices]
            batch = [rows[i] for i in indices]
            captions = [c for _, c in batch]
            with _gradient_sync(model, trainee, k == len(micro) - 1), autocast():
                if trainee.lm is not None:
                    ids, mask = text.tokenize(captions)
                    inputs = {"ids": ids, "mask": mask}
                else:
                    states, mask = encodings.states(captions)
                    inputs = {"states": states, "mask": mask}
                if cfg.stage == "distill":
                    inputs["target"] = encodings.targets([teacher[i] for i in indices])
                else:
                    inputs["z"], inputs["clip_img"] = encodings.images([p for p, _ in batch], gens)
                loss, terms = model(gens, **inputs)
            (loss / cfg.grad_accum).backward()
            log.add({"loss": loss.item(), **terms}, cfg.grad_accum)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in trainee.parameters() if p.requires_grad], cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        step += 1
        bar.update(1)
        log.step(step, epoch, scheduler.get_last_lr()[0], bar, step % cfg.log_every == 0 or step == total_steps)
        if step % cfg.save_every == 0 or step == total_steps:
            save_checkpoint(run, step, model, optimizer, {"scheduler": scheduler.state_dict(), "run": signature},
                            env, keep_last=cfg.keep_last, extra_state=ema.state() if ema else None)
        if step == kill_at:  # fault injection for the resume test
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    log.close()

    if ema is not None:  # the EMA is what gets written
        with torch.no_grad():
            for name, p in ema.params.items():
                p.copy_(ema.shadow[name])
    bridge_sd = gather_full(trainee.bridge.state_dict(), env.is_main)
    uvit_sd = gather_full(lora_state_dict(trainee.uvit), env.is_main) if uvit_lora is not None else None
    lm_sd = gather_full(lora_state_dict(trainee.lm), env.is_main) if lm_lora is not None else None
    if env.is_main:
        save_bridge(out, bcfg, bridge_sd,
                    uvit_lora=(uvit_lora, uvit_sd) if uvit_lora is not None else kept.get("uvit_lora"),
                    lm_lora=(lm_lora, lm_sd) if lm_lora is not None else kept.get("lm_lora"),
                    text_model=str(Path(cfg.text_model).resolve()),
                    info={"stage": cfg.stage, "steps": step, "init": cfg.init, "bidiffuser": str(cfg.model),
                          "preset": cfg.preset, **({"ema_decay": cfg.ema_decay} if ema is not None else {})})
        print(f"wrote bridge directory {out} (stage {cfg.stage}, step {step})")
    barrier()
    shutdown()
    return out

