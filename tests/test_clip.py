"""CLIP encoders: tiny HF directories, OpenAI preprocessing, OpenAI-format conversion, errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                          CLIPVisionModelWithProjection, PreTrainedTokenizerFast)

from bidiffuser.checkpoint import save_safetensors, save_torch
from bidiffuser.clip import (CLIP_MEAN, CLIP_STD, clip_preprocess, init_tiny_clip, load_clip_image_encoder,
                             load_clip_text_encoder)
from bidiffuser.clip_convert import (convert_openai_clip_checkpoint, convert_openai_clip_text,
                                     convert_openai_clip_visual)
from bidiffuser.errors import BiDiffuserError, CheckpointError

WORDS = "a an the cat dog sat on mat red blue photo of".split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that wraps texts in <bos> ... <eos> like CLIP's."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def rgb(w, h, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    dims = init_tiny_clip(root / "image", root / "text", word_tokenizer(), seed=0)
    return root / "image", root / "text", dims


# ------------------------------------------------------------------ tiny directories

def test_tiny_dirs_load_with_the_right_shapes(tiny_dirs):
    image_dir, text_dir, (image_dim, text_dim) = tiny_dirs
    image_enc = load_clip_image_encoder(image_dir)
    text_enc = load_clip_text_encoder(text_dir)
    assert image_enc.encode([rgb(40, 30), rgb(20, 50, seed=1)]).shape == (2, 1, image_dim)
    assert text_enc.encode(["a cat", "the dog sat on the mat"]).shape == (2, 77, text_dim)
    assert (image_dim, text_dim) == (16, 32)


def test_text_encoding_pads_to_77_and_is_last_hidden_state(tiny_dirs):
    _, text_dir, _ = tiny_dirs
    enc = load_clip_text_encoder(text_dir)
    ids = enc.tokenize(["a cat", "blue"])
    vocab = {w: i + 4 for i, w in enumerate(WORDS)}
    expected = torch.zeros(2, 77, dtype=torch.long)  # <pad> = 0
    expected[0, :4] = torch.tensor([1, vocab["a"], vocab["cat"], 2])
    expected[1, :3] = torch.tensor([1, vocab["blue"], 2])
    assert torch.equal(ids, expected)
    model = CLIPTextModel.from_pretrained(str(text_dir), local_files_only=True)
    with torch.no_grad():
        reference = model(input_ids=expected).last_hidden_state
    torch.testing.assert_close(enc.encode(["a cat", "blue"]), reference)
    # longer texts are truncated to 77 tokens, still ending with <eos>
    long_ids = enc.tokenize(" ".join(["cat"] * 200))
    assert long_ids.shape == (1, 77) and long_ids[0, -1] == 2


def test_image_encoding_is_the_projected_unnormalised_embedding(tiny_dirs):
    image_dir, _, _ = tiny_dirs
    enc = load_clip_image_encoder(image_dir)
    images = [rgb(40, 30), rgb(32, 32, seed=2)]
    pixels = enc.preprocess(images)
    model = CLIPVisionModelWithProjection.from_pretrained(str(image_dir), local_files_only=True)
    with torch.no_grad():
        reference = model(pixel_values=pixels).image_embeds
    out = enc.encode(images)
    torch.testing.assert_close(out[:, 0], reference)
    torch.testing.assert_close(enc.encode(pixels), out)  # tensors are taken as pixel values
    assert not torch.allclose(out.norm(dim=-1), torch.ones(2))  # not normalised


def test_full_clipmodel_directory_loads_both_towers(tmp_path):
    """openai/clip-vit-* directories hold a whole CLIPModel; projection_dim is top-level there."""
    tok = word_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=24)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    assert load_clip_image_encoder(tmp_path).encode(rgb(33, 45)).shape == (1, 1, 24)
    assert load_clip_text_encoder(tmp_path).encode("a dog").shape == (1, 77, 32)


# ------------------------------------------------------------------ preprocessing

def _normalise(a: np.ndarray) -> np.ndarray:
    x = a.astype(np.float32) / np.float32(255)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return x.transpose(2, 0, 1)


def test_preprocess_crop_only_matches_numpy():
    """Short side already 32: no resize; a centre crop of 45 rows starts at round(6.5) = 6."""
    a = np.random.default_rng(3).integers(0, 256, (45, 32, 3), dtype=np.uint8)
    out = clip_preprocess(Image.fromarray(a), 32)
    np.testing.assert_allclose(out[0].numpy(), _normalise(a[6:38]), rtol=0, atol=1e-6)


def test_preprocess_resize_then_crop_matches_numpy():
    """64×40 -> short side 32, long int(32·64/40) = 51 (bicubic) -> crop columns 10..42 (round(9.5))."""
    a = np.random.default_rng(4).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(a).resize((51, 32), Image.BICUBIC))
    out = clip_preprocess([Image.fromarray(a)], 32)
    assert out.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(out[0].numpy(), _normalise(resized[:, 10:42]), rtol=0, atol=1e-6)


def test_preprocess_converts_to_rgb_and_accepts_arrays():
    grey = Image.fromarray(np.full((32, 32), 128, np.uint8), mode="L")
    out = clip_preprocess([grey, np.full((32, 32, 3), 128, np.uint8)], 32)
    torch.testing.assert_close(out[0], out[1])
    with pytest.raises(BiDiffuserError, match="uint8"):
        clip_preprocess(np.zeros((8, 8, 3), np.float32), 32)


# ------------------------------------------------------------------ OpenAI format conversion

def to_openai(vision: CLIPVisionModelWithProjection, text: CLIPTextModel, text_projection) -> dict:
    """The OpenAI CLIP names of the two towers (written here, independently of the converter)."""
    v = vision.state_dict()
    t = {k.removeprefix("text_model."): x for k, x in text.state_dict().items()}
    out = {
        "visual.class_embedding": v["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": v["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": v["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": v["visual_projection.weight"].t().contiguous(),
        "token_embedding.weight": t["embeddings.token_embedding.weight"],
        "positional_embedding": t["embeddings.position_embedding.weight"],
        "text_projection": text_projection,
        "logit_scale": torch.tensor(4.6052),
    }
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = v[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = v[f"vision_model.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = t[f"final_layer_norm.{kind}"]
    towers = [(v, "vision_model.encoder.layers.", "visual.transformer.resblocks.", vision.config),
              (t, "encoder.layers.", "transformer.resblocks.", text.config)]
    for sd, hf, oa, config in towers:
        for i in range(config.num_hidden_layers):
            h, o = f"{hf}{i}.", f"{oa}{i}."
            for kind in ("weight", "bias"):
                out[f"{o}attn.in_proj_{kind}"] = torch.cat(
                    [sd[f"{h}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
                out[f"{o}attn.out_proj.{kind}"] = sd[f"{h}self_attn.out_proj.{kind}"]
                out[f"{o}ln_1.{kind}"] = sd[f"{h}layer_norm1.{kind}"]
                out[f"{o}ln_2.{kind}"] = sd[f"{h}layer_norm2.{kind}"]
                out[f"{o}mlp.c_fc.{kind}"] = sd[f"{h}mlp.fc1.{kind}"]
                out[f"{o}mlp.c_proj.{kind}"] = sd[f"{h}mlp.fc2.{kind}"]
    return out


@pytest.fixture(scope="module")
def openai_models():
    """Small towers with 64-d heads, so OpenAI's heads = width // 64 rule applies (2 heads)."""
    tok = word_tokenizer()
    torch.manual_seed(1)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=16, hidden_act="quick_gelu")).eval()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    sd = to_openai(vision, text, torch.randn(128, 16))
    return vision, text, tok, sd


def _check_converted(vision, text, tok, image_dir, text_dir):
    images = [rgb(40, 30, seed=5), rgb(50, 50, seed=6)]
    image_enc = load_clip_image_encoder(image_dir)
    with torch.no_grad():
        expected = vision(pixel_values=clip_preprocess(images, 32)).image_embeds
    torch.testing.assert_close(image_enc.encode(images)[:, 0], expected, rtol=0, atol=1e-6)
    text_enc = load_clip_text_encoder(text_dir)
    prompts = ["a red cat sat on the mat", "photo of a dog"]
    with torch.no_grad():
        expected = text(input_ids=text_enc.tokenize(prompts)).last_hidden_state
    torch.testing.assert_close(text_enc.encode(prompts), expected, rtol=0, atol=1e-6)


def test_convert_openai_state_dict(openai_models, tmp_path):
    vision, text, tok, sd = openai_models
    src = tmp_path / "ViT-tiny.pt"
    save_torch(sd, src)
    convert_openai_clip_checkpoint(src, tmp_path / "image", part="visual")
    convert_openai_clip_checkpoint(src, tmp_path / "text", part="text", tokenizer=tok)
    assert json.loads((tmp_path / "image" / "config.json").read_text())["hidden_act"] == "quick_gelu"
    assert (tmp_path / "image" / "model.safetensors").is_file()
    _check_converted(vision, text, tok, tmp_path / "image", tmp_path / "text")
    # converting again over an earlier conversion replaces it
    convert_openai_clip_checkpoint(src, tmp_path / "image", part="visual")


def test_converter_infers_the_config(openai_models):
    _, _, tok, sd = openai_models
    vc, vsd = convert_openai_clip_visual(sd)
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.patch_size,
            vc.image_size, vc.projection_dim, vc.intermediate_size) == (128, 2, 2, 8, 32, 16, 256)
    tc, tsd = convert_openai_clip_text(sd)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.vocab_size,
            tc.max_position_embeddings, tc.projection_dim) == (128, 2, 2, len(tok), 77, 16)
    assert vc.hidden_act == tc.hidden_act == "quick_gelu"
    assert not any(k.startswith("visual") for k in tsd)


def _torchscript_archive(sd: dict, path):
    """An archive laid out like OpenAI's clip.load downloads: a scripted module with those names."""
    root = torch.nn.Module()
    for key, value in sd.items():
        *parents, name = key.split(".")
        module = root
        for p in parents:
            if not hasattr(module, p):
                module.add_module(p, torch.nn.Module())
            module = getattr(module, p)
        module.register_buffer(name, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))


def test_convert_openai_torchscript_archive(openai_models, tmp_path):
    vision, text, tok, sd = openai_models
    src = tmp_path / "ViT-B-32.pt"
    extra = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
             "vocab_size": torch.tensor(len(tok))}
    _torchscript_archive({**sd, **extra}, src)
    convert_openai_clip_checkpoint(src, tmp_path / "image", part="visual")
    convert_openai_clip_checkpoint(src, tmp_path / "text", part="text", tokenizer=tok)
    _check_converted(vision, text, tok, tmp_path / "image", tmp_path / "text")


def test_conversion_errors(openai_models, tmp_path):
    _, _, _, sd = openai_models
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match="junk.pt"):
        convert_openai_clip_checkpoint(junk, tmp_path / "out")
    partial = {k: v for k, v in sd.items() if k != "visual.proj"}
    with pytest.raises(CheckpointError, match="visual.proj"):
        convert_openai_clip_visual(partial)
    with pytest.raises(CheckpointError, match="visual.attnpool.x"):
        convert_openai_clip_visual({**sd, "visual.attnpool.x": torch.zeros(1)})
    with pytest.raises(BiDiffuserError, match="part"):
        convert_openai_clip_checkpoint(junk, tmp_path / "out", part="both")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ loading errors

def test_missing_and_malformed_directories(tiny_dirs, tmp_path):
    image_dir, _, _ = tiny_dirs
    with pytest.raises(BiDiffuserError, match="not found.*nope"):
        load_clip_image_encoder(tmp_path / "nope")
    (tmp_path / "file.pt").write_bytes(b"x")
    with pytest.raises(BiDiffuserError, match="got a file"):
        load_clip_image_encoder(tmp_path / "file.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BiDiffuserError, match="no config.json"):
        load_clip_text_encoder(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(BiDiffuserError, match="malformed"):
        load_clip_image_encoder(bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(BiDiffuserError, match="'gpt2'"):
        load_clip_image_encoder(bad)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((image_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no_weights"):
        load_clip_image_encoder(no_weights)
    with pytest.raises(BiDiffuserError, match="unknown CLIP backend"):
        load_clip_image_encoder(image_dir, backend="jax")


def test_weights_missing_a_key_are_named(tiny_dirs, tmp_path):
    image_dir, text_dir, _ = tiny_dirs
    from safetensors.torch import load_file
    sd = load_file(str(image_dir / "model.safetensors"))
    del sd["visual_projection.weight"]
    (tmp_path / "config.json").write_text((image_dir / "config.json").read_text())
    save_safetensors(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing keys: visual_projection.weight"):
        load_clip_image_encoder(tmp_path)


def test_text_directory_without_tokenizer(tiny_dirs, tmp_path):
    _, text_dir, _ = tiny_dirs
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((text_dir / name).read_bytes())
    with pytest.raises(BiDiffuserError, match="tokenizer"):
        load_clip_text_encoder(tmp_path)


# ------------------------------------------------------------------ open_clip backend

def test_openclip_backend_reports_when_unavailable(tiny_dirs):
    try:
        import open_clip  # noqa: F401
    except Exception as e:  # torchvision (and so open_clip) cannot import with the CPU torch build
        with pytest.raises(BiDiffuserError, match="open_clip is not installed/importable"):
            load_clip_image_encoder(tiny_dirs[0], backend="openclip")
        pytest.skip(f"open_clip cannot be imported here: {type(e).__name__}: {e}")


def test_openclip_backend_matches_transformers(tmp_path):
    """Where open_clip imports: a random ViT-B-32 (quickgelu) gives the same embedding through the
    open_clip backend and through conversion to transformers."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip (optional extra) is not importable")
    torch.manual_seed(0)
    src = tmp_path / "ViT-B-32.pt"
    save_torch(open_clip.create_model("ViT-B-32-quickgelu").state_dict(), src)
    convert_openai_clip_checkpoint(src, tmp_path / "hf", part="visual")
    image = rgb(300, 240)
    ours = load_clip_image_encoder(src, backend="openclip").encode(image)
    torch.testing.assert_close(ours, load_clip_image_encoder(tmp_path / "hf").encode(image),
                               rtol=1e-4, atol=1e-4)
