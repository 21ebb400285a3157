"""The stage-1 / stage-2 training loop (one file, read top to bottom).

Stage ``pretrain`` trains the projector only (every LLM weight frozen). Stage ``instruct`` trains
the LLM and projector, fully or with LoRA, wrapped by DDP, FSDP2 (``fully_shard`` per decoder layer,
then the root: each rank holds only its shard) or DeepSpeed ZeRO. Checkpoints are sharded DCP
directories (DeepSpeed: its own format), signed by rank 0 with this installation's key, and
resuming from one (signature verified first) continues the exact same run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from bidiffuser.checkpoint import atomic_path, read_json
from bidiffuser.distributed import (
    DistEnv,
    ResumableSampler,
    all_reduce_sum,
    barrier,
    init_distributed,
)
from bidiffuser.train_checkpoint import (complete_checkpoints, finish_checkpoint, load_checkpoint, open_checkpoint,
                                        restore_rng, save_checkpoint, save_rng)

from ..builder import load_pretrained
from ..constants import IGNORE_INDEX
from ..data.readers import caption_text_example
from ..errors import EasyGenError
from ..features import ImageFeatureExtractor
from .batches import Batcher, to_device
from .config import TrainConfig

CHECKPOINTS = "checkpoints"
# Tests set this to kill the process (SIGKILL, no clean-up) right after the given optimizer step.
_KILL_AT_STEP = int(os.environ.get("EASYGEN_TEST_KILL_AT_STEP", "0"))


def _use_bf16(cfg: TrainConfig, env: DistEnv) -> bool:
    if cfg.precision == "auto":
        return env.device.type == "cuda" and torch.cuda.is_bf16_supported()
    return cfg.precision == "bf16"


def build_model(cfg: TrainConfig, device="cpu"):
    """The model to train, its processor and BiDiffuser (for features missing from the store)."""
    loaded = load_pretrained(cfg.model, projector=cfg.projector, bidiffuser=cfg.bidiffuser, device=device,
                             new_projector_hidden=cfg.projector_hidden_size if cfg.stage == "pretrain" else None)
    model = loaded.model
    if cfg.stage == "pretrain":
        model.requires_grad_(False)
        model.projector.requires_grad_(True)
        model.lm_head.requires_grad_(cfg.train_lm_head)  # the original's stage 1 trains it too
    elif cfg.lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_targets,
                                                 modules_to_save=None))
        # ours tunes the projector with the adapter; the original's LoRA run keeps it frozen
        model.base_model.model.projector.requires_grad_(cfg.train_projector)
    else:
        model.requires_grad_(True)
        model.projector.requires_grad_(cfg.train_projector)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model.train(), loaded


def _wrap(model, cfg: TrainConfig, env: DistEnv, bf16: bool, total_steps: int):
    """(model to call, optimizer, lr scheduler, DeepSpeed engine or None) for the chosen strategy."""
    def schedule(optimizer):  # cosine with linear warm-up, stepped once per optimizer step
        return get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)

    def adamw(params):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    if cfg.strategy == "deepspeed":
        import deepspeed
        ds_config = read_json(cfg.deepspeed_config, "deepspeed_config")
        if "optimizer" in ds_config or "scheduler" in ds_config:
            raise EasyGenError(f"{cfg.deepspeed_config}: leave out 'optimizer' and 'scheduler'; the trainer "
                               f"gives DeepSpeed its AdamW (lr, weight_decay) and cosine schedule")
        ds_config.update(train_micro_batch_size_per_gpu=cfg.micro_batch_size,
                         gradient_accumulation_steps=cfg.grad_accum, gradient_clipping=cfg.max_grad_norm,
                         bf16={"enabled": bf16})
        # A torch AdamW (not DeepSpeed's fused one) needs no C++ extension build.
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=adamw([p for p in model.parameters() if p.requires_grad]),
            lr_scheduler=schedule, config=ds_config)
        return engine, optimizer, scheduler, engine
    if cfg.strategy == "fsdp" and env.distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    elif cfg.strategy == "ddp" and env.distributed:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad])
    return model, optimizer, schedule(optimizer), None


def _check_run_dir(cfg: TrainConfig, out: Path) -> None:
    """A run directory holds one run: resuming must keep the settings that fix data order and what
    is trained, and a fresh start (resume=false) must not mix its checkpoints with an old run's."""
    saved_path = out / "train_config.json"
    if not complete_checkpoints(out / CHECKPOINTS):
        return
    if not cfg.resume:
        raise EasyGenError(f"{out} already holds checkpoints of a run; use another output_dir, or resume=true")
    saved = read_json(saved_path, "the run's settings (needed to resume it)")
    changed = cfg.resume_mismatch(saved)
    if changed:
        raise EasyGenError(f"cannot resume {out} with different settings ({'; '.join(changed)}); "
                           f"use another output_dir for a new run")


def _check_feature_store(cfg: TrainConfig, features: ImageFeatureExtractor) -> None:
    """A store made with other BiDiffuser settings would never hit, silently rerunning BiDiffuser for
    every image inside training: say so instead."""
    if features.store is None:
        return
    present = features.store.settings()  # shard metadata: the settings plus the store's own keys
    if present and not any(all(m.get(k) == v for k, v in features.settings.items()) for m in present):
        s = present[0]
        raise EasyGenError(f"feature store {cfg.features} was made with steps={s.get('steps')} scale={s.get('scale')} "
                           f"seed={s.get('seed')} dtype={s.get('dtype')} (or another BiDiffuser checkpoint); set "
                           f"feature_steps/feature_scale/feature_seed to match, or use another store")


def _report_shard(model, env: DistEnv) -> None:
    """Each rank says how much of the model it holds (FSDP shards parameters; DDP replicates them)."""
    total = local = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    # one write per line: ranks share stdout, and print() writes the text and the newline separately
    sys.stdout.write(f"[rank {env.rank}] holds {local:,} of {total:,} parameters "
                     f"({100 * local / max(total, 1):.1f}%)\n")
    sys.stdout.flush()


def _eval_loss(model, batcher: Batcher, sampler: ResumableSampler | None, env: DistEnv, autocast) -> float | None:
    if sampler is None:
        return None
    was_training = model.training
    model.eval()
    total = count = 0.0
    with torch.no_grad(), autocast():
        for indices in sampler.epoch(0):
            batch = to_device(batcher(indices), env.device)
            n = batch.pop("num_tokens")
            total += model(**batch).loss.float().item() * n
            count += n
    model.train(was_training)
    total, count = all_reduce_sum([total, count], env.device)
    return total / max(count, 1.0)


def train(cfg: TrainConfig, examples: list[dict], eval_examples: list[dict] | None = None) -> Path:
    """Run (or resume) a training run; returns the last checkpoint directory."""
    env = init_distributed()
    torch.manual_seed(cfg.seed)  # same initial weights (new projector, LoRA) on every rank and every run
    out = Path(cfg.output_dir)
    _check_run_dir(cfg, out)
    barrier()
    if env.is_main:
        with atomic_path(out / "train_config.json") as p:
            p.write_text(cfg.to_json())
    bf16 = _use_bf16(cfg, env)

    if cfg.caption_text_features:
        extra = [caption_text_example(ex) for ex in examples if ex.get("caption") and len(ex["images"]) == 1]
        if env.is_main:
            print(f"caption_text_features: {len(extra)} caption examples also trained on features of their text")
        examples = examples + extra
    model, loaded = build_model(cfg, device=env.device)
    features = None
    if loaded.bidiffuser is not None:
        features = ImageFeatureExtractor(loaded.bidiffuser, steps=cfg.feature_steps, scale=cfg.feature_scale,
                                         seed=cfg.feature_seed, cache_dir=cfg.features)
        _check_feature_store(cfg, features)
    batcher = Batcher(examples, loaded.processor, cfg.max_length, features)
    lengths = [len(batcher.tokenize(i)[0]) for i in range(len(examples))] if cfg.group_by_length else None
    sampler = ResumableSampler(len(examples), cfg.micro_batch_size, env, cfg.seed, lengths=lengths)
    eval_sampler = None
    if eval_examples and len(eval_examples) >= cfg.micro_batch_size * env.world_size:
        eval_sampler = ResumableSampler(len(eval_examples), cfg.micro_batch_size, env, cfg.seed, shuffle=False)
    elif eval_examples and env.is_main:
        print(f"eval set too small ({len(eval_examples)} examples) for one micro-batch per rank: no eval loss")
    eval_batcher = Batcher(eval_examples or [], loaded.processor, cfg.max_length, features)

    steps_per_epoch = sampler.batches_per_rank // cfg.grad_accum
    if steps_per_epoch == 0:
        raise EasyGenError(f"{len(examples)} examples make fewer than one optimizer step (micro_batch_size "
                           f"{cfg.micro_batch_size} x {env.world_size} ranks x grad_accum {cfg.grad_accum})")
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    model, optimizer, scheduler, engine = _wrap(model, cfg, env, bf16, total_steps)
    _report_shard(model, env)
    autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if bf16 and engine is None else nullcontext

    step = 0
    ckpt_root = out / CHECKPOINTS
    previous = complete_checkpoints(ckpt_root) if cfg.resume else []
    if previous:
        if engine is not None:
            open_checkpoint(previous[-1], env)  # DeepSpeed's files are pickles: only a signed checkpoint
            _, client = engine.load_checkpoint(str(ckpt_root), tag=previous[-1].name)
            step = client["step"]
            restore_rng(previous[-1], env.rank)  # DeepSpeed keeps no RNG state; LoRA dropout needs it
        else:
            state = load_checkpoint(previous[-1], model, optimizer, env)
            step = state["step"]
            scheduler.load_state_dict(state["scheduler"])
        if env.is_main:
            print(f"resumed from {previous[-1]} at step {step}")

    with contextlib.ExitStack() as stack:  # the bar and the log close however the loop ends
        bar = stack.enter_context(tqdm(total=total_steps, initial=step, desc=f"{cfg.stage}",
                                       disable=not env.is_main, dynamic_ncols=True))
        log_file = stack.enter_context((out / "log.jsonl").open("a")) if env.is_main else None
        tokens_since, t0 = 0, time.perf_counter()
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            micro = sampler.epoch(epoch)[in_epoch * cfg.grad_accum:(in_epoch + 1) * cfg.grad_accum]
            losses = []
            batches = [to_device(batcher(indices), env.device) for indices in micro]
            # Weight each micro-batch by its labelled tokens, so the step's gradient is that of the
            # token mean over all its micro-batches (as one big batch would give), not a mean of means.
            labelled = [int((b["labels"] != IGNORE_INDEX).sum()) for b in batches]
            for k, batch in enumerate(batches):
                tokens_since += batch.pop("num_tokens")
                weight = labelled[k] / max(sum(labelled), 1)
                last = k == len(batches) - 1
                if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once per step
                    model.set_requires_gradient_sync(last)
                sync = model.no_sync() if not last and hasattr(model, "no_sync") and engine is None else nullcontext()
                with sync, autocast():
                    out = model(**batch)
                # a micro-batch without labelled tokens has a NaN mean: it still runs backward
                # (DDP/FSDP collectives need every rank), with zero gradient
                loss = out.loss if labelled[k] else out.logits.sum() * 0.0
                losses.append(loss.item() * weight)
                if engine is not None:
                    engine.backward(loss * weight * cfg.grad_accum)  # DeepSpeed divides by grad_accum itself
                    engine.step()
                else:
                    (loss * weight).backward()
            if engine is None:
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == total_steps:
                loss_sum, tokens = all_reduce_sum([sum(losses), tokens_since], env.device)
                elapsed = time.perf_counter() - t0
                record = {"step": step, "loss": loss_sum / env.world_size, "lr": scheduler.get_last_lr()[0],
                          "tokens_per_s": tokens / elapsed}
                tokens_since, t0 = 0, time.perf_counter()
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                if log_file:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
                ev = _eval_loss(model, eval_batcher, eval_sampler, env, autocast)
                if ev is not None and env.is_main:
                    bar.write(f"step {step}: eval loss {ev:.4f}")
                    log_file.write(json.dumps({"step": step, "eval_loss": ev}) + "\n")
                    log_file.flush()
            if step % cfg.save_every == 0 or step == total_steps:
                _save(ckpt_root, step, model, optimizer, scheduler, engine, env, cfg)
            if step == _KILL_AT_STEP:  # fault injection for the resume test: die like a killed job
                os.kill(os.getpid(), signal.SIGKILL)
    barrier()
    return complete_checkpoints(ckpt_root)[-1]


def _save(root: Path, step: int, model, optimizer, scheduler, engine, env: DistEnv, cfg: TrainConfig) -> None:
    if engine is None:
        state = {"stage": cfg.stage, "scheduler": scheduler.state_dict()}
        save_checkpoint(root, step, model, optimizer, state, env, keep_last=cfg.keep_last)
        return
    tag = f"step-{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step})
    save_rng(root / tag, env.rank)
    barrier()
    if env.is_main:  # signed, then the marker: a killed save is never taken for a complete one
        finish_checkpoint(root / tag, {"step": step, "world_size": env.world_size})
        for old in complete_checkpoints(root)[:-cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
