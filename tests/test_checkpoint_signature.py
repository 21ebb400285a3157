"""Signed training checkpoints: resume and export read only checkpoints signed with this installation's
key, and refuse before unpickling anything in one that is unsigned, changed or signed with another key.

Each refusal test plants a pickle that creates a file when unpickled, so a check that came too late
(or not at all) shows."""
import json
import multiprocessing
import os
import pickle
import socket
import stat
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from bidiffuser.checkpoint_signature import KEY_ENV, SIGNATURE_FILE, sign_checkpoint
from bidiffuser.distributed import DistEnv, barrier
from bidiffuser.errors import BiDiffuserError
from bidiffuser.train_checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
ONE = DistEnv(0, 1, 0, torch.device("cpu"))
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class _Planted:
    """Unpickling this creates ``path``: the sign that someone else's pickle ran."""
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plant(path: Path, marker: Path) -> None:
    """DCP's .metadata is a plain pickle; DeepSpeed's .pt files are torch.save archives."""
    if path.suffix == ".pt":
        torch.save(_Planted(marker), path)
    else:
        path.write_bytes(pickle.dumps(_Planted(marker)))


@pytest.fixture
def key(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "keys" / "checkpoint.key"))
    return tmp_path / "keys" / "checkpoint.key"


def _trainee(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _saved(root: Path, env=ONE):
    model, opt = _trainee()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()  # optimizer state to resume
    return save_checkpoint(root, 1, model, opt, {"note": "x"}, env), model


def test_signed_checkpoint_resumes_exactly_and_says_so(tmp_path, key, capsys):
    ckpt, trained = _saved(tmp_path / "ckpts")
    assert (ckpt / SIGNATURE_FILE).is_file() and complete_checkpoints(tmp_path / "ckpts") == [ckpt]
    assert key.stat().st_size == 32 and stat.S_IMODE(key.stat().st_mode) == 0o600  # made on first use
    model, opt = _trainee(seed=1)
    state = load_checkpoint(ckpt, model, opt, ONE)
    assert state["note"] == "x" and torch.equal(model.weight, trained.weight)
    assert opt.state_dict()["state"][0]["step"] == 1
    assert f"loading signed checkpoint from {ckpt}" in capsys.readouterr().out


def _refused(ckpt: Path, marker: Path) -> str:
    model, opt = _trainee()
    with pytest.raises(BiDiffuserError) as e:
        load_checkpoint(ckpt, model, opt, ONE)
    assert not marker.exists()  # refused before anything was unpickled
    message = str(e.value)
    assert len(message.splitlines()) == 1 and str(ckpt) in message
    assert f"only read checkpoints written with this installation's key (set {KEY_ENV}" in message
    return message


def test_changed_added_and_missing_files_are_refused(tmp_path, key):
    ckpt, _ = _saved(tmp_path / "ckpts")
    plant(ckpt / ".metadata", tmp_path / "ran")
    assert "changed: .metadata" in _refused(ckpt, tmp_path / "ran")
    (ckpt / "rng-rank0.safetensors").rename(ckpt / "extra.bin")
    assert "changed: .metadata; added: extra.bin; missing: rng-rank0.safetensors" in _refused(ckpt, tmp_path / "ran")


def test_unsigned_checkpoint_is_refused(tmp_path, key):
    ckpt, _ = _saved(tmp_path / "ckpts")
    (ckpt / SIGNATURE_FILE).unlink()
    plant(ckpt / ".metadata", tmp_path / "ran")
    assert f"not signed (no {SIGNATURE_FILE})" in _refused(ckpt, tmp_path / "ran")


def test_checkpoint_signed_with_another_key_is_refused(tmp_path, key, monkeypatch):
    ckpt, _ = _saved(tmp_path / "ckpts")
    plant(ckpt / ".metadata", tmp_path / "ran")
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "their.key"))
    sign_checkpoint(ckpt)  # someone else's installation signs what they wrote
    monkeypatch.setenv(KEY_ENV, str(key))
    assert f"not signed by this installation's checkpoint key ({key})" in _refused(ckpt, tmp_path / "ran")
    # sharing their key file would make it trusted: then the planted pickle runs
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "their.key"))
    with pytest.raises(CheckpointException):  # what dcp makes of a pickle that is no Metadata
        load_checkpoint(ckpt, *_trainee(), ONE)
    assert (tmp_path / "ran").exists()


def _export_run(tmp_path: Path, tiny_easygen_dir: Path, **cfg) -> Path:
    """A run directory as `easygen train` leaves it: its settings and one checkpoint."""
    from easygen.train.config import TrainConfig
    from easygen.train.loop import build_model
    run = tmp_path / "run"
    config = TrainConfig(model=str(tiny_easygen_dir), data="d", output_dir=str(run), **cfg)
    run.mkdir()
    (run / "train_config.json").write_text(config.to_json())
    if config.strategy != "deepspeed":
        model, _ = build_model(config)
        save_checkpoint(run / "checkpoints", 1, model, torch.optim.AdamW(model.parameters()), {}, ONE)
    return run


def test_export_reads_only_signed_checkpoints(tmp_path, tiny_easygen_dir, key, capsys):
    from easygen.cli import main
    run = _export_run(tmp_path, tiny_easygen_dir)
    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    assert main(["export", str(run), "--out", str(tmp_path / "model")]) == 0
    assert f"loading signed checkpoint from {ckpt}" in capsys.readouterr().out
    plant(ckpt / ".metadata", tmp_path / "ran")
    assert main(["export", str(run), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"refusing checkpoint {ckpt}: changed: .metadata. Resume and export only read" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "ran").exists()


def test_export_of_an_unsigned_deepspeed_checkpoint_is_refused(tmp_path, tiny_easygen_dir, key, capsys):
    from easygen.cli import main
    run = _export_run(tmp_path, tiny_easygen_dir, stage="instruct", strategy="deepspeed",
                      deepspeed_config=str(REPO / "scripts" / "zero2.json"))
    ckpt = run / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        plant(ckpt / name, tmp_path / "ran")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "world_size": 1}))
    assert main(["export", str(run), "--out", str(tmp_path / "model")]) == 2
    assert f"refusing checkpoint {ckpt}: not signed" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()


def _rank(rank: int, port: int, tmp: Path, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ[KEY_ENV] = str(tmp / f"key-rank{rank}")  # a rank that signed or verified would make its own
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        env = DistEnv(rank, 2, 0, torch.device("cpu"))
        ckpt, trained = _saved(tmp / "ckpts", env)
        model, opt = _trainee(seed=1)
        load_checkpoint(ckpt, model, opt, env)
        resumed = torch.equal(model.weight, trained.weight)
        barrier()
        if rank == 0:
            plant(ckpt / ".metadata", tmp / "ran")
        barrier()
        try:
            load_checkpoint(ckpt, *_trainee(), env)
            refusal = None
        except BiDiffuserError as e:  # rank 1 gets rank 0's verdict
            refusal = str(e)
        results.put((rank, resumed, refusal))
    except BaseException as e:  # the test fails now, not at its timeout
        results.put((rank, False, repr(e)))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_sign_once_on_rank_0_and_both_refuse(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")  # torch already imported: starts in well under a second
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, tmp_path, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = sorted(results.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.exitcode is None:
                p.kill()
    assert (tmp_path / "key-rank0").is_file() and not (tmp_path / "key-rank1").exists()
    signed = json.loads((complete_checkpoints(tmp_path / "ckpts")[-1] / SIGNATURE_FILE).read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp", "rng-rank0.safetensors", "rng-rank1.safetensors"} <= signed.keys()
    assert [(rank, resumed) for rank, resumed, _ in got] == [(0, True), (1, True)], got
    assert all("changed: .metadata" in refusal for _, _, refusal in got), got
    assert not (tmp_path / "ran").exists()


def test_bidiffuser_train_will_not_resume_a_changed_checkpoint(tiny_dir, captions, tmp_path, key):
    from bidiffuser.train import TrainConfig, train
    cfg = TrainConfig(model=str(tiny_dir), data=str(captions), out=str(tmp_path / "out"), steps=1, batch_size=2,
                      save_every=1, keep_last=1, seed=0)
    train(cfg)
    plant(complete_checkpoints(tmp_path / "out" / "checkpoints")[-1] / ".metadata", tmp_path / "ran")
    with pytest.raises(BiDiffuserError, match=r"changed: \.metadata\. Resume and export only read"):
        train(cfg)
    assert not (tmp_path / "ran").exists()
