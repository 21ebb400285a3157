import math

import pytest
import torch
from safetensors.torch import save_file

from bidiffuser.checkpoint import save_safetensors
from bidiffuser.errors import CheckpointError
from bidiffuser.uvit import UViT, UViTConfig, load_uvit, timestep_embedding

from .conftest import official_format


def _inputs(cfg: UViTConfig, B=2, size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = size or cfg.img_size
    return (torch.randn(B, cfg.in_chans, s, s, generator=g), torch.randn(B, 1, cfg.clip_img_dim, generator=g),
            torch.randn(B, cfg.num_text_tokens, cfg.text_dim, generator=g))


def test_v1_parameter_names_and_shapes_match_official_file():
    expected = official_format("uvit_v1.pth")
    with torch.device("meta"):
        model = UViT(UViTConfig.v1())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert sum(math.prod(s) for s in got.values()) == 952_509_520


def test_forward_shapes_fractional_timesteps_and_other_latent_sizes():
    cfg = UViTConfig.tiny()
    model = UViT(cfg).eval()
    for size in (cfg.img_size, cfg.img_size * 2, cfg.img_size // 2 + 2):
        img, clip, text = _inputs(cfg, size=size)
        out = model(img, clip, text, torch.tensor([0.0, 999.5]), torch.tensor([1000, 3]), torch.tensor([1, 0]))
        assert [o.shape for o in out] == [img.shape, clip.shape, text.shape]
        assert all(torch.isfinite(o).all() for o in out)
    with pytest.raises(ValueError, match="patch size"):
        model(*_inputs(cfg, size=cfg.img_size + 1), torch.tensor([0.0]), torch.tensor([0.0]))


def test_timesteps_and_data_type_change_the_output():
    cfg = UViTConfig.tiny()
    model = UViT(cfg).eval()
    x = _inputs(cfg)
    base = model(*x, torch.tensor([10.0, 10.0]), torch.tensor([20.0, 20.0]), 1)
    for t_img, t_text, dt in [(11.0, 20.0, 1), (10.0, 21.0, 1), (10.0, 20.0, 0)]:
        other = model(*x, torch.tensor([t_img] * 2), torch.tensor([t_text] * 2), dt)
        assert not torch.allclose(base[2], other[2])
    # a scalar timestep broadcasts like a per-sample vector
    same = model(*x, torch.tensor(10.0), torch.tensor(20.0), torch.tensor([1, 1]))
    assert all(torch.allclose(a, b) for a, b in zip(base, same))


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0.0, 1.5, 999.0])
    emb = timestep_embedding(t, 6)
    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(3)]
    expected = [[math.cos(tt * f) for f in freqs] + [math.sin(tt * f) for f in freqs] for tt in t.tolist()]
    assert torch.allclose(emb, torch.tensor(expected), atol=1e-5)


def test_activation_checkpointing_gives_same_outputs_and_gradients():
    cfg = UViTConfig.tiny()
    torch.manual_seed(0)
    plain = UViT(cfg)
    ckpt = UViT(UViTConfig(**{**cfg.to_dict(), "use_checkpoint": True}))
    ckpt.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        out = model(*_inputs(cfg), torch.tensor([5.0, 6.0]), torch.tensor([7.0, 8.0]))
        sum(o.square().sum() for o in out).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("prefix,container", [("", "pth"), ("module.", "pth"), ("", "safetensors")])
def test_load_official_layouts(tmp_path, prefix, container):
    cfg = UViTConfig.tiny()
    model = UViT(cfg).eval()
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / f"uvit.{container}"
    torch.save(sd, path) if container == "pth" else save_safetensors(sd, path)
    loaded = load_uvit(path, cfg)
    x = _inputs(cfg)
    t = torch.tensor([3.0, 500.0])
    assert all(torch.equal(a, b) for a, b in zip(model(*x, t, t), loaded(*x, t, t)))


def test_wrong_checkpoints_list_the_bad_keys(tmp_path):
    cfg = UViTConfig.tiny()
    sd = UViT(cfg).state_dict()
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "norm.weight"}, "missing keys: norm.weight"),
        "unexpected": ({**sd, "extra.weight": torch.zeros(1)}, "unexpected keys: extra.weight"),
        "misshaped": ({**sd, "text_out.weight": torch.zeros(3, 3)}, "mis-shaped keys: text_out.weight"),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(bad, path)
        with pytest.raises(CheckpointError, match=message):
            load_uvit(path, cfg)
    # a whole checkpoint of a different size: every mismatch is reported, not a torch traceback
    path = tmp_path / "big.safetensors"
    save_file({k: v.contiguous() for k, v in UViT(UViTConfig(**{**cfg.to_dict(), "embed_dim": 64})).state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        load_uvit(path, cfg)


def test_unreadable_checkpoint_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.pth"):
        load_uvit(tmp_path / "nope.pth", UViTConfig.tiny())
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read U-ViT checkpoint .*junk.pth"):
        load_uvit(junk, UViTConfig.tiny())
    good = tmp_path / "good.pth"
    torch.save(UViT(UViTConfig.tiny()).state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_uvit(truncated, UViTConfig.tiny())
