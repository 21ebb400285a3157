"""easygen.builder.load_pretrained: every checkpoint layout gives the logits of the model it was saved from."""
import json
import shutil

import pytest
import torch
from PIL import Image
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from bidiffuser.checkpoint import save_safetensors
from bidiffuser.errors import BiDiffuserError, CheckpointError
from easygen.builder import load_pretrained, save_pretrained, save_projector


@pytest.fixture(scope="module")
def reference(tiny_loaded):
    """A prompt with an image, and the reference model's logits for it."""
    lm = tiny_loaded
    ids = lm.processor.tokenize_prompt(lm.processor.build_prompt(
        [{"role": "user", "content": "what is it?", "num_images": 1}]))
    cfg = lm.model.config
    feats = torch.randn(1, cfg.num_image_tokens, cfg.mm_hidden_size, generator=torch.Generator().manual_seed(0))
    return lm, torch.tensor([ids]), feats


def _logits(model, ids, feats):
    with torch.no_grad():
        return model(input_ids=ids, image_features=feats).logits


def test_our_directory_round_trips(reference, tmp_path, tiny_dir):
    lm, ids, feats = reference
    out = save_pretrained(lm.model, lm.tokenizer, tmp_path / "copy", bidiffuser_dir=tiny_dir)
    loaded = load_pretrained(out)
    assert loaded.layout == "easygen" and loaded.bidiffuser is not None
    assert torch.equal(_logits(loaded.model, ids, feats), _logits(lm.model, ids, feats))


def _write_plain_llama(lm, path):
    """The LLM part as a plain LLaMA HF directory (what a Vicuna download looks like)."""
    cfg = lm.model.config.to_dict()
    for k in ("model_type", "architectures", "mm_hidden_size", "projector_hidden_size", "projector_type",
              "num_image_tokens", "transformers_version"):
        cfg.pop(k, None)
    from transformers import LlamaConfig
    llama = LlamaForCausalLM(LlamaConfig(**cfg))
    llama.load_state_dict({k: v for k, v in lm.model.state_dict().items() if not k.startswith("projector.")})
    llama.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)


def test_base_llama_plus_projector_file(reference, tmp_path):
    lm, ids, feats = reference
    _write_plain_llama(lm, tmp_path / "vicuna")
    save_projector(lm.model, tmp_path / "projector.safetensors")
    loaded = load_pretrained(tmp_path / "vicuna", projector=tmp_path / "projector.safetensors",
                             load_bidiffuser=False)
    assert loaded.layout == "llama+projector"
    assert torch.equal(_logits(loaded.model, ids, feats), _logits(lm.model, ids, feats))
    with pytest.raises(BiDiffuserError, match="plain LLaMA directory: give the projector"):
        load_pretrained(tmp_path / "vicuna")


def write_released_layout(lm, d):
    """``lm`` saved as EasyGen's release is: model_type diffllama, .bin shards, projector under
    model.fastchat_proj, and the unused model.clip_proj head of the original code's variant class."""
    d.mkdir()
    cfg = lm.model.config.to_dict()
    for k in ("mm_hidden_size", "projector_hidden_size", "projector_type", "num_image_tokens"):
        cfg.pop(k)
    cfg.update(model_type="diffllama", architectures=["DiffLlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    sd = {k.replace("projector.", "model.fastchat_proj."): v for k, v in lm.model.state_dict().items()}
    h = lm.model.config.hidden_size
    sd["model.clip_proj.fc1.weight"] = torch.zeros(4 * h, h)
    keys = sorted(sd)
    torch.save({k: sd[k] for k in keys[: len(keys) // 2]}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in keys[len(keys) // 2:]}, d / "pytorch_model-00002-of-00002.bin")
    lm.tokenizer.save_pretrained(d)
    return d


def test_released_diffllama_layout(reference, tmp_path):
    lm, ids, feats = reference
    d = write_released_layout(lm, tmp_path / "easygen-release")
    loaded = load_pretrained(d, load_bidiffuser=False)
    assert loaded.layout == "easygen-released"
    assert loaded.model.config.mm_hidden_size == lm.model.config.mm_hidden_size
    assert torch.equal(_logits(loaded.model, ids, feats), _logits(lm.model, ids, feats))


def test_lora_adapter_unmerged_equals_merged_equals_trained(reference, tmp_path):
    lm, ids, feats = reference
    _write_plain_llama(lm, tmp_path / "vicuna")
    base = load_pretrained(tmp_path / "vicuna", projector=_saved_projector(lm, tmp_path), load_bidiffuser=False).model
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))  # random B: the adapter matters
    with torch.no_grad():
        base.projector.fc2.bias.add_(0.5)  # as if stage 2 also tuned the projector
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    save_projector(base, adapter / "projector.safetensors")
    lm.tokenizer.save_pretrained(adapter)
    expected = _logits(peft_model, ids, feats)
    assert not torch.allclose(expected, _logits(lm.model, ids, feats))

    unmerged = load_pretrained(tmp_path / "vicuna", lora=adapter, load_bidiffuser=False)
    merged = load_pretrained(adapter, model_base=tmp_path / "vicuna", merge_lora=True, load_bidiffuser=False)
    assert unmerged.layout == "llama+projector+lora" and merged.layout.endswith("+lora(merged)")
    torch.testing.assert_close(_logits(unmerged.model, ids, feats), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(merged.model, ids, feats), _logits(unmerged.model, ids, feats),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(BiDiffuserError, match="LoRA adapter: give its base model"):
        load_pretrained(adapter)


def _saved_projector(lm, tmp_path):
    path = tmp_path / "stage1_projector.safetensors"
    save_projector(lm.model, path)
    return path


def test_llm_and_bidiffuser_dtypes_are_independent(tiny_easygen_dir):
    """The LLM takes --dtype; BiDiffuser its own policy: by default (CPU) all float32, and in half
    precision only the U-ViT and CLIP, the VAE and caption decoder staying float32 (the original's)."""
    loaded = load_pretrained(tiny_easygen_dir, dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    pipe = loaded.bidiffuser
    assert pipe.precision.name == "float32" and next(pipe.uvit.parameters()).dtype == torch.float32

    pipe = load_pretrained(tiny_easygen_dir, bidiffuser_dtype="bfloat16").bidiffuser
    dtypes = {name: {p.dtype for p in getattr(pipe, name).parameters()}
              for name in ("uvit", "autoencoder", "caption_decoder")}
    assert dtypes == {"uvit": {torch.bfloat16}, "autoencoder": {torch.float32}, "caption_decoder": {torch.float32}}
    out = pipe.image_to_text_latents([Image.new("RGB", (40, 30), "red")], steps=2, seed=0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    images = pipe.text_to_image("a red circle", steps=2, seed=0).images
    assert images[0].size == (pipe.config.resolution,) * 2


def test_bad_checkpoints_are_clear_errors(tiny_easygen_dir, tmp_path):
    with pytest.raises(BiDiffuserError, match="model directory not found"):
        load_pretrained(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_easygen_dir, broken, symlinks=True)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read model weights .*model.safetensors"):
        load_pretrained(broken)
    shutil.rmtree(broken)
    shutil.copytree(tiny_easygen_dir, broken, symlinks=True)
    from safetensors.torch import load_file
    sd = load_file(broken / "model.safetensors")
    del sd["model.norm.weight"]
    save_safetensors(sd, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: model.norm.weight"):
        load_pretrained(broken)
    bad_proj = tmp_path / "proj.safetensors"
    save_safetensors({"something.else": torch.zeros(2)}, bad_proj)
    with pytest.raises(CheckpointError, match="not a projector file"):
        load_pretrained(tiny_easygen_dir, projector=bad_proj)


def test_bidiffuser_width_must_match_the_projector(tiny_easygen_dir, tmp_path):
    from bidiffuser.model_dir import init_tiny
    other = tmp_path / "other_bidiffuser"
    init_tiny(other)
    cfg = json.loads((other / "bidiffuser.json").read_text())
    cfg["caption_decoder"]["n_embd"] = 48
    (other / "bidiffuser.json").write_text(json.dumps(cfg))
    with pytest.raises(BiDiffuserError, match="48-d image features but the model's projector expects 32"):
        load_pretrained(tiny_easygen_dir, bidiffuser=other)
