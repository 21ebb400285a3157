"""``bidiffuser train``: train the U-ViT with EasyGen's BiDiffuser objective or UniDiffuser's (one file,
top to bottom).

Per caption pair: x0 = encode_prefix(CLIP text(caption)) (77 x text_dim), z = VAE posterior sample
of the image (scaled), clip_img = CLIP image embedding; n uniform in 1..N and eps ~ N(0, I) per
sample (EasyGen draws one n per batch); x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps. The U-ViT
sees the image clean (t_img = 0) and the text at t_text = n:

    loss = MSE(text_out, eps) + MSE(img_out, 0)                       (EasyGen's ``LSimple``)
         + t2i_weight * [MSE(img_out', eps_img) + MSE(clip_out', eps_clip)]   (text clean, image at n')

``objective="unidiffuser"`` is UniDiffuser's joint objective instead (how the network is trained from
scratch): image (with its CLIP embedding) and text are noised at independent timesteps n_img, n_text,
and the network predicts both noises, loss = MSE over the concatenated noise [eps_img, eps_clip, eps_text].

``snr_gamma`` (Min-SNR-gamma, Hang et al. 2023, as in diffusers' ``--snr_gamma``) weights each noise
term by min(SNR_n, gamma) / SNR_n of its own timestep: the near-clean steps, which teach little about
layout, count less, and a small network learns to follow its condition in fewer steps.

VAE, CLIP and the caption decoder stay frozen and encode each micro-batch on the fly, or, with
``encode_once``, every image and caption once before the first step (``FrozenEncodings``: the
posterior's mean and std, the CLIP image embedding and the text latent are kept in memory; the
posterior noise is drawn from the same generator, so both ways give the same run). An EMA of the
U-ViT weights is kept (and checkpointed sharded with them); it is what the new model directory gets.
Launch with ``torchrun`` for DDP or FSDP2 (``fully_shard`` per U-ViT block, then the root). Every
random draw of a sample (posterior noise, n, eps) comes from a generator seeded by (seed, epoch,
example index), so a run gives the same result whatever the batch layout, and resuming from a
checkpoint continues exactly the uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from .autoencoder import sample_posterior
from .captions import read_caption_tsv
from .checkpoint import atomic_path, save_safetensors
from .distributed import DistEnv, ResumableSampler, all_reduce_sum, barrier, init_distributed, shutdown
from .errors import BiDiffuserError
from .images import load_image
from .model_dir import CONFIG_NAME, BiDiffuserConfig, place_component, read_config, write_config
from .sampler import NoiseSchedule
from .train_checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from .uvit import UViT, load_uvit

CHECKPOINTS = "checkpoints"
UVIT_FILE = "uvit.safetensors"
# Tests set this to kill the process (SIGKILL, no clean-up) right after the given optimizer step.
KILL_ENV = "BIDIFFUSER_TEST_KILL_AT_STEP"
OBJECTIVES = ("easygen", "unidiffuser")
LR_SCHEDULES = ("cosine", "constant")
# Settings that define the run: resuming with any of them changed would not continue the same run.
_RUN_KEYS = ("objective", "seed", "batch_size", "grad_accum", "lr", "warmup_ratio", "weight_decay", "max_grad_norm",
             "t2i_weight", "ema_decay", "snr_gamma", "lr_schedule", "t2i_data", "t2i_uncond")


@dataclass
class TrainConfig:
    model: str                           # BiDiffuser directory to start from
    data: str                            # captions TSV: image_path<TAB>caption
    out: str                             # the new BiDiffuser directory
    objective: str = "easygen"           # easygen (image->text, EasyGen) | unidiffuser (joint, from scratch)
    image_root: str | None = None        # default: the TSV's folder
    run_dir: str | None = None           # checkpoints + log (default: OUT/checkpoints)
    steps: int | None = None             # optimizer steps; overrides epochs
    epochs: int = 1
    batch_size: int = 4                  # micro-batch per rank
    grad_accum: int = 1
    lr: float = 1e-5
    warmup_ratio: float = 0.03
    lr_schedule: str = "cosine"          # after warm-up: cosine decay to 0 | constant (UniDiffuser's own training)
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0           # 0: no clipping (EasyGen's BiDiffuser training clips nothing)
    t2i_weight: float = 0.0
    t2i_uncond: float = 0.0              # share of t2i rows whose text is UniDiffuser's "true uncond" (noise at N)
    snr_gamma: float | None = None       # Min-SNR-gamma loss weighting (5 is the paper's choice); None: plain MSE
    ema_decay: float | None = 0.9999     # None: no EMA, the raw weights are written
    strategy: str = "ddp"                # ddp | fsdp (only matters under torchrun)
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    seed: int = 42
    device: str | None = None            # default: cuda when available
    dtype: str = "float32"               # float32 | bfloat16 (autocast; weights stay float32)
    activation_checkpointing: bool = False
    skip_bad_rows: bool = False
    copy: bool = False                   # copy the frozen components into OUT instead of symlinking
    encode_once: bool = False            # encode images/captions once, kept in memory (small data sets)
    t2i_data: str | None = None          # captions TSV for the text-to-image term (default: ``data``'s pairs)

    def validate(self) -> "TrainConfig":
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {', '.join(OBJECTIVES)}")
        if self.t2i_data and (self.objective != "easygen" or not self.t2i_weight):
            problems.append("t2i_data needs the easygen objective with t2i_weight > 0")
        if self.objective == "unidiffuser" and self.t2i_weight:
            problems.append("t2i_weight belongs to the easygen objective (unidiffuser trains every direction)")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        if self.strategy not in ("ddp", "fsdp"):
            problems.append("strategy must be ddp or fsdp")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append("dtype must be float32 or bfloat16 (float16 would need loss scaling)")
        for name in ("epochs", "batch_size", "grad_accum", "save_every", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.steps is not None and self.steps < 1:
            problems.append("steps must be at least 1")
        if self.keep_last < 0:
            problems.append("keep_last must be >= 0 (0 keeps every checkpoint)")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            problems.append("snr_gamma must be > 0 (leave it unset for plain MSE)")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            problems.append("ema_decay must lie in [0, 1)")
        if self.t2i_uncond and not (0.0 < self.t2i_uncond < 1.0 and self.t2i_weight):
            problems.append("t2i_uncond must lie in [0, 1) and needs t2i_weight > 0")
        if self.lr <= 0 or not 0.0 <= self.warmup_ratio <= 1.0 or self.t2i_weight < 0:
            problems.append("lr must be > 0, warmup_ratio in [0, 1], t2i_weight >= 0")
        if problems:
            raise BiDiffuserError("bad training settings: " + "; ".join(problems))
        return self

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.out) / CHECKPOINTS


# ------------------------------------------------------------------------------------------ data
def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator behind every random draw for example ``index`` in ``epoch``."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def encode_batch(pipe, rows: list[tuple[str, str]], gens: list[torch.Generator]):
    """Frozen encoders: (z, clip_img, x0) for the rows, as ordinary (autograd-usable) tensors."""
    images = [load_image(path) for path, _ in rows]
    z, clip_img = pipe.encode_images(images, generator=gens)
    x0 = pipe.encode_prompts([caption for _, caption in rows])
    # The pipeline encodes under inference_mode; such tensors cannot be saved for backward.
    return z.clone(), clip_img.clone(), x0.clone()


class FrozenEncodings:
    """Every row's frozen encodings, computed once (unique images and captions once each): the VAE
    posterior's scaled mean and std, the CLIP image embedding and the text latent x0. ``batch``
    gives what ``encode_batch`` gives for the same rows and generators (the same posterior sampling)."""

    def __init__(self, pipe, rows: list[tuple[str, str]], chunk: int = 64):
        paths, captions = list(dict.fromkeys(p for p, _ in rows)), list(dict.fromkeys(c for _, c in rows))
        means, stds, clips, texts = [], [], [], []
        for i in range(0, len(paths), chunk):
            mean, std, clip = pipe.encode_image_posteriors([load_image(p) for p in paths[i:i + chunk]])
            means.append(mean), stds.append(std), clips.append(clip)
        for i in range(0, len(captions), chunk):
            texts.append(pipe.encode_prompts(captions[i:i + chunk]))
        self.mean, self.std, self.clip = torch.cat(means), torch.cat(stds), torch.cat(clips)
        self.x0 = torch.cat(texts)
        image_at, text_at = {p: i for i, p in enumerate(paths)}, {c: i for i, c in enumerate(captions)}
        self.image_index = torch.tensor([image_at[p] for p, _ in rows])
        self.text_index = torch.tensor([text_at[c] for _, c in rows])

    def batch(self, indices: list[int], gens: list[torch.Generator]):
        img, txt = self.image_index[indices], self.text_index[indices]
        return sample_posterior(self.mean[img], self.std[img], gens), self.clip[img].clone(), self.x0[txt].clone()


class _T2IRows:
    """The text-to-image rows from ``t2i_data``: micro-batch ``m`` of the run takes the next batch of
    that file's own seeded order (epochs of its own), so a resumed run draws the same rows."""

    def __init__(self, cfg: TrainConfig, pipe, env: DistEnv):
        self.rows, _ = read_caption_tsv(cfg.t2i_data, cfg.image_root, "skip" if cfg.skip_bad_rows else "raise",
                                        check_images=True)
        try:
            self.sampler = ResumableSampler(len(self.rows), cfg.batch_size, env, cfg.seed + 1)
        except BiDiffuserError as e:
            raise BiDiffuserError(f"{cfg.t2i_data}: {e}") from None
        self.pipe, self.seed = pipe, cfg.seed
        self.encodings = FrozenEncodings(pipe, self.rows) if cfg.encode_once else None

    def batch(self, micro_batch: int):
        epoch, at = divmod(micro_batch, self.sampler.batches_per_rank)
        indices = self.sampler.epoch(epoch)[at]
        # negative example indices: generators apart from the main rows' (which count from 0)
        gens = [sample_generator(self.seed, epoch, -1 - i) for i in indices]
        if self.encodings is not None:
            return (*self.encodings.batch(indices, gens), gens)
        return (*encode_batch(self.pipe, [self.rows[i] for i in indices], gens), gens)


# ------------------------------------------------------------------------------------------ loss
def snr_weights(schedule: NoiseSchedule, n: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-row Min-SNR-gamma weights min(SNR_n, gamma) / SNR_n (all ones without gamma)."""
    if gamma is None:
        return torch.ones(n.shape[0])
    abar = schedule.alpha_bar(n)
    snr = abar / (1.0 - abar)
    return (torch.clamp(snr, max=gamma) / snr).float()


def _noise_mse(out: torch.Tensor, eps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over rows of weight x (per-row MSE); with unit weights exactly ``F.mse_loss``."""
    per_row = (out.float() - eps).pow(2).flatten(1).mean(1)
    return (per_row * weights.to(per_row.device)).mean()


def easygen_loss(nnet, schedule: NoiseSchedule, z, clip_img, x0, gens: list[torch.Generator],
                 t2i_weight: float = 0.0, data_type: int = 1, snr_gamma: float | None = None,
                 t2i_rows: tuple | None = None, t2i_uncond: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """EasyGen's BiDiffuser loss (see the module docstring); returns (loss, its terms as floats).

    With a t2i term the two conditionings run as ONE batched forward (rows: i2t, then t2i). The
    t2i rows are the same pairs, or ``t2i_rows = (z, clip_img, x0, gens)`` of other pairs. With
    ``t2i_uncond`` = p, each t2i row's text is, with probability p, what the sampler's unconditional
    branch feeds (UniDiffuser's "true uncond": Gaussian noise at t = N), so classifier-free guidance
    has a trained branch to push away from. Rows draw their coin from their own generator.
    """
    B, dev = z.shape[0], z.device
    draw = lambda shape: torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)  # noqa: E731
    n = torch.cat([schedule.sample_timesteps(1, g) for g in gens])
    eps = draw(x0.shape[1:])
    zeros = torch.zeros(B, dtype=torch.long)
    img, clip, text = z, clip_img, schedule.add_noise(x0, eps, n)
    t_img, t_text = zeros, n
    if t2i_weight:
        z2, clip2, x02, gens2 = t2i_rows if t2i_rows is not None else (z, clip_img, x0, gens)
        draw2 = lambda shape: torch.stack([torch.randn(shape, generator=g) for g in gens2]).to(dev)  # noqa: E731
        n2 = torch.cat([schedule.sample_timesteps(1, g) for g in gens2])
        eps_img, eps_clip = draw2(z2.shape[1:]), draw2(clip2.shape[1:])
        img = torch.cat([z, schedule.add_noise(z2, eps_img, n2)])
        clip = torch.cat([clip_img, schedule.add_noise(clip2, eps_clip, n2)])
        t_text2 = torch.zeros(len(gens2), dtype=torch.long)
        if t2i_uncond:
            drop = torch.stack([torch.rand((), generator=g) < t2i_uncond for g in gens2])
            x02 = torch.where(drop[:, None, None].to(dev), draw2(x02.shape[1:]), x02)
            t_text2 = torch.where(drop, schedule.N, t_text2)
        text = torch.cat([text, x02])
        t_img, t_text = torch.cat([zeros, n2]), torch.cat([n, t_text2])
    img_out, clip_out, text_out = nnet(img, clip, text, t_img.to(dev), t_text.to(dev), data_type)
    terms = {"text": _noise_mse(text_out[:B], eps, snr_weights(schedule, n, snr_gamma)),
             "img": img_out[:B].float().pow(2).mean()}  # drives the (clean) image's output to zero
    loss = terms["text"] + terms["img"]
    if t2i_weight:
        w2 = snr_weights(schedule, n2, snr_gamma)
        terms["t2i"] = _noise_mse(img_out[B:], eps_img, w2) + _noise_mse(clip_out[B:], eps_clip, w2)
        loss = loss + t2i_weight * terms["t2i"]
    return loss, {k: v.item() for k, v in terms.items()}


def unidiffuser_loss(nnet, schedule: NoiseSchedule, z, clip_img, x0, gens: list[torch.Generator],
                     data_type: int = 1, snr_gamma: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """UniDiffuser's joint loss (see the module docstring); returns (loss, per-modality MSEs)."""
    dev = z.device
    draw = lambda shape: torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)  # noqa: E731
    n_img = torch.cat([schedule.sample_timesteps(1, g) for g in gens])
    n_text = torch.cat([schedule.sample_timesteps(1, g) for g in gens])
    eps_img, eps_clip, eps_text = draw(z.shape[1:]), draw(clip_img.shape[1:]), draw(x0.shape[1:])
    outs = nnet(schedule.add_noise(z, eps_img, n_img), schedule.add_noise(clip_img, eps_clip, n_img),
                schedule.add_noise(x0, eps_text, n_text), n_img.to(dev), n_text.to(dev), data_type)
    w_img, w_text = snr_weights(schedule, n_img, snr_gamma), snr_weights(schedule, n_text, snr_gamma)
    sq = [(out.float() - eps).pow(2).flatten(1) * w[:, None].to(dev)
          for out, eps, w in zip(outs, (eps_img, eps_clip, eps_text), (w_img, w_img, w_text))]
    loss = torch.cat(sq, dim=1).mean()
    return loss, {name: e.mean().item() for name, e in zip(("img", "clip", "text"), sq)}

# ------------------------------------------------------------------------------------------ model
class EMA:
    """Exponential moving average of the trainable U-ViT weights: ema <- d * ema + (1 - d) * w.
    Under FSDP the copies are DTensors sharded like the weights, and checkpoint that way."""

    def __init__(self, uvit: UViT, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in uvit.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"ema.{n}": t for n, t in self.shadow.items()}


def _wrap(uvit: UViT, cfg: TrainConfig, env: DistEnv):
    """(model to call, optimizer) for the strategy; the U-ViT itself stays reachable as ``uvit``."""
    model = uvit
    if env.distributed and cfg.strategy == "fsdp":
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if cfg.dtype == "bfloat16" else MixedPrecisionPolicy())
        for block in [*uvit.in_blocks, uvit.mid_block, *uvit.out_blocks]:
            fully_shard(block, mp_policy=mp)
        fully_shard(uvit, mp_policy=mp)
    elif env.distributed:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(uvit, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW([p for p in uvit.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    return model, optimizer


def _gradient_sync(model, uvit, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if hasattr(model, "no_sync"):  # DDP
        return nullcontext() if enabled else model.no_sync()
    if isinstance(uvit, FSDPModule):
        uvit.set_requires_gradient_sync(enabled)
    return nullcontext()


def gather_full(sd: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Collective: ``sd`` whole on the CPU in float32, gathered from FSDP shards one tensor at a time;
    only a rank with ``keep`` holds on to it (the others get {})."""
    from torch.distributed.tensor import DTensor
    full = {}
    for name, tensor in sd.items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()  # every rank takes part in the all-gather
        if keep:
            full[name] = tensor.detach().float().cpu()
    return full


def full_state_dict(uvit: UViT, ema: EMA | None, keep: bool) -> dict[str, torch.Tensor]:
    """Collective: the whole U-ViT state dict (EMA weights where kept), see ``gather_full``."""
    sd = dict(uvit.state_dict())
    if ema is not None:
        sd.update(ema.shadow)
    return gather_full(sd, keep)


def write_model_dir(source: BiDiffuserConfig, out: str | os.PathLike, uvit_sd: dict[str, torch.Tensor],
                    copy: bool = False) -> Path:
    """A new BiDiffuser directory: ``uvit.safetensors`` plus the unchanged components of ``source``
    (symlinked to their resolved paths, or copied). ``bidiffuser.json`` is removed first and written
    last (atomically), so the directory only reads as a model once it is complete. The folder is not
    swapped as a whole because the run's checkpoints usually live inside it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).unlink(missing_ok=True)
    save_safetensors(uvit_sd, out / UVIT_FILE)
    files = {"uvit": UVIT_FILE}
    for component in sorted(source.files):
        if component == "uvit":
            continue
        src = source.path(component).resolve()
        name = component + ("" if src.is_dir() else src.suffix)  # distinct names by construction
        place_component(src, out / name, copy)
        files[component] = name
    write_config(dataclasses.replace(source, root=out, files=files))
    return out


# ------------------------------------------------------------------------------------------ run
def _check_paths(cfg: TrainConfig) -> None:
    out, model = Path(cfg.out), Path(cfg.model)
    if out.resolve() == model.resolve():
        raise BiDiffuserError(f"--out {out} is the model directory being fine-tuned; write a new directory")
    if (out.is_dir() and any(out.iterdir()) and not (out / CONFIG_NAME).exists()
            and not cfg.run_path.is_dir()):
        raise BiDiffuserError(f"{out} exists and is neither a BiDiffuser directory nor a training run; "
                              f"not writing into it")


def _run_signature(cfg, rows: list[tuple[str, str]], total_steps: int, keys=_RUN_KEYS) -> dict:
    """The settings and data that define a run (``keys`` of ``cfg``): a resume must match them."""
    captions = hashlib.sha256("\n".join(c for _, c in rows).encode()).hexdigest()
    return {**{k: getattr(cfg, k) for k in keys}, "total_steps": total_steps,
            "num_examples": len(rows), "captions_sha256": captions}


def step_plan(cfg, n_rows: int, env: DistEnv) -> tuple[ResumableSampler, int, int]:
    """(the data order, optimizer steps per epoch, total steps) for ``cfg``'s batch size, grad
    accumulation, steps or epochs, on ``env``'s ranks."""
    try:
        sampler = ResumableSampler(n_rows, cfg.batch_size, env, cfg.seed)
    except BiDiffuserError as e:
        raise BiDiffuserError(f"{cfg.data}: {e}") from None
    steps_per_epoch = sampler.batches_per_rank // cfg.grad_accum
    if steps_per_epoch == 0:
        raise BiDiffuserError(f"{cfg.data}: {n_rows} examples make fewer than one optimizer step "
                              f"(batch size {cfg.batch_size} x {env.world_size} ranks x grad accum {cfg.grad_accum})")
    return sampler, steps_per_epoch, cfg.steps or steps_per_epoch * cfg.epochs


def lr_scheduler(optimizer, cfg, total_steps: int):
    """Linear warm-up over ``cfg.warmup_ratio`` of the steps, then cosine decay to 0 or constant."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if cfg.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def _check_resume(path: Path, saved: dict, now: dict) -> None:
    saved = {"objective": "easygen", "lr_schedule": "cosine", "t2i_uncond": 0.0, **saved}  # runs saved before these settings existed
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
    if changed:
        raise BiDiffuserError(f"{path} belongs to a run with other settings ({'; '.join(changed)}); "
                              f"use the same settings to resume, or a new --run-dir / --out")


class LossLog:
    """Running means of the loss terms between log records. ``add`` takes each micro-batch's terms;
    ``step`` counts an optimizer step and, every ``log_every`` steps (and at the last), averages over
    the ranks, shows the record on the bar and appends it to ``log.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path | None, samples_per_step: int, env: DistEnv):
        self.file = path.open("a") if path is not None else None
        self.samples_per_step, self.env = samples_per_step, env
        self.sums, self.t0, self.steps = {}, time.perf_counter(), 0

    def add(self, terms: dict[str, float], grad_accum: int) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value / grad_accum

    def step(self, step: int, epoch: int, lr: float, bar, write: bool, postfix: dict | None = None) -> None:
        """``postfix``: more bar fields, name -> function of the record."""
        self.steps += 1
        if not write:
            return
        names = sorted(self.sums)
        means = all_reduce_sum([self.sums[n] / self.steps for n in names], self.env.device)
        record = {"step": step, "epoch": epoch, **{n: v / self.env.world_size for n, v in zip(names, means)},
                  "lr": lr, "samples_per_s": self.steps * self.samples_per_step / (time.perf_counter() - self.t0)}
        self.sums, self.t0, self.steps = {}, time.perf_counter(), 0
        bar.set_postfix(loss=f"{record['loss']:.4f}", **{k: f(record) for k, f in (postfix or {}).items()})
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a fine-tuning run and write the new BiDiffuser directory; returns its path."""
    from .pipeline import BiDiffuser

    cfg.validate()
    _check_paths(cfg)
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    rows, skipped = read_caption_tsv(cfg.data, cfg.image_root, "skip" if cfg.skip_bad_rows else "raise",
                                     check_images=True)
    env = init_distributed(cfg.device)
    run = cfg.run_path
    if env.is_main:
        if skipped:
            print(f"{cfg.data}: skipped {skipped} malformed row(s)")
        run.mkdir(parents=True, exist_ok=True)
        with atomic_path(run / "train_config.json") as p:
            p.write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    source = read_config(cfg.model)
    amp = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    pipe = BiDiffuser(source, device=env.device, dtype=amp)  # frozen encoders, loaded on first use
    uvit = load_uvit(source.path("uvit"), source.uvit, env.device, torch.float32).train()
    # clip_img_out feeds no loss term in EasyGen's objective without the t2i term: frozen, it keeps
    # its weights (as it would with no gradient), and DDP does not wait for a gradient that never comes.
    uvit.clip_img_out.requires_grad_(cfg.t2i_weight > 0 or cfg.objective == "unidiffuser")
    for block in [*uvit.in_blocks, uvit.mid_block, *uvit.out_blocks]:
        block.use_checkpoint = cfg.activation_checkpointing

    sampler, steps_per_epoch, total_steps = step_plan(cfg, len(rows), env)
    model, optimizer = _wrap(uvit, cfg, env)
    ema = EMA(uvit, cfg.ema_decay) if cfg.ema_decay is not None else None
    scheduler = lr_scheduler(optimizer, cfg, total_steps)
    autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) \
        if amp == torch.bfloat16 and not isinstance(uvit, FSDPModule) else nullcontext  # FSDP2 casts itself
    signature = _run_signature(cfg, rows, total_steps)

    encodings = FrozenEncodings(pipe, rows) if cfg.encode_once else None
    t2i = _T2IRows(cfg, pipe, env) if cfg.t2i_data else None
    step = 0
    previous = complete_checkpoints(run)
    if previous:
        state = load_checkpoint(previous[-1], model, optimizer, env, ema.state() if ema else None,
                                check=lambda saved: _check_resume(previous[-1], saved.get("run", {}), signature))
        step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        if env.is_main:
            print(f"resumed from {previous[-1]} at step {step}")

    schedule = NoiseSchedule.stable_diffusion()
    samples_per_step = cfg.batch_size * cfg.grad_accum * env.world_size
    bar = tqdm(total=total_steps, initial=step, desc="bidiffuser train", disable=not env.is_main, dynamic_ncols=True)
    log = LossLog(run / "log.jsonl" if env.is_main else None, samples_per_step, env)
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        micro = sampler.epoch(epoch)[in_epoch * cfg.grad_accum:(in_epoch + 1) * cfg.grad_accum]
        for k, indices in enumerate(micro):
            gens = [sample_generator(cfg.seed, epoch, i) for i in indices]
            z, clip_img, x0 = (encodings.batch(indices, gens) if encodings is not None
                               else encode_batch(pipe, [rows[i] for i in indices], gens))
            with _gradient_sync(model, uvit, k == len(micro) - 1), autocast():
                if cfg.objective == "unidiffuser":
                    loss, terms = unidiffuser_loss(model, schedule, z, clip_img, x0, gens, source.data_type,
                                                   cfg.snr_gamma)
                else:
                    loss, terms = easygen_loss(model, schedule, z, clip_img, x0, gens, cfg.t2i_weight,
                                               source.data_type, cfg.snr_gamma,
                                               t2i.batch(step * cfg.grad_accum + k) if t2i else None,
                                               cfg.t2i_uncond)
            (loss / cfg.grad_accum).backward()
            log.add({"loss": loss.item(), **terms}, cfg.grad_accum)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in uvit.parameters() if p.requires_grad], cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        step += 1
        bar.update(1)
        log.step(step, epoch, scheduler.get_last_lr()[0], bar, step % cfg.log_every == 0 or step == total_steps,
                 {"lr": lambda r: f"{r['lr']:.2e}", "samples_s": lambda r: f"{r['samples_per_s']:.1f}"})
        if step % cfg.save_every == 0 or step == total_steps:
            save_checkpoint(run, step, model, optimizer, {"scheduler": scheduler.state_dict(), "run": signature},
                            env, keep_last=cfg.keep_last, extra_state=ema.state() if ema else None)
        if step == kill_at:  # fault injection for the resume test: die like a killed job
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    log.close()

    uvit_sd = full_state_dict(uvit, ema, keep=env.is_main)
    if env.is_main:
        write_model_dir(source, cfg.out, uvit_sd, copy=cfg.copy)
        print(f"wrote BiDiffuser directory {cfg.out} ({'EMA' if ema else 'raw'} U-ViT weights, step {step})")
    barrier()
    shutdown()
    return Path(cfg.out)
