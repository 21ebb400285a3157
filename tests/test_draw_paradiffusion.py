"""ParaDiffusion as a drawing backend, against the reference's own code.

The goldens (tests/fixtures/drawing_goldens/paradiffusion.json) were drawn by weijiawu/ParaDiffusion's
``demo.py`` get_pipe + ``StableDiffusionLlamaPipeline`` on diffusers 0.20.0 / transformers 4.30.1 /
peft 0.7.1 (scripts/reference_parity/paradiffusion.py) from the tiny released layout that
``drawing.tiny_layouts_paradiffusion`` writes; the test rebuilds the same bytes, loads them through our
loader and draws the same prompts. Observed max abs difference of the float pixels: 4.4e-06.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from drawing import DrawingError, load_backend
from drawing.paradiffusion_parts import PromptTokenizer
from drawing.tiny_layouts_paradiffusion import write_tiny_paradiffusion

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "fixtures" / "drawing_goldens" / "paradiffusion.json").read_text())
TOKENIZER_MODEL = ROOT / "tests" / "fixtures" / "llama_tokenizer" / "tokenizer.model"


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return write_tiny_paradiffusion(tmp_path_factory.mktemp("paradiffusion"), TOKENIZER_MODEL, seed=0)


@pytest.fixture(scope="module")
def backend(layout):
    return load_backend("paradiffusion", layout, device="cpu")


def settings(**over) -> dict:
    s = {k: GOLDEN[k] for k in ("steps", "guidance", "width", "height")}
    return {**s, **over}


def pixels(backend, prompts, seeds, **over) -> np.ndarray:
    return backend.draw_pixels(prompts, seeds, **settings(**over)).permute(0, 2, 3, 1).numpy()


def copy_part(layout: Path, tmp_path: Path, part: str) -> Path:
    """The layout with ``part`` copied (to be changed) and the other folders linked."""
    root = tmp_path / "layout"
    root.mkdir()
    for d in layout.iterdir():
        if d.name == part:
            shutil.copytree(d, root / d.name)
        else:
            (root / d.name).symlink_to(d, target_is_directory=True)
    return root


# ------------------------------------------------------------------ parity with the reference
def test_tiny_files_are_the_ones_the_goldens_were_drawn_from(layout):
    got = {str(p.relative_to(layout)): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(layout.rglob("*")) if p.is_file()}
    assert got == GOLDEN["files_sha256"]


def test_tokens_and_mask_are_the_references(backend):
    ids, mask = backend.tokenizer(GOLDEN["prompts"])
    assert ids.tolist() == GOLDEN["input_ids"] and mask.tolist() == GOLDEN["attention_mask"]
    assert GOLDEN["padding_side"] == backend.tokenizer.padding_side == "right"
    assert ids.shape == (2, 256) and mask[1].all()  # the long prompt is cut at 256 tokens, BOS included
    assert ids[0, -1] == 2 and ids[0, 0] == 1       # pad = EOS on the right


def test_images_equal_the_references(backend):
    ours = pixels(backend, GOLDEN["prompts"], GOLDEN["seeds"])
    ref = np.asarray(GOLDEN["images"], dtype=np.float32)
    assert ours.shape == ref.shape == (2, GOLDEN["height"], GOLDEN["width"], 3)
    assert np.abs(ours - ref).max() < 1e-4
    assert 0.05 < ref.std()  # the images are not flat, so the comparison means something
    images = backend.draw(GOLDEN["prompts"], GOLDEN["seeds"], **settings())
    assert [im.size for im in images] == [(GOLDEN["width"], GOLDEN["height"])] * 2
    rounded = np.stack([np.asarray(im) for im in images]).astype(int)
    assert np.abs(rounded - np.round(ref * 255)).max() <= 1


def test_a_batch_equals_each_image_drawn_alone(backend):
    both = pixels(backend, GOLDEN["prompts"], GOLDEN["seeds"])
    for i in range(2):
        alone = pixels(backend, GOLDEN["prompts"][i:i + 1], GOLDEN["seeds"][i:i + 1])
        assert np.abs(alone[0] - both[i]).max() < 1e-5


# ------------------------------------------------------------------ the interface
def test_defaults_progress_and_seeds(backend):
    assert (backend.defaults.steps, backend.defaults.guidance) == (100, 7.5)
    assert (backend.defaults.width, backend.defaults.height) == (1024, 640)
    calls = []
    a = pixels(backend, ["a cat"], [3], steps=3, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert np.array_equal(a, pixels(backend, ["a cat"], [3], steps=3))
    assert not np.allclose(a, pixels(backend, ["a cat"], [4], steps=3))
    assert "paradiffusion" in backend.describe() and "LoRA" in backend.describe()


def test_guidance_one_draws_without_the_unconditional_pass(backend):
    # guidance <= 1 is the reference's "no classifier-free guidance": the prompt's states alone
    a = pixels(backend, ["a cat"], [3], steps=2, guidance=1.0)
    b = pixels(backend, ["a cat"], [3], steps=2, guidance=7.5)
    assert a.shape == b.shape and not np.allclose(a, b)


def test_bad_requests_are_refused(backend):
    with pytest.raises(DrawingError, match="divisible by 8"):
        backend.draw(["a cat"], [0], width=36, height=24)
    with pytest.raises(DrawingError, match="one seed"):
        backend.draw(["a cat", "a dog"], [0])
    assert backend.draw([], []) == []


# ------------------------------------------------------------------ the released files, checked
@pytest.mark.parametrize("change, message", [
    ("extra", r"unexpected keys: base_model\.model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight"),
    ("missing", r"missing keys: base_model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight"),
    ("shape", r"mis-shaped keys: base_model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight"),
])
def test_a_lora_adapter_that_does_not_fit_is_refused_with_the_list(layout, tmp_path, change, message):
    root = copy_part(layout, tmp_path, "text_encoder_lora")
    f = root / "text_encoder_lora" / "adapter_model.safetensors"
    sd = load_file(str(f))
    if change == "extra":
        sd["base_model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
    elif change == "missing":
        del sd["base_model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    else:
        sd["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 32)
    save_file(sd, str(f))
    with pytest.raises(DrawingError, match=message):
        load_backend("paradiffusion", root, device="cpu")


def test_the_lora_is_applied_and_can_be_left_out(layout, backend):
    plain = load_backend("paradiffusion", layout, device="cpu", lora=False)
    assert "without LoRA" in plain.describe()
    with_lora, without = backend.encode(["a cat"]), plain.encode(["a cat"])
    assert with_lora.shape == without.shape == (1, 256, 32)
    assert not torch.allclose(with_lora, without)


def test_unet_weights_that_do_not_fit_are_refused(layout, tmp_path):
    root = copy_part(layout, tmp_path, "unet")
    f = root / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    del sd["conv_in.weight"]
    save_file(sd, str(f))
    with pytest.raises(DrawingError, match=r"missing keys: conv_in\.weight"):
        load_backend("paradiffusion", root, device="cpu")


def test_unet_must_read_the_llamas_width(layout, tmp_path):
    root = copy_part(layout, tmp_path, "unet")
    cfg = json.loads((root / "unet" / "config.json").read_text())
    (root / "unet" / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 64}))
    with pytest.raises(DrawingError, match="cross_attention_dim|mis-shaped"):
        load_backend("paradiffusion", root, device="cpu")


def test_a_missing_folder_or_tokenizer_json_is_named(layout, tmp_path):
    with pytest.raises(DrawingError, match="text_encoder folder not found: .*Llama-2-7b-hf"):
        load_backend("paradiffusion", tmp_path, device="cpu")
    with pytest.raises(DrawingError, match="vae folder not found: .*elsewhere"):
        load_backend("paradiffusion", layout, device="cpu", vae=tmp_path / "elsewhere")
    root = copy_part(layout, tmp_path, "Llama-2-7b-hf")
    (root / "Llama-2-7b-hf" / "tokenizer.json").unlink()
    with pytest.raises(DrawingError, match="tokenizer.json not found"):
        load_backend("paradiffusion", root, device="cpu")


def test_padding_side_follows_tokenizer_config_as_transformers_4_30_did(layout, tmp_path):
    """Without padding_side in tokenizer_config.json, 4.30's LlamaTokenizerFast padded on the left."""
    root = copy_part(layout, tmp_path, "Llama-2-7b-hf")
    cfg_file = root / "Llama-2-7b-hf" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["padding_side"]
    cfg_file.write_text(json.dumps(cfg))
    ids, mask = PromptTokenizer(root / "Llama-2-7b-hf")(["a cat"], max_length=8)
    assert mask.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]] and ids[0, :5].tolist() == [2] * 5 and ids[0, 5] == 1


def test_scheduler_reproduces_diffusers_0_20(backend):
    """Leading spacing (over steps + 1) with steps_offset 1, and the last step to alphas_cumprod[0] (not to sigma 0)."""
    sched = backend.scheduler
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [801, 601, 401, 201]  # diffusers 0.20 gives these
    assert sched.config.final_sigmas_type == "sigma_min" and sched.sigmas[-1] > 0
