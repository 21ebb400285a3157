"""ELLA as a drawing backend: parity with ELLA's own inference code on tiny released-layout files,
strict connector keys, batches equal to their images drawn alone, and the interface's contract."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from drawing import DrawingError, load_backend
from drawing.ella import ELLA_FILE, load, load_connector
from drawing.tiny_layouts_ella import CONNECTOR, sha256_tree, write_tiny_ella

GOLDENS = Path(__file__).parent / "fixtures" / "drawing_goldens"
GOLDEN = json.loads((GOLDENS / "ella.json").read_text())
CASES = {c["name"]: c for c in GOLDEN["cases"]}
SHORT, LONG = CASES["fixed"]["prompts"]
# Observed: at most 6e-6 between ELLA's code (diffusers 0.27.2, transformers 4.39.3) and ours, in float32 on CPU.
ATOL = 5e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return write_tiny_ella(tmp_path_factory.mktemp("tiny_ella"))


@pytest.fixture(scope="module")
def backends(files):
    made = {}

    def get(length="fixed", fixed_negative=False, clip=False):
        key = (length, fixed_negative, clip)
        if key not in made:
            made[key] = load(files, device="cpu", length=length, fixed_negative=fixed_negative, clip=clip)
        return made[key]
    return get


def test_tiny_files_are_the_bytes_the_goldens_were_drawn_from(files):
    assert sha256_tree(files) == GOLDEN["files_sha256"]


def test_tokenizer_gives_the_reference_token_ids(backends):
    tokenizer = backends().tokenizer
    for text, ids in GOLDEN["token_ids"].items():
        assert tokenizer(text).input_ids == ids
    assert len(GOLDEN["token_ids"][LONG]) > 128  # the long prompt is cut in fixed mode, whole in flexible


def test_scheduler_is_the_reference_scheduler(backends):
    config = backends().scheduler_config
    for key, value in GOLDEN["scheduler"].items():
        assert config[key] == value or (key == "lambda_min_clipped" and config[key] == float(value)), key


@pytest.mark.parametrize("name", list(CASES))
def test_images_equal_the_reference_images(backends, name):
    case, s = CASES[name], GOLDEN["settings"]
    backend = backends(case["length"], case["fixed_negative"])
    got = backend.draw_tensor(case["prompts"], case["seeds"], steps=s["steps"], guidance=s["guidance"],
                              width=s["size"], height=s["size"])
    want = load_file(GOLDENS / "ella.safetensors")[name]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < ATOL


@pytest.mark.parametrize("length", ["fixed", "flexible"])
def test_a_batch_equals_its_images_drawn_alone(backends, length):
    backend = backends(length)
    together = backend.draw_tensor([SHORT, LONG], [7, 8], steps=3)
    alone = torch.cat([backend.draw_tensor([SHORT], [7], steps=3), backend.draw_tensor([LONG], [8], steps=3)])
    assert (together - alone).abs().max().item() < 1e-5
    assert (together[0] - together[1]).abs().max().item() > 1e-3  # and the two images differ


def _write_connector(path: Path, sd: dict) -> Path:
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("change, named", [
    ("rename", "connector.perceiver_blocks.0.ln_1.linear.weight"),
    ("drop", "connector.proj_in.bias"),
    ("reshape", "connector.latents"),
    ("extra", "connector.proj_out.0.weight"),
])
def test_connector_keys_are_strict(files, tmp_path, change, named):
    sd = load_file(files / ELLA_FILE)
    if change == "rename":
        sd["connector.perceiver_blocks.0.ln_1.lin.weight"] = sd.pop(named)
    elif change == "drop":
        del sd[named]
    elif change == "reshape":
        sd[named] = sd[named][:32].contiguous()
    else:
        sd[named] = torch.zeros(4, CONNECTOR["width"])
    bad = _write_connector(tmp_path / ELLA_FILE, sd)
    with pytest.raises(DrawingError) as e:
        load_connector(bad, width=CONNECTOR["width"], input_dim=CONNECTOR["input_dim"])
    message = str(e.value)
    assert named in message and str(bad) in message and "\n" not in message
    kind = {"rename": "missing keys", "drop": "missing keys", "reshape": "mis-shaped", "extra": "unexpected"}[change]
    assert kind in message


def test_a_connector_for_another_unet_is_refused_at_load(files, tmp_path):
    sd = load_file(files / ELLA_FILE)
    sd = {k: (v[..., :16].contiguous() if k == "connector.proj_in.weight" else v) for k, v in sd.items()}
    with pytest.raises(DrawingError, match="proj_in.weight"):
        load(files, device="cpu", ella=_write_connector(tmp_path / "other.safetensors", sd))


def test_draws_pil_images_with_progress_through_the_registry(files):
    backend = load_backend("ella", files, device="cpu")
    assert backend.name == "ella" and backend.max_batch >= 2
    d = backend.defaults
    assert (d.steps, d.guidance, d.width, d.height) == (50, 12.0, 64, 64)  # inference.py: 50 steps, 12; U-Net size
    seen = []
    images = backend.draw(["a cat", "a dog"], [1, None], steps=2, progress=lambda i, n: seen.append((i, n)))
    assert [im.size for im in images] == [(64, 64)] * 2 and images[0].mode == "RGB"
    assert seen == [(1, 2), (2, 2)]
    assert "ella (fixed length)" in backend.describe() and "float32" in backend.describe()


def test_ella_plus_clip_and_no_guidance(backends):
    with_clip = backends(clip=True)
    a = with_clip.draw_tensor([SHORT], [3], steps=2)
    b = backends().draw_tensor([SHORT], [3], steps=2)
    assert a.shape == b.shape and (a - b).abs().max().item() > 1e-4
    states = with_clip._condition(torch.zeros(1, 128, 48), with_clip._clip([SHORT]), torch.tensor(999))
    assert states.shape == (1, 77 + 64, CONNECTOR["width"])  # README: CLIP 77 + ELLA 64 tokens
    assert backends().draw_tensor([SHORT], [3], steps=2, guidance=1.0).shape == (1, 3, 64, 64)


def test_bad_input_is_one_clear_line(files, tmp_path, backends):
    with pytest.raises(DrawingError, match="flan-t5-xl"):
        load(tmp_path, device="cpu", ella=files / ELLA_FILE, sd=files / "stable-diffusion-v1-5")
    with pytest.raises(DrawingError, match="length"):
        load(files, device="cpu", length="long")
    with pytest.raises(DrawingError, match="dtype"):
        load(files, device="cpu", t5_dtype="float8")
    with pytest.raises(DrawingError, match="multiples of 8"):
        backends().draw(["a cat"], [0], width=60)
    with pytest.raises(DrawingError, match="seeds"):
        backends().draw(["a cat", "a dog"], [0])


def test_the_released_connector_has_the_released_shapes():
    """ELLA() of model.py at the real size: what ella-sd1.5-tsc-t5xl.safetensors holds."""
    from drawing.tiny_layouts_ella import connector_shapes
    shapes = connector_shapes(dict(time_channel=320, time_embed_dim=768, width=768, layers=6, heads=8,
                                   num_latents=64, input_dim=2048))
    assert shapes["connector.latents"] == (64, 768)
    assert shapes["connector.proj_in.weight"] == (768, 2048)
    assert shapes["time_embedding.linear_1.weight"] == (768, 320)
    assert shapes["connector.perceiver_blocks.5.attn.in_proj_weight"] == (3 * 768, 768)
    assert shapes["connector.perceiver_blocks.5.ln_ff.linear.weight"] == (2 * 768, 768)
    assert shapes["connector.perceiver_blocks.0.mlp.c_fc.weight"] == (4 * 768, 768)
    per_block = {k.split(".", 3)[3] for k in shapes if k.startswith("connector.perceiver_blocks.0.")}
    assert per_block == {f"{m}.{p}" for m in ("attn.out_proj", "mlp.c_fc", "mlp.c_proj", "ln_1.linear", "ln_2.linear",
                                              "ln_ff.linear") for p in ("weight", "bias")} | {
        "attn.in_proj_weight", "attn.in_proj_bias"}
    assert len(shapes) == 4 + 1 + 2 + 2 + 6 * len(per_block)  # time embedding, latents, time_aware_linear, proj_in


@pytest.mark.parametrize("part, file, key", [
    ("stable-diffusion-v1-5/unet", "diffusion_pytorch_model.safetensors", "conv_out.weight"),
    ("flan-t5-xl", "model-00002-of-00002.safetensors", "encoder.final_layer_norm.weight"),
])
def test_unet_and_t5_weights_are_strict_too(files, tmp_path, part, file, key):
    import shutil
    copy = tmp_path / "ella"
    shutil.copytree(files, copy)
    sd = load_file(copy / part / file)
    del sd[key]
    save_file(sd, str(copy / part / file), metadata={"format": "pt"})
    with pytest.raises(DrawingError, match=f"missing keys: {key}"):
        load(copy, device="cpu")
