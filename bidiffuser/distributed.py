"""torchrun plumbing shared by both trainers (BiDiffuser's and EasyGen's): process group set-up,
a resumable deterministic sampler, and small collective helpers. Plain ``python`` is one process."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import BiDiffuserError


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU); a single process needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistEnv(rank, world, local_rank, dev)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over ranks (returns them unchanged in a single process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ResumableSampler:
    """Which examples each rank sees, as a pure function of (seed, epoch, step).

    Every epoch is a seeded permutation, trimmed so all ranks get the same number of micro-batches;
    rank r takes every world_size-th micro-batch. Resuming at optimizer step s is just computing the
    same lists and skipping the first s * grad_accum micro-batches: no sampler state to save.
    """

    GROUP = 64  # micro-batches sorted together when grouping by length

    def __init__(self, num_examples: int, micro_batch_size: int, env: DistEnv, seed: int, shuffle: bool = True,
                 lengths: list[int] | None = None):
        """``lengths`` (one per example) groups examples of similar length into micro-batches, as
        LLaVA's and transformers' ``group_by_length`` do, so little of a batch is padding: each
        epoch's permutation is cut into spans of GROUP micro-batches, each span sorted by length,
        and the micro-batches are then shuffled (still a pure function of seed and epoch)."""
        self.n, self.mbs, self.env, self.seed, self.shuffle = num_examples, micro_batch_size, env, seed, shuffle
        self.lengths = lengths
        self.batches_per_rank = num_examples // (micro_batch_size * env.world_size)
        if self.batches_per_rank == 0:
            raise BiDiffuserError(f"{num_examples} examples are fewer than one micro-batch of {micro_batch_size} "
                             f"on each of {env.world_size} ranks")

    def epoch(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) for ``epoch``."""
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                 if self.shuffle else torch.arange(self.n)).tolist()
        step = self.mbs * self.env.world_size
        chunks = [order[i: i + step] for i in range(0, self.batches_per_rank * step, step)]
        if self.lengths is not None:
            span = step * self.GROUP
            kept = [i for c in chunks for i in c]
            grouped = [i for k in range(0, len(kept), span)
                       for i in sorted(kept[k:k + span], key=lambda i: (self.lengths[i], i))]
            chunks = [grouped[i: i + step] for i in range(0, len(grouped), step)]
            mix = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(self.seed + epoch + 1))
            chunks = [chunks[i] for i in mix.tolist()]
        r = self.env.rank * self.mbs
        return [c[r: r + self.mbs] for c in chunks]
