"""The lavi-bridge drawing backend against LaVi-Bridge's own code (goldens written by
scripts/reference_parity/lavi_bridge.py in the reference environment), on tiny files in the released
layout, and its refusals of files that do not fit."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from drawing import DrawingError, load_backend
from drawing.lavi_lora import (LLAMA_TARGETS, T5_TARGETS, TRANSFORMER_TARGETS, UNET_TARGETS, apply_lora,
                               assign_positional, positional_list, read_positional, reference_order,
                               save_positional)
from drawing.tiny_layouts_lavi import write_tiny_lavi

GOLDENS = Path(__file__).parent / "fixtures" / "drawing_goldens"
GOLDEN = json.loads((GOLDENS / "lavi_bridge.json").read_text())
COMBOS = ("llama2_unet", "t5_unet", "t5_transformer")
# float32 on CPU, batched here and one by one in the reference: observed max abs difference ~1e-6
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = write_tiny_lavi(tmp_path_factory.mktemp("lavi"))
    for rel, sha in GOLDEN["files"].items():
        got = hashlib.sha256((root / rel).read_bytes()).hexdigest()
        assert got == sha, f"{rel} differs from the files the goldens were made from (rebuild both)"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(GOLDEN["files"])
    return root


@pytest.fixture(scope="module")
def backends(tiny):
    return {}


def backend(backends, tiny, combo):
    if combo not in backends:
        backends[combo] = load_backend("lavi-bridge", tiny / combo)
    return backends[combo]


def tree(tiny, which):
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
    from transformers import LlamaForCausalLM, T5EncoderModel
    if which == "unet":
        return UNet2DConditionModel.from_pretrained(tiny / "stable-diffusion-v1-4" / "unet"), UNET_TARGETS
    if which == "pixart":
        return PixArtTransformer2DModel.from_pretrained(tiny / "PixArt-XL-2-512x512" / "transformer"), TRANSFORMER_TARGETS
    if which == "llama":
        return LlamaForCausalLM.from_pretrained(tiny / "Llama-2-7b-hf"), LLAMA_TARGETS
    return T5EncoderModel.from_pretrained(tiny / "t5-large"), T5_TARGETS


@pytest.mark.parametrize("which", ["unet", "pixart", "llama", "t5"])
def test_sentinel_lands_where_the_reference_puts_it(tiny, which):
    """Pair k (up = 2k, down = 2k + 1, rank 1 + k % 5) lands on the module the reference's own
    monkeypatch_or_replace_lora_extended gave it, on today's diffusers/transformers module trees."""
    model, targets = tree(tiny, which)
    sites = reference_order(model, targets)
    assert [s.name for s in sites] == GOLDEN["sentinel"][which]
    tensors = []
    for k, site in enumerate(sites):
        up, down = site.expected_shapes(1 + k % 5)
        tensors += [torch.full(up, 2.0 * k), torch.full(down, 2.0 * k + 1)]
    apply_lora(model, assign_positional(tensors, sites, "sentinel"))
    modules = dict(model.named_modules())
    for k, name in enumerate(GOLDEN["sentinel"][which]):
        layer = modules[name]
        assert layer.lora_B["default"].weight.unique().tolist() == [2.0 * k]
        assert layer.lora_A["default"].weight.unique().tolist() == [2.0 * k + 1]
        assert layer.lora_A["default"].weight.shape[0] == 1 + k % 5
        assert layer.scaling["default"] == 1.0
    assert positional_list(model, sites, torch.float32)[5].unique().tolist() == [5.0]


@pytest.mark.parametrize("combo", COMBOS)
def test_draws_what_the_reference_draws(tiny, backends, combo):
    b = backend(backends, tiny, combo)
    steps = []
    images = b.sample(GOLDEN["prompts"], GOLDEN["seeds"], steps=GOLDEN["steps"], guidance=GOLDEN["guidance"],
                      width=GOLDEN["width"], height=GOLDEN["height"], progress=lambda i, n: steps.append((i, n)))
    assert steps == [(i + 1, GOLDEN["steps"]) for i in range(GOLDEN["steps"])]
    gold = load_file(str(GOLDENS / "lavi_bridge.safetensors"))
    for i in range(len(GOLDEN["prompts"])):
        want = gold[f"{combo}/{i}"]
        got = images[i].permute(1, 2, 0)
        assert got.shape == want.shape
        diff = (got - want).abs().max().item()
        assert diff < ATOL, f"{combo} image {i}: max abs difference {diff}"
        assert want.std() > 0.05  # a real picture, not a flat one that any code would match


@pytest.mark.parametrize("combo", COMBOS)
def test_fifty_steps_as_the_scripts(tiny, backends, combo):
    b = backend(backends, tiny, combo)
    image = b.sample(GOLDEN["prompts"][:1], GOLDEN["seeds"][:1], width=GOLDEN["width"], height=GOLDEN["height"])
    want = load_file(str(GOLDENS / "lavi_bridge.safetensors"))[f"{combo}/50steps"]
    diff = (image[0].permute(1, 2, 0) - want).abs().max().item()
    assert diff < ATOL, f"{combo} at 50 steps: max abs difference {diff}"
    # diffusers 0.24's UniPC ended on the first training sigma; unpinned, today's ends on zero (~1e-3 off here)
    assert b.scheduler_config["final_sigmas_type"] == "sigma_min"


def test_pil_images_and_one_by_one_equal_batched(tiny, backends):
    b = backend(backends, tiny, "t5_unet")
    kw = dict(steps=2, width=64, height=64)
    both = b.draw(["a red circle", "city"], [3, 4], **kw)
    alone = b.draw(["city"], [4], **kw)
    assert both[0].size == (64, 64) and both[0].mode == "RGB"
    assert np.abs(np.asarray(both[1], int) - np.asarray(alone[0], int)).max() <= 1
    assert b.defaults.steps == 50 and b.defaults.guidance == 7.5 and (b.defaults.width, b.defaults.height) == (512, 512)
    assert "t5_unet" in b.describe()
    assert b.to("cpu") is b and b.text.model.device.type == "cpu"
    assert np.array_equal(np.asarray(b.draw(["city"], [4], **kw)[0]), np.asarray(alone[0]))


def test_llama_pads_with_the_id_the_reference_resolves(tiny, backends):
    b = backend(backends, tiny, "llama2_unet")
    assert b.text.pad_id == GOLDEN["pad_token_ids"]["llama2_unet"] == 0
    ids = b.text.ids("a red circle", 77)
    assert len(ids) == 77 and ids[0] == 1 and ids[-1] == 0
    assert len(b.text.ids("word " * 200, 77)) == 77


def test_sizes_must_fit_the_latent_grid(tiny, backends):
    with pytest.raises(DrawingError, match="multiples of 16"):
        backend(backends, tiny, "t5_transformer").draw(["x"], [0], steps=1, width=72, height=64)


# ------------------------------------------------------------------------------------- refusals
@pytest.fixture()
def copy(tiny, tmp_path):
    import shutil
    for name in ("stable-diffusion-v1-4", "t5-large"):
        (tmp_path / name).symlink_to(tiny / name)
    shutil.copytree(tiny / "t5_unet", tmp_path / "t5_unet")
    return tmp_path / "t5_unet"


def test_count_mismatch_is_refused(copy):
    tensors = read_positional(copy / "lora_vis.pt", "lora_vis")
    save_positional(tensors[:-2], copy / "lora_vis.pt")
    with pytest.raises(DrawingError, match=r"lora_vis.pt: 128 tensors, but the model has 65 LoRA'd modules"):
        load_backend("lavi-bridge", copy)


def test_shape_and_ndim_mismatch_name_position_and_module(copy):
    tensors = read_positional(copy / "lora_vis.pt", "lora_vis")
    bad = list(tensors)
    bad[1] = bad[1][:, :16]  # down of module 0 (attn1.to_q, Linear 32->32)
    save_positional(bad, copy / "lora_vis.pt")
    with pytest.raises(DrawingError, match=r"tensors 0/1 \(module 0, down_blocks\.0\.attentions\.0\.transformer_blocks"
                                           r"\.0\.attn1\.to_q \(Linear 32->32\)\).*down \(32, 16\).*down \(32, 32\)"):
        load_backend("lavi-bridge", copy)
    bad = list(tensors)
    bad[18] = bad[18][:, :, 0, 0]  # up of module 9, a 3x3 conv, given as a linear's
    save_positional(bad, copy / "lora_vis.pt")
    with pytest.raises(DrawingError, match=r"tensor 18 \(module 9, down_blocks\.0\.resnets\.0\.conv1 \(Conv2d 32->32 "
                                           r"3x3\)\) has shape \(32, 32\); a conv LoRA needs 4-d tensors"):
        load_backend("lavi-bridge", copy)


def test_not_a_list_and_missing_files_are_refused(copy, tmp_path):
    torch.save({"a": torch.zeros(1)}, copy / "lora_text.pt")
    with pytest.raises(DrawingError, match="is not a list of tensors"):
        load_backend("lavi-bridge", copy)
    (copy / "lora_text.pt").unlink()
    with pytest.raises(DrawingError, match="lora_text"):
        load_backend("lavi-bridge", copy)
    with pytest.raises(DrawingError, match="not one of the released combos"):
        load_backend("lavi-bridge", tmp_path / "t5-large")
    with pytest.raises(DrawingError, match="no text model given"):
        load_backend("lavi-bridge", copy, combo="llama2_unet")


def test_adapter_that_does_not_fit_is_refused(copy):
    cfg = json.loads((copy / "adapter" / "config.json").read_text())
    cfg["int_dim"] = 24
    (copy / "adapter" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DrawingError, match="mis-shaped keys"):
        load_backend("lavi-bridge", copy)


def test_released_list_round_trips(tiny):
    """What a trainer writes back (positional_list) is the file it read, tensor for tensor."""
    model, targets = tree(tiny, "t5")
    tensors = read_positional(tiny / "t5_unet" / "lora_text.pt", "lora_text")
    sites = reference_order(model, targets)
    apply_lora(model, assign_positional(tensors, sites, "lora_text"))
    back = positional_list(model, sites)
    assert len(back) == len(tensors) == 2 * 8
    assert all(torch.equal(a, b) for a, b in zip(back, tensors))


# ----------------------------------------------------------------------------- real-size trees
REAL = {  # the bases' own configs (the fields that shape the module trees), as in the parity driver
    "unet": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64),
    "pixart": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   patch_size=2, sample_size=64, caption_channels=4096, cross_attention_dim=1152,
                   norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000),
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000),
    "t5": dict(d_model=1024, d_kv=64, num_heads=16, d_ff=4096, num_layers=24, vocab_size=32128),
}


@pytest.mark.parametrize("which,count,first", [
    ("unet", 224, ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (320, 32), (32, 320))),
    ("pixart", 224, ("transformer_blocks.0.attn1.to_q", (1152, 32), (32, 1152))),
    ("llama", 128, ("model.layers.0.self_attn.q_proj", (4096, 32), (32, 4096))),
    ("t5", 96, ("encoder.block.0.layer.0.SelfAttention.q", (1024, 32), (32, 1024))),
])
def test_real_size_trees_take_the_released_counts(which, count, first):
    """Today's classes at the bases' real sizes (built on the meta device) have exactly as many LoRA
    sites as the released lists have pairs (SD1.4 224, PixArt-XL-2 224, Llama-2-7b 128, t5-large 96),
    in the order the reference's monkeypatch gives pairs out on its own diffusers/transformers."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5EncoderModel
    with torch.device("meta"):
        model, targets = {
            "unet": lambda: (UNet2DConditionModel(**REAL["unet"]), UNET_TARGETS),
            "pixart": lambda: (PixArtTransformer2DModel(**REAL["pixart"]), TRANSFORMER_TARGETS),
            "llama": lambda: (LlamaForCausalLM(LlamaConfig(**REAL["llama"])), LLAMA_TARGETS),
            "t5": lambda: (T5EncoderModel(T5Config(**REAL["t5"])), T5_TARGETS),
        }[which]()
    sites = reference_order(model, targets)
    assert len(sites) == count
    assert (sites[0].name, *sites[0].expected_shapes(32)) == first
    assert len({s.name for s in sites}) == count  # no module met twice
    assert [s.name for s in sites] == GOLDEN["sentinel_real_size"][which]


def test_tokens_are_the_scripts_tokens(tiny, backends):
    """Runs of spaces, tabs, a trailing space, special tokens written as text: the ids (and PixArt's
    120-token mask) the scripts' LlamaTokenizer / AutoTokenizer give on transformers 4.38."""
    llama = backend(backends, tiny, "llama2_unet").text
    t5 = backend(backends, tiny, "t5_unet").text
    probes, want = GOLDEN["probes"], GOLDEN["token_ids"]
    assert [llama.ids(p, 77) for p in probes] == want["llama_77"]
    assert t5.tokenize(probes, 77)[0].tolist() == want["t5_77"]
    assert t5.tokenize(probes, 120)[1].tolist() == want["t5_120_mask"]


def test_base_with_a_key_it_does_not_use_is_refused(tiny, tmp_path):
    import shutil
    from safetensors.torch import save_file
    base = tmp_path / "stable-diffusion-v1-4"
    shutil.copytree(tiny / "stable-diffusion-v1-4", base)
    (tmp_path / "t5-large").symlink_to(tiny / "t5-large")
    (tmp_path / "t5_unet").symlink_to(tiny / "t5_unet")
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd["mid_block.extra.weight"] = torch.zeros(2)
    save_file(sd, str(weights))
    with pytest.raises(DrawingError, match=r"unet of stable-diffusion-v1-4 .* does not fit its config: "
                                           r"unexpected_keys: \['mid_block.extra.weight'\]"):
        load_backend("lavi-bridge", tmp_path / "t5_unet")


def test_dtype_option_sets_every_part_but_the_adapter(tiny):
    b = load_backend("lavi-bridge", tiny / "t5_unet", dtype="bfloat16")
    assert {p.dtype for p in b.vis.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in b.text.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in b.adapter.parameters()} == {torch.float32}  # the scripts run it in float32
    image = b.draw(["a red circle"], [0], steps=1, width=64, height=64)[0]
    assert image.size == (64, 64)
    with pytest.raises(DrawingError, match="unknown dtype"):
        load_backend("lavi-bridge", tiny / "t5_unet", dtype="int8")
