"""Training a BiDiffuser's small components from scratch (VAE, caption decoder) and the sized init."""
import pytest
import torch

from bidiffuser.autoencoder import AutoencoderConfig, encode_image
from bidiffuser.caption_decoder import CaptionDecoderConfig
from bidiffuser.images import pil_to_tensor
from bidiffuser.model_dir import init_tiny, read_config
from bidiffuser.pipeline import BiDiffuser
from bidiffuser.train_components import train_autoencoder, train_caption_decoder, train_clip
from bidiffuser.uvit import UViTConfig

from .conftest import make_image

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a red square on white"]


def caption_decoder_accuracy(model_dir, captions) -> float:
    """Share of ``captions`` the caption decoder reproduces exactly from their own text latents."""
    pipe = BiDiffuser.from_pretrained(model_dir)
    decoded = pipe.decode_texts(pipe.encode_prompts(captions))
    return sum(d.strip() == c for d, c in zip(decoded, captions)) / len(captions)


@pytest.fixture
def sized(tmp_path):
    """A 32 px directory with a factor-4 VAE, 8 text tokens and a tokenizer trained on CAPTIONS."""
    return init_tiny(tmp_path / "bd", seed=0, resolution=32, corpus=CAPTIONS * 4,
                     uvit=UViTConfig(patch_size=2, embed_dim=32, depth=2, num_heads=2, num_text_tokens=8,
                                     clip_img_dim=12),
                     autoencoder=AutoencoderConfig(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4,
                                                   embed_dim=4, norm_num_groups=4),
                     caption_decoder=CaptionDecoderConfig(vocab_size=0, n_positions=80, n_embd=32, n_layer=1,
                                                          n_head=2, prefix_length=0, hidden_dim=6)).root


def test_init_derives_the_shared_sizes(sized):
    cfg = read_config(sized)
    assert (cfg.uvit.img_size, cfg.uvit.in_chans, cfg.uvit.text_dim, cfg.uvit.clip_img_dim) == (8, 4, 6, 12)
    assert cfg.caption_decoder.prefix_length == 8 and cfg.caption_decoder.vocab_size < 512
    pipe = BiDiffuser.from_pretrained(sized)
    assert pipe.encode_prompts(CAPTIONS).shape == (4, 8, 6)  # CLIP text reads num_text_tokens tokens
    out = pipe.text_to_image("a red circle", steps=2, seed=0)
    assert out.images[0].size == (32, 32) and out.image_latents.shape == (1, 4, 8, 8)


def test_autoencoder_training_reconstructs_and_unit_scales_the_latents(sized, tmp_path):
    colours = [(220, 40, 40), (40, 80, 220), (40, 170, 60), (235, 200, 30)]
    images = [make_image(tmp_path / f"{i}.png", size=(32, 32), color=c) for i, c in enumerate(colours * 2)]
    pixels = pil_to_tensor([__import__("PIL.Image").Image.open(p).convert("RGB") for p in images])

    def error(cfg):
        pipe = BiDiffuser.from_pretrained(cfg.root)
        z = encode_image(pipe.autoencoder, pixels, sample=False)
        with torch.no_grad():
            recon = pipe.autoencoder.decode(z / cfg.autoencoder.scale_factor).sample
        return (recon - pixels).pow(2).mean().item(), z

    before, _ = error(read_config(sized))
    losses = []
    cfg = train_autoencoder(sized, [str(p) for p in images], steps=60, batch_size=4, lr=3e-3,
                            progress=lambda s, n, loss: losses.append(loss))
    after, z = error(read_config(sized))
    assert len(losses) == 60 and after < 0.5 * before
    assert cfg.autoencoder.scale_factor != AutoencoderConfig.tiny().scale_factor  # written to bidiffuser.json
    assert read_config(sized).autoencoder.scale_factor == cfg.autoencoder.scale_factor
    assert 0.7 < z.std().item() < 1.3  # the scale factor makes the (mean) latents unit-variance


def test_caption_decoder_learns_the_captions_and_unit_scales_the_text_latents(sized):
    assert caption_decoder_accuracy(sized, CAPTIONS) < 1.0
    train_caption_decoder(sized, CAPTIONS, steps=300, batch_size=4, lr=3e-3)
    assert caption_decoder_accuracy(sized, CAPTIONS) == 1.0
    latents = BiDiffuser.from_pretrained(sized).encode_prompts(CAPTIONS)
    assert latents.std().item() == pytest.approx(1.0, abs=0.05)


def test_component_training_errors_are_clear(sized):
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_autoencoder(sized, [], steps=1, batch_size=2)
    with pytest.raises(ValueError, match="no captions"):
        train_caption_decoder(sized, [], steps=1)


def test_clip_training_makes_image_embeddings_match_their_captions(sized, tmp_path):
    colours = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}
    images, captions = [], []
    for k in range(4):
        for name, rgb in colours.items():
            images.append(str(make_image(tmp_path / f"{name}{k}.png", size=(32 + 4 * k, 32), color=rgb)))
            captions.append(f"a {name} square")

    def between_share() -> float:  # share of the image embeddings' variance explained by the caption
        _, emb = BiDiffuser.from_pretrained(sized).encode_images(images, torch.Generator().manual_seed(0))
        emb = torch.nn.functional.normalize(emb.squeeze(1), dim=-1)
        means = {c: emb[[i for i, d in enumerate(captions) if d == c]].mean(0) for c in set(captions)}
        between = torch.stack([means[c] for c in captions]) - emb.mean(0)
        return (between.pow(2).sum() / (emb - emb.mean(0)).pow(2).sum()).item()

    before, losses = between_share(), []
    train_clip(sized, images, captions, steps=40, batch_size=12, lr=2e-3, progress=lambda s, n, l: losses.append(l))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    after = between_share()
    # Random CLIP already half-separates flat colours (0.94 here); trained, images group by caption.
    assert before < 0.97 and after > 0.99, (before, after)
    with pytest.raises(ValueError, match="need at least 2"):
        train_clip(sized, images[:1], captions[:1])
