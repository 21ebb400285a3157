import pytest
import torch
from PIL import Image

from bidiffuser.errors import BiDiffuserError
from bidiffuser.pipeline import BiDiffuser

STEPS = 3


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return BiDiffuser.from_pretrained(tiny_dir)


def _check_images(images, n, resolution):
    assert len(images) == n
    assert all(isinstance(im, Image.Image) and im.size == (resolution, resolution) for im in images)


def test_every_mode_returns_the_right_shapes_and_types(pipe, red_image):
    cfg, res = pipe.config.uvit, pipe.config.resolution
    text_shape = (cfg.num_text_tokens, cfg.text_dim)

    out = pipe.text_to_image(["a red circle", "a blue square"], n_samples=2, steps=STEPS, seed=0)
    _check_images(out.images, 4, res)
    assert out.image_latents.shape == (4, cfg.in_chans, pipe.config.latent_size, pipe.config.latent_size)
    assert out.clip_image.shape == (4, 1, cfg.clip_img_dim)

    out = pipe.image_to_text([red_image, Image.open(red_image)], steps=STEPS, seed=0)
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    assert out.text_latents.shape == (2, *text_shape)

    out = pipe.joint(n_samples=2, steps=STEPS, seed=0)
    _check_images(out.images, 2, res)
    assert len(out.texts) == 2

    _check_images(pipe.image(n_samples=3, steps=STEPS, seed=0).images, 3, res)
    assert len(pipe.text(n_samples=3, steps=STEPS, seed=0).texts) == 3

    out = pipe.image_variation([red_image], steps=STEPS, seed=0)
    _check_images(out.images, 1, res)
    assert len(out.texts) == 1

    out = pipe.text_variation("a green triangle", n_samples=2, steps=STEPS, seed=0)
    assert len(out.texts) == 2 and out.text_latents.shape == (2, *text_shape)

    lat = pipe.image_to_text_latents([red_image], steps=STEPS, seed=0)
    assert lat.shape == (1, *text_shape) and lat.dtype == torch.float32


def test_same_seed_same_output_and_other_seed_differs(pipe, red_image):
    a = pipe.image_to_text_latents([red_image], steps=STEPS, seed=7)
    b = pipe.image_to_text_latents([red_image], steps=STEPS, seed=7)
    c = pipe.image_to_text_latents([red_image], steps=STEPS, seed=8)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    x = pipe.text_to_image("a red circle", steps=STEPS, seed=3).image_latents
    y = pipe.text_to_image("a red circle", steps=STEPS, seed=3).image_latents
    assert torch.equal(x, y)
    j1, j2 = pipe.joint(steps=STEPS, seed=5), pipe.joint(steps=STEPS, seed=5)
    assert torch.equal(j1.text_latents, j2.text_latents) and j1.texts == j2.texts


def test_guidance_runs_conditional_and_unconditional_in_one_batched_forward(pipe, red_image):
    """With guidance, the U-ViT is called as often as without, each call on twice the batch
    (three times for joint mode: joint, text-only and image-only branches)."""
    calls = []
    hook = pipe.uvit.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        pipe.image_to_text_latents([red_image], steps=STEPS, scale=0.0, seed=0)
        unguided = len(calls)
        assert calls and all(b == 1 for b in calls)
        calls.clear()
        pipe.image_to_text_latents([red_image], steps=STEPS, scale=7.0, seed=0)
        assert all(b == 2 for b in calls) and len(calls) == unguided
        calls.clear()
        pipe.text_to_image("x", steps=STEPS, scale=2.0, seed=0)
        assert calls and all(b == 2 for b in calls) and len(calls) == unguided
        calls.clear()
        pipe.joint(n_samples=1, steps=STEPS, scale=2.0, seed=0)
        assert calls and all(b == 3 for b in calls) and len(calls) == unguided
    finally:
        hook.remove()


def test_guidance_scale_changes_the_result(pipe, red_image):
    a = pipe.image_to_text_latents([red_image], steps=STEPS, scale=0.0, seed=1)
    b = pipe.image_to_text_latents([red_image], steps=STEPS, scale=3.0, seed=1)
    assert not torch.allclose(a, b)


def test_lazy_loading_skips_unused_components(tiny_dir, red_image):
    pipe = BiDiffuser.from_pretrained(tiny_dir)
    pipe.image_to_text_latents([red_image], steps=2, seed=0)
    assert "clip_text" not in vars(pipe) and "caption_decoder" not in vars(pipe)


def test_bad_images_are_clear_errors(pipe, tmp_path):
    with pytest.raises(BiDiffuserError, match="image not found: .*missing.png"):
        pipe.image_to_text_latents([tmp_path / "missing.png"], steps=2)
    text = tmp_path / "notes.png"
    text.write_text("this is not a png")
    with pytest.raises(BiDiffuserError, match="not an image file.*notes.png"):
        pipe.image_to_text_latents([text], steps=2)
    with pytest.raises(BiDiffuserError, match="no images"):
        pipe.image_to_text_latents([], steps=2)


def test_odd_image_sizes_are_cropped_and_resized(pipe, tmp_path):
    from .conftest import make_image
    for size in [(7, 300), (300, 7), (1, 1), (33, 31)]:
        path = make_image(tmp_path / f"{size[0]}x{size[1]}.png", size=size)
        assert pipe.image_to_text_latents([path], steps=1, seed=0).shape[0] == 1


def test_one_generator_per_image_makes_results_independent_of_the_batch(pipe, red_image, tmp_path):
    """A generator list seeds each batch row on its own (as in diffusers): an image's latents are the
    same alone or beside another image, up to float rounding of the batched kernels."""
    from bidiffuser.pipeline import make_generator as g
    from .conftest import make_image
    blue = make_image(tmp_path / "blue.png", size=(33, 50), color=(10, 30, 200))
    both = pipe.image_to_text_latents([red_image, blue], steps=STEPS, generator=[g(1), g(2)])
    alone = [pipe.image_to_text_latents([im], steps=STEPS, generator=[g(seed)])
             for im, seed in [(red_image, 1), (blue, 2)]]
    torch.testing.assert_close(both, torch.cat(alone))
    swapped = pipe.image_to_text_latents([red_image, blue], steps=STEPS, generator=[g(2), g(1)])
    assert not torch.allclose(both[0], swapped[0])  # each row really uses its own generator
    with pytest.raises(BiDiffuserError, match="got 1 generators for a batch of 2"):
        pipe.image_to_text_latents([red_image, blue], steps=STEPS, generator=[g(1)])


def test_the_global_rng_is_left_alone(tiny_dir, red_image):
    """Loading components and sampling (seeded or not) never shift torch's global RNG: a training
    run that computes features on the fly must see the same dropout masks as one that does not."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    pipe = BiDiffuser.from_pretrained(tiny_dir)  # fresh: the lazy loads happen inside the calls
    pipe.image_to_text_latents([red_image], steps=2, seed=1)
    pipe.image_to_text([red_image], steps=2)  # unseeded
    pipe.text_to_image("x", steps=2, seed=2)
    assert torch.equal(torch.rand(3), expected)
