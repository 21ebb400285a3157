"""`bidiffuser train` on the tiny model: the captions reader, the loss going down, the written
directory loading and sampling, the EMA arithmetic, kill-and-resume equal to an uninterrupted run,
and 2-process torchrun runs (FSDP2, DDP) equal to one process with the same global batch."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from bidiffuser.captions import read_caption_tsv
from bidiffuser.errors import BiDiffuserError
from bidiffuser.model_dir import read_config
from bidiffuser.pipeline import BiDiffuser
from bidiffuser.train import TrainConfig, train
from bidiffuser.train_checkpoint import complete_checkpoints, load_weights_only
from bidiffuser.uvit import load_uvit

from .conftest import make_image

REPO = Path(__file__).resolve().parents[1]
# DCP says so on every single-process save and load (see train_checkpoint.py).
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def config(tiny_dir, captions, out, **kw) -> TrainConfig:
    settings = dict(steps=6, batch_size=2, lr=1e-3, ema_decay=0.9, log_every=1, save_every=2, seed=0)
    return TrainConfig(model=str(tiny_dir), data=str(captions), out=str(out), **{**settings, **kw})


def checkpoint_weights(ckpt: Path, tiny_dir: Path) -> tuple[dict, dict]:
    """(raw trainable weights, EMA weights) stored in a training checkpoint, read in one process."""
    uvit = load_uvit(tiny_dir / "uvit_v1.pth", read_config(tiny_dir).uvit)
    uvit.clip_img_out.requires_grad_(False)  # as the run had it (no t2i term)
    load_weights_only(ckpt, uvit)
    raw = {n: p.detach().clone() for n, p in uvit.named_parameters() if p.requires_grad}
    ema = {f"ema.{n}": torch.empty_like(t) for n, t in raw.items()}
    dcp.load({"extra": ema}, checkpoint_id=str(ckpt), no_dist=True)
    return raw, {k[len("ema."):]: v for k, v in ema.items()}


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_read_caption_tsv_resolves_paths_and_reports_bad_rows(tmp_path):
    tsv = tmp_path / "c.tsv"
    tsv.write_text("image_path\tcaption\na.png\t a cat \n\n/abs/b.jpg\ta dog\nno tab here\nc.png\t  \n")
    with pytest.raises(BiDiffuserError, match=rf"^{re.escape(str(tsv))}:5: expected 'image_path<TAB>caption', got 1 "):
        read_caption_tsv(tsv)
    rows, skipped = read_caption_tsv(tsv, on_error="skip")
    assert rows == [(str(tmp_path / "a.png"), "a cat"), ("/abs/b.jpg", "a dog")] and skipped == 2
    rows, _ = read_caption_tsv(tsv, image_root="/data", on_error="skip")
    assert rows[0][0] == "/data/a.png"
    missing = re.escape(f"{tsv}:2: image not found: {tmp_path / 'a.png'}")
    with pytest.raises(BiDiffuserError, match=rf"^{missing}$"):
        read_caption_tsv(tsv, check_images=True)
    with pytest.raises(BiDiffuserError, match="captions TSV not found"):
        read_caption_tsv(tmp_path / "missing.tsv")


def test_loss_decreases_ema_is_exact_and_new_directory_samples(tiny_dir, captions, tmp_path):
    out = tmp_path / "tuned"
    cfg = config(tiny_dir, captions, out, steps=24, batch_size=4, save_every=1, keep_last=2)
    assert train(cfg) == out

    records = log(out / "checkpoints")
    assert [r["step"] for r in records] == list(range(1, 25))
    first, last = records[0], sum(r["loss"] for r in records[-6:]) / 6
    assert last < 0.75 * first["loss"], records
    assert sum(r["text"] for r in records[-6:]) / 6 < 0.8 * first["text"]  # the text-noise term learns too
    assert records[-1]["img"] < 0.5 * first["img"]  # the image output is driven to zero

    # The directory holds the EMA: ema_24 = d * ema_23 + (1 - d) * w_24, from the last two checkpoints.
    (_, ema23), (raw24, ema24) = (checkpoint_weights(c, tiny_dir) for c in complete_checkpoints(out / "checkpoints"))
    written = load_file(out / "uvit.safetensors")
    source = torch.load(tiny_dir / "uvit_v1.pth", weights_only=True)
    for name, w in raw24.items():
        torch.testing.assert_close(ema24[name], 0.9 * ema23[name] + 0.1 * w, rtol=0, atol=1e-6)
        torch.testing.assert_close(written[name], ema24[name], rtol=0, atol=0)
    assert not torch.equal(written["text_out.weight"], source["text_out.weight"])
    assert torch.equal(written["clip_img_out.weight"], source["clip_img_out.weight"])  # in no loss term: frozen

    assert (out / "clip_text").is_symlink() and json.loads((out / "bidiffuser.json").read_text())["files"]["uvit"] \
        == "uvit.safetensors"
    pipe = BiDiffuser.from_pretrained(out)
    image = pipe.text_to_image("a red square on white", steps=2, seed=0).images[0]
    assert image.size == (32, 32)
    assert isinstance(pipe.image_to_text([image], steps=2, seed=0).texts[0], str)
    assert torch.equal(pipe.uvit.state_dict()["text_out.weight"], written["text_out.weight"])


def test_t2i_term_in_bfloat16_trains_the_clip_output_and_no_ema_writes_the_raw_weights(tiny_dir, captions, tmp_path):
    out = tmp_path / "t2i"
    train(config(tiny_dir, captions, out, steps=2, t2i_weight=1.0, ema_decay=None, grad_accum=2, dtype="bfloat16"))
    assert all("t2i" in r for r in log(out / "checkpoints"))
    written = load_file(out / "uvit.safetensors")
    source = torch.load(tiny_dir / "uvit_v1.pth", weights_only=True)
    assert not torch.equal(written["clip_img_out.weight"], source["clip_img_out.weight"])
    uvit = load_uvit(tiny_dir / "uvit_v1.pth", read_config(tiny_dir).uvit)
    load_weights_only(complete_checkpoints(out / "checkpoints")[-1], uvit)
    torch.testing.assert_close(uvit.state_dict(), written, rtol=0, atol=0)


def test_unidiffuser_loss_noises_both_modalities_at_independent_timesteps():
    from bidiffuser.sampler import NoiseSchedule
    from bidiffuser.train import sample_generator, unidiffuser_loss

    seen = {}

    def nnet(img, clip, text, t_img, t_text, data_type):  # records its inputs, predicts zeros
        seen.update(img=img, clip=clip, text=text, t_img=t_img, t_text=t_text)
        return torch.zeros_like(img), torch.zeros_like(clip), torch.zeros_like(text)

    schedule = NoiseSchedule.stable_diffusion()
    z, clip, x0 = torch.randn(8, 4, 4, 4), torch.randn(8, 1, 6), torch.randn(8, 5, 3)
    gens = [sample_generator(0, 0, i) for i in range(8)]
    loss, terms = unidiffuser_loss(nnet, schedule, z, clip, x0, gens)
    assert not torch.equal(seen["t_img"], seen["t_text"]) and seen["t_img"].min() >= 1
    # Replaying the generators gives the timesteps and noise the loss drew, in its order.
    gens = [sample_generator(0, 0, i) for i in range(8)]
    n_img = torch.cat([schedule.sample_timesteps(1, g) for g in gens])
    n_text = torch.cat([schedule.sample_timesteps(1, g) for g in gens])
    eps = [torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]) for x in (z, clip, x0)]
    assert torch.equal(seen["t_img"], n_img) and torch.equal(seen["t_text"], n_text)
    torch.testing.assert_close(seen["img"], schedule.add_noise(z, eps[0], n_img))
    torch.testing.assert_close(seen["clip"], schedule.add_noise(clip, eps[1], n_img))  # clip rides with the image
    torch.testing.assert_close(seen["text"], schedule.add_noise(x0, eps[2], n_text))
    # Zero prediction: the loss is the mean square of the concatenated noise (each element counts once).
    torch.testing.assert_close(loss, torch.cat([e.flatten(1) for e in eps], 1).pow(2).mean())
    assert set(terms) == {"img", "clip", "text"}


def test_snr_gamma_weights_each_row_by_min_snr_over_snr_of_its_own_timestep():
    from bidiffuser.sampler import NoiseSchedule
    from bidiffuser.train import easygen_loss, sample_generator, snr_weights, unidiffuser_loss

    schedule = NoiseSchedule.stable_diffusion()
    n = torch.tensor([1, 300, 1000])
    abar = schedule.alpha_bar(n)
    snr = abar / (1 - abar)
    w = snr_weights(schedule, n, 5.0)
    torch.testing.assert_close(w, (torch.clamp(snr, max=5.0) / snr).float())
    assert w[0] < 0.01 and w[2] == 1.0  # near-clean steps count little, the noisiest fully
    assert torch.equal(snr_weights(schedule, n, None), torch.ones(3))

    def nnet(img, clip, text, t_img, t_text, data_type):  # predicts zeros: each row's loss is its noise's
        return torch.zeros_like(img), torch.zeros_like(clip), torch.zeros_like(text)

    z, clip, x0 = torch.randn(8, 4, 4, 4), torch.randn(8, 1, 6), torch.randn(8, 5, 3)
    gens = lambda: [sample_generator(0, 0, i) for i in range(8)]  # noqa: E731
    for loss_fn, kwargs in [(unidiffuser_loss, {}), (easygen_loss, {"t2i_weight": 1.0})]:
        plain, _ = loss_fn(nnet, schedule, z, clip, x0, gens(), **kwargs)
        huge, _ = loss_fn(nnet, schedule, z, clip, x0, gens(), snr_gamma=1e12, **kwargs)
        weighted, _ = loss_fn(nnet, schedule, z, clip, x0, gens(), snr_gamma=5.0, **kwargs)
        torch.testing.assert_close(huge, plain)  # gamma above every SNR: plain MSE
        assert weighted < plain  # some rows drew a near-clean timestep (SNR > 5)
    # easygen: the text term's rows carry the weights of their own timesteps
    g = gens()
    n_text = torch.cat([schedule.sample_timesteps(1, x) for x in g])
    eps = torch.stack([torch.randn(x0.shape[1:], generator=x) for x in g])
    _, terms = easygen_loss(nnet, schedule, z, clip, x0, gens(), snr_gamma=5.0)
    expected = (eps.pow(2).flatten(1).mean(1) * snr_weights(schedule, n_text, 5.0)).mean()
    assert terms["text"] == pytest.approx(expected.item(), rel=1e-5)


def test_t2i_uncond_feeds_some_rows_the_samplers_unconditional_text():
    """With t2i_uncond = p, about p of the t2i rows get UniDiffuser's true-uncond text (noise at
    t = N), as the sampler's unconditional branch feeds it; the i2t rows and p = 0 are untouched."""
    from bidiffuser.sampler import NoiseSchedule
    from bidiffuser.train import easygen_loss, sample_generator

    seen = []

    def nnet(img, clip, text, t_img, t_text, data_type):
        seen.append((text.clone(), t_text.clone()))
        return torch.zeros_like(img), torch.zeros_like(clip), torch.zeros_like(text)

    schedule, B = NoiseSchedule.stable_diffusion(), 64
    z, clip, x0 = torch.randn(B, 4, 4, 4), torch.randn(B, 1, 6), torch.randn(B, 5, 3)
    gens = lambda: [sample_generator(0, 0, i) for i in range(B)]  # noqa: E731
    base, _ = easygen_loss(nnet, schedule, z, clip, x0, gens(), t2i_weight=1.0)
    same, _ = easygen_loss(nnet, schedule, z, clip, x0, gens(), t2i_weight=1.0, t2i_uncond=0.0)
    assert torch.equal(base, same) and torch.equal(seen[0][0], seen[1][0])  # p = 0: the run as before
    easygen_loss(nnet, schedule, z, clip, x0, gens(), t2i_weight=1.0, t2i_uncond=0.25)
    text, t_text = seen[-1]
    assert torch.equal(text[:B], seen[0][0][:B]) and torch.equal(t_text[:B], seen[0][1][:B])  # i2t rows as before
    dropped = t_text[B:] == schedule.N
    assert 5 <= dropped.sum() <= 30 and set(t_text[B:][~dropped].tolist()) == {0}
    assert torch.equal(text[B:][~dropped], x0[~dropped])  # kept rows: the clean caption
    assert not torch.isclose(text[B:][dropped], x0[dropped]).any()  # dropped rows: noise in its place


def test_runs_saved_before_the_objective_setting_still_resume(tmp_path):
    from bidiffuser.train import _check_resume
    now = {"objective": "easygen", "lr_schedule": "cosine", "snr_gamma": None, "seed": 1}
    _check_resume(tmp_path, {"seed": 1}, now)  # an old run: none of these saved; it was easygen, cosine, plain MSE
    with pytest.raises(BiDiffuserError, match="objective 'easygen' -> 'unidiffuser'"):
        _check_resume(tmp_path, {"seed": 1}, {**now, "objective": "unidiffuser"})


def test_unidiffuser_objective_trains_every_output(tiny_dir, captions, tmp_path):
    out = tmp_path / "joint"
    train(config(tiny_dir, captions, out, steps=16, batch_size=4, objective="unidiffuser", ema_decay=None))
    records = log(out / "checkpoints")
    assert {"img", "clip", "text"} <= set(records[0])
    assert sum(r["loss"] for r in records[-4:]) / 4 < sum(r["loss"] for r in records[:4]) / 4, records
    written = load_file(out / "uvit.safetensors")
    source = torch.load(tiny_dir / "uvit_v1.pth", weights_only=True)
    for name in ("clip_img_out.weight", "text_out.weight", "decoder_pred.weight"):
        assert not torch.equal(written[name], source[name]), name
    with pytest.raises(BiDiffuserError, match="t2i_weight belongs to the easygen objective"):
        train(config(tiny_dir, captions, tmp_path / "bad", objective="unidiffuser", t2i_weight=1.0))


def test_constant_lr_schedule_holds_the_peak_after_warm_up_and_snr_weighting_trains(tiny_dir, captions, tmp_path):
    out = tmp_path / "constant"
    train(config(tiny_dir, captions, out, steps=8, warmup_ratio=0.25, lr_schedule="constant", snr_gamma=5.0,
                 t2i_weight=1.0, ema_decay=None))
    lrs = [r["lr"] for r in log(out / "checkpoints")]
    assert lrs == pytest.approx([5e-4] + [1e-3] * 7)  # 2 warm-up steps, then the peak to the end (cosine: 0)
    written = load_file(out / "uvit.safetensors")
    source = torch.load(tiny_dir / "uvit_v1.pth", weights_only=True)
    assert not torch.equal(written["decoder_pred.weight"], source["decoder_pred.weight"])


def test_encode_once_gives_the_same_batches_and_the_same_run(tiny_dir, captions, tmp_path):
    """Encoding the data once (kept in memory) is a speed-up only: same encodings, same noise draws."""
    from bidiffuser.captions import read_caption_tsv
    from bidiffuser.pipeline import BiDiffuser
    from bidiffuser.train import FrozenEncodings, encode_batch, sample_generator

    rows, _ = read_caption_tsv(captions, None, "raise", check_images=True)
    pipe = BiDiffuser(read_config(tiny_dir), device=torch.device("cpu"))
    once = FrozenEncodings(pipe, rows, chunk=3)
    indices = [5, 0, 3]
    a = encode_batch(pipe, [rows[i] for i in indices], [sample_generator(0, 1, i) for i in indices])
    b = once.batch(indices, [sample_generator(0, 1, i) for i in indices])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    runs = {}
    for name, flag in (("otf", False), ("once", True)):
        train(config(tiny_dir, captions, tmp_path / name, t2i_weight=1.0, encode_once=flag))
        runs[name] = load_file(tmp_path / name / "uvit.safetensors")
    for key, value in runs["otf"].items():
        torch.testing.assert_close(runs["once"][key], value, rtol=1e-4, atol=1e-5)


def test_t2i_data_draws_the_text_to_image_rows_from_another_file(tiny_dir, captions, tmp_path):
    """The pictures the model learns to draw can come from their own captions file: the t2i rows then
    follow that file's order, and the run records it (resuming with another file is refused)."""
    drawings = tmp_path / "drawings.tsv"
    lines = captions.read_text().splitlines()
    drawings.write_text("\n".join([lines[0]] + [f"{captions.parent / row.split(chr(9))[0]}\tbig {row.split(chr(9))[1]}"
                                                for row in lines[1:5]]) + "\n")
    runs = {}
    for name, t2i_data in (("same", None), ("other", str(drawings))):
        train(config(tiny_dir, captions, tmp_path / name, t2i_weight=1.0, t2i_data=t2i_data, encode_once=True))
        runs[name] = load_file(tmp_path / name / "uvit.safetensors")
        assert [r["t2i"] > 0 for r in log(tmp_path / name / "checkpoints")] == [True] * 6
    assert not torch.equal(runs["same"]["decoder_pred.weight"], runs["other"]["decoder_pred.weight"])
    with pytest.raises(BiDiffuserError, match="t2i_data -> None|t2i_data '.*' -> None"):
        train(config(tiny_dir, captions, tmp_path / "other", t2i_weight=1.0, steps=8, encode_once=True))
    with pytest.raises(BiDiffuserError, match="t2i_data needs the easygen objective"):
        config(tiny_dir, captions, tmp_path / "x", t2i_data=str(drawings)).validate()


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "bidiffuser.cli", "train", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_kill_and_resume_equals_uninterrupted(tiny_dir, captions, tmp_path):
    whole = tmp_path / "whole"
    train(config(tiny_dir, captions, whole))

    resumed = tmp_path / "resumed"
    env = {**os.environ, "BIDIFFUSER_TEST_KILL_AT_STEP": "3", "OMP_NUM_THREADS": "1"}  # 1 thread, like conftest
    killed = _cli("--model", tiny_dir, "--data", captions, "--out", resumed, "--steps", 6, "--batch-size", 2,
                  "--lr", 1e-3, "--ema-decay", 0.9, "--log-every", 1, "--save-every", 2, "--seed", 0, env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [c.name for c in complete_checkpoints(resumed / "checkpoints")] == ["step-00000002"]
    assert not (resumed / "bidiffuser.json").exists()

    train(config(tiny_dir, captions, resumed))  # step 3 is redone from the step-2 checkpoint
    steps = [r["step"] for r in log(resumed / "checkpoints")]
    assert steps == [1, 2, 3, 3, 4, 5, 6]
    a, b = load_file(whole / "uvit.safetensors"), load_file(resumed / "uvit.safetensors")  # EMA weights
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    (raw_a, ema_a), (raw_b, ema_b) = (checkpoint_weights(complete_checkpoints(d / "checkpoints")[-1], tiny_dir)
                                      for d in (whole, resumed))
    torch.testing.assert_close(raw_a, raw_b, rtol=0, atol=1e-6)
    torch.testing.assert_close(ema_a, ema_b, rtol=0, atol=1e-6)
    assert log(whole / "checkpoints")[-1]["loss"] == pytest.approx(log(resumed / "checkpoints")[-1]["loss"], abs=1e-6)

    # Resuming with settings that define another run is refused, naming what changed.
    with pytest.raises(BiDiffuserError, match=r"lr 0.001 -> 0.002"):
        train(config(tiny_dir, captions, resumed, lr=2e-3))


@pytest.mark.parametrize("args,message", [
    (["--data", "missing.tsv"], "captions TSV not found: missing.tsv"),
    (["--data", "bad.tsv"], "bad.tsv:2: expected 'image_path<TAB>caption'"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--steps", "0"], "must be at least 1"),
    (["--snr-gamma", "0"], "snr_gamma must be > 0"),
    (["--lr-schedule", "linear"], "invalid choice: 'linear'"),
    (["--out", "MODEL"], "is the model directory being fine-tuned"),
])
def test_bad_train_input_is_one_line_and_exit_2(tiny_dir, captions, tmp_path, capsys, monkeypatch, args, message):
    from bidiffuser.cli import main
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "a.png")
    (tmp_path / "bad.tsv").write_text("a.png\tfine\njust one field\n")
    flags = {"--model": str(tiny_dir), "--data": str(captions), "--out": "new"}  # later flags win
    for flag, value in zip(args[::2], args[1::2]):
        flags[flag] = str(tiny_dir) if value == "MODEL" else value
    try:
        code = main(["train", "--steps", "1", *[x for kv in flags.items() for x in kv]])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    # one error line (argparse puts its usage lines before it), never a traceback
    assert message in err.strip().splitlines()[-1] and "error: " in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("strategy,extra", [
    ("fsdp", []),                                       # FSDP2 + activation checkpointing, frozen clip_img_out
    ("ddp", ["--t2i-weight", "0.5", "--grad-accum", "2"]),  # DDP with no_sync accumulation and the t2i term
])
def test_torchrun_two_processes_equal_one_process_with_the_global_batch(tiny_dir, captions, tmp_path, strategy, extra):
    """scripts/train_bidiffuser.sh with 2 gloo processes: every sample's noise comes from its own seeded
    generator, so 2 ranks x batch 2 reproduce 1 process x batch 4 (same examples per step)."""
    two = tmp_path / "two"
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "BATCH_SIZE": "2", "STEPS": "4", "LR": "1e-3",
           "STRATEGY": strategy, "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
    proc = subprocess.run(["bash", REPO / "scripts" / "train_bidiffuser.sh", tiny_dir, captions, two,
                           "--dtype", "float32", "--ema-decay", "0.9", "--seed", "0", "--log-every", "1", *extra],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = complete_checkpoints(two / "checkpoints")[-1]
    assert json.loads((last / "trainer_state.json").read_text())["world_size"] == 2
    assert len(list(last.glob("*.distcp"))) == 2  # one shard file per rank

    one = tmp_path / "one"
    kw = {"t2i_weight": 0.5, "grad_accum": 2} if extra else {}
    train(config(tiny_dir, captions, one, steps=4, batch_size=4, **kw))
    torch.testing.assert_close(load_file(two / "uvit.safetensors"), load_file(one / "uvit.safetensors"),
                               rtol=1e-5, atol=1e-6)
    for a, b in zip(log(two / "checkpoints"), log(one / "checkpoints"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert BiDiffuser.from_pretrained(two).text(steps=1, seed=0).texts
