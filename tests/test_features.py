import hashlib
import io
import shutil

import pytest
import torch
from PIL import Image

from bidiffuser.checkpoint import fingerprint_file
from bidiffuser.errors import BiDiffuserError
from bidiffuser.model_dir import read_config
from bidiffuser.pipeline import BiDiffuser
from easygen.feature_store import FeatureStore
from easygen.features import ImageFeatureExtractor

from .conftest import make_image

STEPS = 2


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return BiDiffuser.from_pretrained(tiny_dir)


@pytest.fixture
def images(tmp_path):
    return [make_image(tmp_path / "red.png"),
            make_image(tmp_path / "green.png", size=(50, 33), color=(20, 200, 40)),
            make_image(tmp_path / "blue.png", size=(31, 31), color=(30, 30, 220))]


def extractor(pipe, **kw):
    return ImageFeatureExtractor(pipe, **{"steps": STEPS, "seed": 0, **kw})


def test_shapes_dtype_and_cache_files(pipe, images, tmp_path):
    ex = extractor(pipe, cache_dir=tmp_path / "cache")
    pil = Image.open(images[1])
    feats = ex([images[0], pil])
    assert feats.shape == (2, 77, pipe.config.caption_decoder.n_embd) and feats.dtype == torch.float32
    assert ex.latents([images[0]]).shape == (1, 77, pipe.config.uvit.text_dim)

    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format="PNG")  # an in-memory image is keyed by its PNG bytes
    store = FeatureStore(tmp_path / "cache")  # a fresh index, read from the shards on disk
    for key in (ex.key(images[0].read_bytes()), ex.key(buf.getvalue())):
        assert store.get(key).shape == (77, pipe.config.uvit.text_dim)
        meta = store.metadata(key)
        assert meta["steps"] == str(STEPS) and meta["seed"] == "0" and meta["scale"] == "7.0"
        assert meta["bidiffuser"] == pipe.config.fingerprint()
    # Features feed trainable layers: they must not be inference-mode tensors.
    torch.nn.Linear(feats.shape[-1], 2)(feats).sum().backward()


def test_repeated_images_hit_the_cache_and_match_a_fresh_computation(pipe, images, tmp_path):
    red, green, _ = images
    ex = extractor(pipe, cache_dir=tmp_path / "cache")
    first = ex([red, green, red])
    assert (ex.misses, ex.hits) == (2, 1) and torch.equal(first[0], first[2])
    again = ex([green, red])
    assert (ex.misses, ex.hits) == (2, 3)
    assert torch.equal(again, first[[1, 0]])
    # Another extractor over the same directory reuses the files; no cache means a fresh pass.
    assert torch.equal(extractor(pipe, cache_dir=tmp_path / "cache")([red, green]), first[:2])
    fresh = extractor(pipe)
    assert torch.equal(fresh([red, green]), first[:2]) and fresh.misses == 2
    fresh([red])
    assert fresh.misses == 3  # without a cache directory nothing is kept between calls


def test_batch_composition_does_not_change_an_image_s_features(pipe, images):
    red, green, blue = images
    alone = extractor(pipe)([green])
    crowded = extractor(pipe, batch_size=3)([red, green, blue])
    torch.testing.assert_close(crowded[1:2], alone)  # equal up to float rounding of batched kernels
    assert not torch.allclose(crowded[0], crowded[1])


def test_settings_are_part_of_the_key_and_change_the_features(pipe, images, tmp_path):
    red = images[0]
    base = extractor(pipe, cache_dir=tmp_path)
    for other in (extractor(pipe, cache_dir=tmp_path, seed=1), extractor(pipe, cache_dir=tmp_path, steps=3)):
        assert other.key(red.read_bytes()) != base.key(red.read_bytes())
        assert not torch.allclose(other([red]), base([red]))
        assert other.misses == 1


def test_features_equal_an_independent_pipeline_computation(pipe, images):
    red, seed, scale = images[0], 5, 3.0
    image_sha = hashlib.sha256(red.read_bytes()).hexdigest()
    image_seed = int.from_bytes(hashlib.sha256(f"{seed}:{image_sha}".encode()).digest()[:8], "big")
    g = torch.Generator().manual_seed(image_seed)
    latents = pipe.image_to_text_latents([red], steps=STEPS, scale=scale, generator=[g])
    with torch.no_grad():
        expected = pipe.caption_decoder.decode_prefix(latents)
    assert torch.equal(extractor(pipe, seed=seed, scale=scale)([red]), expected)


def test_corrupt_shard_is_skipped_with_a_warning_and_its_images_recomputed(pipe, images, tmp_path, caplog):
    red, green = images[:2]
    ex = extractor(pipe, cache_dir=tmp_path)
    good = ex([red])
    ex([green])
    path, green_path = ex.store.shards  # one shard per call: red's, then green's
    assert ex.key(red.read_bytes()) in FeatureStore(tmp_path)
    original = path.read_bytes()
    # empty, garbage, truncated, and a valid shard of another image (red's key is not in it)
    for garbage in (b"", b"not a safetensors file", original[:-10], green_path.read_bytes()):
        path.write_bytes(original)
        caplog.clear()
        before = extractor(pipe, cache_dir=tmp_path)  # indexed red's shard while it was intact
        path.write_bytes(garbage)
        after = extractor(pipe, cache_dir=tmp_path)   # indexes the damaged shard
        for reader in (before, after):
            assert torch.equal(reader([red]), good) and reader.misses == 1
            reader([red])
            assert reader.misses == 1  # the recomputed latents (in a new shard) are served again
        # one warning when `before` reads the shard; one when `after` indexes it, unless it is valid
        warnings = caplog.text.count(f"skipping unreadable feature shard {path}")
        assert warnings == (1 if garbage == green_path.read_bytes() else 2)
        for shard in set(FeatureStore(tmp_path).shards) - {path, green_path}:
            shard.unlink()  # drop the recomputed copies: the next round meets the damage again


def test_bad_images_are_one_line_errors_naming_the_file(pipe, tmp_path):
    ex = extractor(pipe)
    with pytest.raises(BiDiffuserError, match="image not found: .*missing.png"):
        ex([tmp_path / "missing.png"])
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    with pytest.raises(BiDiffuserError, match="not an image file.*notes.png"):
        ex([notes])
    with pytest.raises(BiDiffuserError, match="not a file"):
        ex([tmp_path])


def test_fingerprint_follows_the_content_of_every_component(tiny_dir, tmp_path):
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    base = read_config(tiny_dir).fingerprint()
    assert read_config(copy).fingerprint() == base  # the location is not part of it
    cfg = read_config(copy)
    vae = cfg.path("autoencoder")
    data = bytearray(vae.read_bytes())
    data[len(data) // 2] ^= 1
    vae.write_bytes(bytes(data))
    changed = cfg.fingerprint()
    assert changed != base
    clip_config = cfg.path("clip_text") / "config.json"  # a file inside a directory component
    clip_config.write_text(clip_config.read_text() + " ")
    assert cfg.fingerprint() not in (base, changed)


def test_fingerprint_file_is_exact_for_small_files_and_samples_large_ones(tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc" * 1000)
    assert fingerprint_file(small) == hashlib.sha256(small.read_bytes()).hexdigest()

    big, size = tmp_path / "big.bin", 40 * 2**20
    with open(big, "wb") as f:
        f.truncate(size)
    fingerprints = {fingerprint_file(big)}
    middle_block = 8 * ((size - 2**16) // 15)  # the 9th of 16 evenly spaced 64 KiB blocks
    for offset in (0, size - 1, middle_block + 100):
        with open(big, "r+b") as f:
            f.seek(offset)
            f.write(b"\x01")
        fingerprints.add(fingerprint_file(big))
    with open(big, "ab") as f:  # any change of size
        f.write(b"\x00")
    fingerprints.add(fingerprint_file(big))
    assert len(fingerprints) == 5
