"""The feature store and ``easygen features``: one rank, two torchrun ranks, resume, bad images."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bidiffuser.pipeline import BiDiffuser
from easygen.feature_store import FeatureStore
from easygen.features import StoredLatents, feature_settings
from easygen.cli.features import main

from .conftest import make_image

STEPS = 2
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- the store
def test_store_writes_shards_of_n_entries_and_indexes_them_at_open(tmp_path):
    entries = {f"k{i}": torch.full((3, 2), float(i)) for i in range(5)}
    with FeatureStore(tmp_path / "s", shard_size=2, writer="r0") as store:
        store.put(entries, metadata={"steps": "2"})
        assert len(store.shards) == 2 and torch.equal(store.get("k4"), entries["k4"])  # k4 still buffered
    reopened = FeatureStore(tmp_path / "s")
    assert len(reopened.shards) == 3 and set(reopened.keys()) == set(entries) and len(reopened) == 5
    assert all(re.fullmatch(r"latents-r0-[0-9a-f]{8}-0000[0-2]\.safetensors", p.name) for p in reopened.shards)
    assert torch.equal(reopened.get("k3"), entries["k3"]) and reopened.get("nope") is None
    assert reopened.metadata("k0") == {"steps": "2", "store_format": "easygen-feature-store-v1"}
    assert reopened.settings() == [{"steps": "2", "store_format": "easygen-feature-store-v1"}]


def test_concurrent_writers_share_a_store_and_an_error_keeps_finished_work(tmp_path):
    a, b = FeatureStore(tmp_path, writer="r0"), FeatureStore(tmp_path, writer="r0")  # even with one name
    a.put({"x": torch.zeros(2)})
    b.put({"y": torch.ones(2)})
    a.close(), b.close()
    with pytest.raises(RuntimeError), FeatureStore(tmp_path) as c:
        c.put({"z": torch.ones(1)}, metadata={"m": "1"})
        raise RuntimeError("killed mid-run")
    assert set(FeatureStore(tmp_path).keys()) == {"x", "y", "z"}
    assert a.refresh() == 2 and "y" in a  # shards written by others since open


# ------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A mixture of 5 distinct images (one listed twice) in a TSV and a LLaVA file."""
    root = tmp_path_factory.mktemp("features_data")
    (root / "img").mkdir()
    for i in range(5):
        make_image(root / "img" / f"{i}.png", size=(30 + i, 30), color=(50 * i, 90, 200 - 40 * i))
    (root / "caps.tsv").write_text("".join(f"{i}.png\tshape {i}\n" for i in range(5)))
    (root / "chat.json").write_text(json.dumps([{"image": "0.png", "conversations": [
        {"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "a shape"}]}]))
    (root / "mix.json").write_text(json.dumps({"datasets": [
        {"format": "tsv", "path": "caps.tsv", "image_root": "img"},
        {"format": "llava", "path": "chat.json", "image_root": "img"}]}))
    return root


def features(data, tiny_dir, store, *extra):
    return main(["--data", str(data / "mix.json"), "--model", str(tiny_dir), "--out", str(store),
                 "--steps", str(STEPS), "--batch-size", "2", "--shard-size", "2", "--quiet", *extra])


def counts(out: str) -> tuple[int, int]:
    m = re.search(r"(\d+) computed, (\d+) already present, [\d.]+ s, [\d.]+ images/s", out)
    return int(m[1]), int(m[2])


def latents(store: Path) -> dict[str, torch.Tensor]:
    s = FeatureStore(store)
    return {k: s.get(k) for k in s.keys()}


@pytest.fixture(scope="module")
def one_rank_store(data, tiny_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("one_rank") / "store"
    assert features(data, tiny_dir, store) == 0
    return store


def test_one_rank_computes_every_image_once(one_rank_store, data, tiny_dir, capsys):
    stored = latents(one_rank_store)
    assert len(stored) == 5 and len(FeatureStore(one_rank_store).shards) == 3  # 5 images in shards of 2
    # A stored entry equals an independent computation (seeded as in test_features).
    pipe = BiDiffuser.from_pretrained(tiny_dir)
    image = data / "img" / "3.png"
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"1234:{digest}".encode()).digest()[:8], "big"))
    expected = pipe.image_to_text_latents([image], steps=STEPS, scale=7.0, generator=[g])
    looked_up = StoredLatents(one_rank_store)  # the store's own settings: no BiDiffuser needed
    assert looked_up.settings == feature_settings(pipe.config.fingerprint(), STEPS, 7.0, 1234, torch.float32)
    torch.testing.assert_close(looked_up([image]), expected)
    # Rerun: everything is already there.
    capsys.readouterr()
    assert features(data, tiny_dir, one_rank_store) == 0
    assert counts(capsys.readouterr().out) == (0, 5)


def test_limit_then_resume_computes_only_the_rest(one_rank_store, data, tiny_dir, tmp_path, capsys):
    store = tmp_path / "store"
    assert features(data, tiny_dir, store, "--limit", "3") == 0
    assert counts(capsys.readouterr().out) == (3, 0)
    assert features(data, tiny_dir, store) == 0
    assert counts(capsys.readouterr().out) == (2, 3)
    assert latents(store).keys() == latents(one_rank_store).keys()


def test_a_bad_image_stops_the_run_keeping_finished_shards_or_is_skipped(data, tiny_dir, tmp_path, capsys):
    copy = shutil.copytree(data, tmp_path / "data")
    (copy / "img" / "4.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # sorted last: the last batch
    store = tmp_path / "store"
    assert features(copy, tiny_dir, store) == 2
    assert re.search(r"easygen: error: (not an image file|corrupt or truncated image).*4.png", capsys.readouterr().err)
    assert len(latents(store)) == 4  # the batches before it were kept
    assert features(copy, tiny_dir, store, "--skip-bad-rows") == 0
    out = capsys.readouterr()
    assert "0 computed, 4 already present, 1 unreadable skipped" in out.out and "4.png" in out.err


@pytest.mark.slow
def test_two_torchrun_ranks_build_the_same_store_as_one(one_rank_store, data, tiny_dir, tmp_path):
    store = tmp_path / "store"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", "-m", "easygen.cli.features",
           "--data", str(data / "mix.json"), "--model", str(tiny_dir), "--out", str(store), "--steps", str(STEPS),
           "--batch-size", "2", "--shard-size", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(re.findall(r"rank (\d)/2: (\d+) computed", result.stdout))
    assert [r for r, _ in lines] == ["0", "1"] and sum(int(n) for _, n in lines) == 5
    # Images go to ranks by a hash of their (tmp) path, so one rank may get none of the 5 (1 run in 16):
    # each rank that computed something wrote shards of its own, and only those ranks did.
    assert {p.name.split("-")[1] for p in FeatureStore(store).shards} == {f"r{r}" for r, n in lines if int(n)}

    one, two = latents(one_rank_store), latents(store)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=0)
