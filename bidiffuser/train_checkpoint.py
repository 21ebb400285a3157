"""Training checkpoints shared by both trainers: sharded ``torch.distributed.checkpoint`` (each rank
writes its own shard of the trainable weights and optimizer state), written atomically and pruned to
the last K, plus everything else an exact resume needs (step, scheduler, RNG of every rank).

Layout of ``OUT/checkpoints/step-00000040/``:
    .metadata, __*_*.distcp   model + optimizer shards (DCP)
    rng-rank{R}.safetensors    each rank's torch (and CUDA) generator state
    easygen-signature.json     rank 0's HMAC of every other file (see checkpoint_signature)
    trainer_state.json         step, epoch, scheduler, python RNG; written last = "complete"
A checkpoint is first written as ``.tmp-step-...`` and renamed when every rank has finished, so a
kill never leaves a directory that looks complete. Loading verifies the signature first: DCP's
``.metadata`` is a pickle, and resume must not run one that someone else wrote.
"""
from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_state_dict)

from .checkpoint import atomic_path, save_safetensors
from .checkpoint_signature import sign_checkpoint, verify_checkpoint
from .distributed import DistEnv, barrier
from .errors import BiDiffuserError

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# Frozen weights come from the model the run started from; saving them again would only cost disk.
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Setting such a state dict must not ask for the frozen weights it leaves out (strict=True would);
# a trainable weight missing from the checkpoint still fails, in dcp.load.
_SET_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


@contextlib.contextmanager
def _single_process_is_intended():
    """dcp warns "torch.distributed is disabled ... assuming ... a single process" on every
    one-process save and load; that is exactly what a one-process run (the demo build) means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_checkpoint(root: str | Path, step: int, model, optimizer, state: dict, env: DistEnv,
                    keep_last: int = 2, extra_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: every rank calls it. ``state`` (JSON-able) is stored by rank 0.

    ``extra_state`` holds further tensors to shard along (e.g. EMA weights, which are not
    trainable parameters and so are not in the model's state dict); DTensors stay sharded."""
    root = Path(root)
    tmp = root / f".tmp-step-{step:08d}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    to_save = {"model": model_sd, "optim": optim_sd}
    if extra_state:
        to_save["extra"] = dict(extra_state)
    with _single_process_is_intended():
        dcp.save(to_save, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    save_rng(tmp, env.rank)
    barrier()
    final = _step_dir(root, step)
    if env.is_main:
        finish_checkpoint(tmp, dict(state, step=step, world_size=env.world_size, python_rng=_python_rng()))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def finish_checkpoint(directory: Path, state: dict) -> None:
    """Rank 0, once every rank's files are in ``directory``: sign them together with the trainer
    state, then write that state (last: a kill in between leaves no complete checkpoint)."""
    data = json.dumps(state, indent=1).encode()
    sign_checkpoint(directory, pending={STATE_FILE: data})
    with atomic_path(directory / STATE_FILE) as p:
        p.write_bytes(data)


def open_checkpoint(path: str | Path, env: DistEnv | None = None) -> dict:
    """Collective when ``env`` is given: verify the checkpoint's signature before anything in it is
    read (rank 0 hashes the files; every rank gets its verdict), say so, return the trainer state."""
    path = Path(path)
    problem = None
    if env is None or env.is_main:
        try:
            verify_checkpoint(path)
        except BiDiffuserError as e:
            problem = str(e)
    if env is not None and dist.is_initialized():
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    if problem:
        raise BiDiffuserError(problem)
    if env is None or env.is_main:
        print(f"loading signed checkpoint from {path}")
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(path: str | Path, model, optimizer, env: DistEnv,
                    extra_state: dict[str, torch.Tensor] | None = None, check=None) -> dict:
    """Collective: restore weights, optimizer and this rank's RNG; returns the trainer state.

    ``extra_state``: the tensors given to ``save_checkpoint``, same names and shapes, filled in place.
    ``check(state)``: runs once the signature is verified, before any weight is read (e.g. to refuse
    a checkpoint of a run with other settings)."""
    path = Path(path)
    state = open_checkpoint(path, env)
    if check is not None:
        check(state)
    if state.get("world_size") != env.world_size:
        # DCP reshards weights fine, but the data order per rank would differ from the original run.
        raise BiDiffuserError(f"{path} was written by {state.get('world_size')} ranks; resume with the same number "
                         f"(this run has {env.world_size}) to continue the same data order")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    sd = {"model": model_sd, "optim": optim_sd}
    if extra_state:
        sd["extra"] = dict(extra_state)
    with _single_process_is_intended():
        dcp.load(sd, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    for name, tensor in (extra_state or {}).items():
        if sd["extra"][name] is not tensor:  # DCP may hand back a new tensor instead of filling ours
            tensor.copy_(sd["extra"][name])
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=_SET_OPTIONS)
    restore_rng(path, env.rank)
    random.setstate(_from_json_rng(state["python_rng"]))
    return state


def save_rng(directory: str | Path, rank: int) -> None:
    """This rank's torch (and CUDA) generator state, next to its checkpoint shard."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_safetensors(rng, Path(directory) / f"rng-rank{rank}.safetensors")


def restore_rng(directory: str | Path, rank: int) -> None:
    rng = load_file(str(Path(directory) / f"rng-rank{rank}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def load_weights_only(path: str | Path, model) -> None:
    """Read a checkpoint's trainable weights into an unsharded model in ONE process (for export)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    open_checkpoint(path)
    sd = get_model_state_dict(model, options=_OPTIONS)
    with _single_process_is_intended():
        dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True)
    set_model_state_dict(model, sd, options=_SET_OPTIONS)


def _python_rng():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _from_json_rng(value):
    version, internal, gauss = value
    return version, tuple(internal), gauss
