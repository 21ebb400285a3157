"""The KL VAE: LDM <-> diffusers key mapping, strict loading of the official format, encode/decode."""
import pytest
import torch

from bidiffuser.autoencoder import (AutoencoderConfig, build_autoencoder, decode_latents,
                                    diffusers_to_ldm, encode_image, ldm_to_diffusers,
                                    load_autoencoder, official_state_dict)
from bidiffuser.checkpoint import save_safetensors, save_torch
from bidiffuser.errors import BiDiffuserError, CheckpointError

from .conftest import official_format


@pytest.fixture(scope="module")
def tiny():
    config = AutoencoderConfig.tiny()
    torch.manual_seed(0)
    vae = build_autoencoder(config).eval()
    return config, vae


@pytest.fixture(scope="module")
def latents(tiny):
    config, _ = tiny
    return torch.randn(2, config.z_channels, 4, 4, generator=torch.Generator().manual_seed(1))


def test_sd_config_matches_the_official_key_names_and_shapes():
    official = official_format("autoencoder_kl.pth")
    config = AutoencoderConfig.sd()
    with torch.device("meta"):
        vae = build_autoencoder(config)
    ldm = official_state_dict(vae, config)
    assert {k: tuple(v.shape) for k, v in ldm.items()} == official
    assert config.downsample_factor == 8


def test_sd_mapping_round_trip_on_meta():
    config = AutoencoderConfig.sd()
    with torch.device("meta"):
        sd = build_autoencoder(config).state_dict()
    ldm = diffusers_to_ldm(sd, config)
    back = ldm_to_diffusers(ldm, config)
    assert list(back) == list(sd)
    assert all(back[k].shape == sd[k].shape for k in sd)
    # spot-check the rules the LDM layout is known for
    assert "decoder.up.0.block.2.conv1.weight" in ldm  # highest resolution level, 3 resnets
    up = sd["decoder.up_blocks.0.upsamplers.0.conv.weight"]  # lowest resolution = LDM level 3
    assert ldm["decoder.up.3.upsample.conv.weight"].shape == up.shape
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "encoder.down.1.block.0.nin_shortcut.weight" in ldm


def test_tiny_mapping_round_trip_is_exact(tiny):
    config, vae = tiny
    sd = vae.state_dict()
    back = ldm_to_diffusers(diffusers_to_ldm(sd, config), config)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_mapping_agrees_with_diffusers_own_ldm_converter(tiny):
    """An independent implementation: diffusers' single-file loader reads our LDM dict back."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    config, vae = tiny
    sd = vae.state_dict()
    theirs = convert_ldm_vae_checkpoint(official_state_dict(vae, config), dict(vae.config))
    assert theirs.keys() == sd.keys()
    assert all(torch.equal(theirs[k].reshape(sd[k].shape), sd[k]) for k in sd)


def test_config_dict_round_trip_and_validation():
    config = AutoencoderConfig.tiny()
    assert AutoencoderConfig.from_dict(config.to_dict()) == config
    assert config.downsample_factor == 2
    with pytest.raises(BiDiffuserError, match="unknown fields"):
        AutoencoderConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(BiDiffuserError, match="embed_dim"):
        AutoencoderConfig(ch=8, z_channels=4, embed_dim=3, norm_num_groups=4)


def test_official_pth_loads_and_decodes_identically(tiny, latents, tmp_path):
    config, vae = tiny
    sd = official_state_dict(vae, config)
    sd["loss.discriminator.main.0.weight"] = torch.zeros(2)  # the official file may carry these
    path = tmp_path / "autoencoder_kl.pth"
    save_torch(sd, path)
    loaded = load_autoencoder(path, config)
    assert torch.equal(decode_latents(loaded, latents), decode_latents(vae, latents))
    # wrapped in {"state_dict": ...} works too
    save_torch({"state_dict": sd}, path)
    assert torch.equal(decode_latents(load_autoencoder(path, config), latents),
                       decode_latents(vae, latents))


@pytest.mark.parametrize("naming", ["ldm", "diffusers"])
def test_safetensors_in_either_naming(tiny, latents, tmp_path, naming):
    config, vae = tiny
    sd = official_state_dict(vae, config) if naming == "ldm" else vae.state_dict()
    path = tmp_path / "vae.safetensors"
    save_safetensors(sd, path)
    loaded = load_autoencoder(path, config)
    assert torch.equal(decode_latents(loaded, latents), decode_latents(vae, latents))


def _save_and_expect(sd, tmp_path, config, pattern):
    path = tmp_path / "autoencoder_kl.pth"
    save_torch(sd, path)
    with pytest.raises(CheckpointError, match=pattern):
        load_autoencoder(path, config)


def test_missing_key_is_named(tiny, tmp_path):
    config, vae = tiny
    sd = official_state_dict(vae, config)
    del sd["decoder.up.1.upsample.conv.weight"]
    _save_and_expect(sd, tmp_path, config, r"missing keys: decoder\.up\.1\.upsample\.conv\.weight")


def test_unexpected_key_is_named(tiny, tmp_path):
    config, vae = tiny
    sd = official_state_dict(vae, config)
    sd["encoder.extra.weight"] = torch.zeros(1)
    _save_and_expect(sd, tmp_path, config, r"unexpected keys: encoder\.extra\.weight")


def test_wrong_shape_is_named(tiny, tmp_path):
    config, vae = tiny
    sd = official_state_dict(vae, config)
    sd["encoder.mid.attn_1.q.weight"] = torch.zeros(3, 3, 1, 1)
    _save_and_expect(sd, tmp_path, config, r"mis-shaped keys: encoder\.mid\.attn_1\.q\.weight")


def test_sd_file_into_tiny_config_fails_clearly(tmp_path):
    """A real-size checkpoint loaded with the wrong config lists mismatches, it does not crash."""
    with torch.device("meta"):
        big = official_state_dict(build_autoencoder(AutoencoderConfig.sd()), AutoencoderConfig.sd())
    sd = {k: torch.zeros(1) for k in big}  # names only matter here
    _save_and_expect(sd, tmp_path, AutoencoderConfig.tiny(), "does not match the model config")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.pth"):
        load_autoencoder(tmp_path / "nope.pth", AutoencoderConfig.tiny())
    junk = tmp_path / "junk.pth"
    junk.write_bytes(torch.randint(0, 256, (1000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_autoencoder(junk, AutoencoderConfig.tiny())


def test_encode_decode_shapes_and_determinism(tiny):
    config, vae = tiny
    images = torch.rand(2, 3, 16, 12) * 2 - 1
    z1 = encode_image(vae, images, generator=torch.Generator().manual_seed(3))
    z2 = encode_image(vae, images, generator=torch.Generator().manual_seed(3))
    z3 = encode_image(vae, images, generator=torch.Generator().manual_seed(4))
    assert z1.shape == (2, config.z_channels, 8, 6)
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    mean = encode_image(vae, images, sample=False)
    assert torch.equal(mean, encode_image(vae, images, sample=False))
    # the mean is the first half of the encoder's moments, times the scale factor
    moments = vae.quant_conv(vae.encoder(images))
    torch.testing.assert_close(mean, moments[:, :config.z_channels] * config.scale_factor)
    out = decode_latents(vae, z1)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    # decode divides by the scale factor before the decoder
    torch.testing.assert_close(decode_latents(vae, z1, clamp=False),
                               vae.decoder(vae.post_quant_conv(z1 / config.scale_factor)))


def test_encode_rejects_bad_shapes(tiny):
    _, vae = tiny
    with pytest.raises(BiDiffuserError, match="multiple of"):
        encode_image(vae, torch.zeros(1, 3, 15, 16))
    with pytest.raises(BiDiffuserError, match="B×3×H×W"):
        encode_image(vae, torch.zeros(3, 16, 16))
