"""BiDiffuser speed: U-ViT forward, guidance batching, image->text latents, caption beam search.

    python benchmarks/bench_bidiffuser.py [--configs tiny,mid] [--repeat 10] [--threads N]
                                          [--device cpu|cuda] [--json results.json]

Every model is randomly initialised (no downloads). Each figure is the median of ``--repeat``
timed runs after a warm-up (the mid preset runs fewer repeats, see ``Preset.repeat_scale``).
Prints a Markdown table; it measures and reports, it never asserts a time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from common import TIMING, median_seconds, n_params, machine_info, add_common_args, apply_common_args, report  # noqa: E402

from bidiffuser.autoencoder import AutoencoderConfig  # noqa: E402
from bidiffuser.caption_decoder import CaptionDecoderConfig, build_tiny_tokenizer, init_caption_decoder  # noqa: E402
from bidiffuser.checkpoint import save_torch  # noqa: E402
from bidiffuser.model_dir import init_tiny, write_config  # noqa: E402
from bidiffuser.pipeline import BiDiffuser  # noqa: E402
from bidiffuser.sampler import NoiseSchedule, dpm_solver_pp_sample  # noqa: E402
from bidiffuser.uvit import UViT, UViTConfig  # noqa: E402

GUIDANCE_SCALE = 7.0
N_IMAGES = 2           # images per i2t call
CAPTION_BATCH = 4      # text latents per caption call
BEAM = 5
CAPTION_LENGTHS = (30, 67)


@dataclass
class Preset:
    name: str
    uvit: UViTConfig
    decoder: dict          # CaptionDecoderConfig sizes (the vocabulary comes from the tokenizer)
    i2t_steps: int         # DPM-Solver steps for the pipeline measurement
    solver_steps: int      # K steps for the per-step guidance measurement
    repeat_scale: float    # fraction of --repeat this preset runs


PRESETS = {
    "tiny": Preset("tiny", UViTConfig.tiny(),
                   dict(n_positions=160, n_embd=32, n_layer=2, n_head=2, hidden_dim=8),
                   i2t_steps=50, solver_steps=12, repeat_scale=1.0),
    "mid": Preset("mid", UViTConfig(img_size=32, embed_dim=512, depth=12, num_heads=8, text_dim=64,
                                    clip_img_dim=512),
                  dict(n_positions=160, n_embd=512, n_layer=6, n_head=8, hidden_dim=64),
                  i2t_steps=10, solver_steps=3, repeat_scale=0.2),
}


# -- timing ----------------------------------------------------------------------------------------


# -- measurements -----------------------------------------------------------------------------------
def uvit_inputs(cfg: UViTConfig, batch: int, device) -> dict[str, torch.Tensor]:
    """Random U-ViT inputs: image latent, CLIP embedding, text latent (i2t: clean image, t_img = 0)."""
    r = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    return {"img": r(batch, cfg.in_chans, cfg.img_size, cfg.img_size), "clip": r(batch, 1, cfg.clip_img_dim),
            "text": r(batch, cfg.num_text_tokens, cfg.text_dim)}


def bench_forward(model: UViT, batch: int, repeat: int, device) -> float:
    x = uvit_inputs(model.config, batch, device)
    t = torch.full((batch,), 500.0, device=device)

    def run():
        with torch.inference_mode():
            model(x["img"], x["clip"], x["text"], torch.zeros_like(t), t)
    return median_seconds(run, repeat, warmup=3)  # the first two calls at a new shape are slow on CPU


def bench_guidance_step(model: UViT, batch: int, steps: int, batched: bool, repeat: int, device) -> float:
    """Seconds per DPM-Solver++ step of i2t text sampling with classifier-free guidance: the
    conditional and unconditional branches as one forward at 2B (as the pipeline does) or two at B."""
    cfg, N = model.config, 1000
    cond, noise = uvit_inputs(cfg, batch, device), uvit_inputs(cfg, batch, device)
    x0 = torch.randn(batch, cfg.num_text_tokens * cfg.text_dim, device=device)

    def model_fn(x, t):
        t = t * N
        text = x.view(batch, cfg.num_text_tokens, cfg.text_dim)
        zeros, full = torch.zeros_like(t), torch.full_like(t, N)
        if batched:
            eps = model(torch.cat([cond["img"], noise["img"]]), torch.cat([cond["clip"], noise["clip"]]),
                        torch.cat([text, text]), torch.cat([zeros, full]), torch.cat([t, t]))[2]
            e_cond, e_uncond = eps.chunk(2)
        else:
            e_cond = model(cond["img"], cond["clip"], text, zeros, t)[2]
            e_uncond = model(noise["img"], noise["clip"], text, full, t)[2]
        return (e_cond + GUIDANCE_SCALE * (e_cond - e_uncond)).flatten(1)

    schedule = NoiseSchedule.stable_diffusion()

    def run():
        with torch.inference_mode():
            dpm_solver_pp_sample(model_fn, x0, steps=steps, schedule=schedule)
    return median_seconds(run, repeat) / steps


def make_model_dir(root: Path, uvit_cfg: UViTConfig) -> Path:
    """A tiny BiDiffuser directory whose U-ViT is replaced by a random one of ``uvit_cfg``'s size
    (latent side, channels, text and CLIP widths follow the directory's VAE, decoder and CLIP)."""
    resolution = uvit_cfg.img_size * AutoencoderConfig.tiny().downsample_factor
    cfg = init_tiny(root, seed=0, resolution=resolution)
    cfg.uvit = replace(uvit_cfg, in_chans=cfg.uvit.in_chans, text_dim=cfg.uvit.text_dim,
                       clip_img_dim=cfg.uvit.clip_img_dim)
    cfg.validate()
    save_torch(UViT(cfg.uvit).state_dict(), cfg.path("uvit"))
    write_config(cfg)
    return root


def sample_images(n: int, size: int) -> list[Image.Image]:
    """Smooth colour gradients, a different one per image."""
    g = torch.Generator().manual_seed(0)
    imgs = []
    for _ in range(n):
        corners = torch.rand(3, 2, 2, generator=g)[None]
        rgb = torch.nn.functional.interpolate(corners, size=(size, size), mode="bilinear", align_corners=True)[0]
        imgs.append(Image.fromarray((rgb.permute(1, 2, 0) * 255).byte().numpy()))
    return imgs


def bench_i2t(model_dir: Path, steps: int, repeat: int, device) -> tuple[float, BiDiffuser]:
    """Seconds per ``image_to_text_latents`` call on N_IMAGES images (components load in the warm-up)."""
    pipe = BiDiffuser.from_pretrained(model_dir, device=device)
    images = sample_images(N_IMAGES, pipe.config.resolution)
    seconds = median_seconds(lambda: pipe.image_to_text_latents(images, steps=steps, scale=GUIDANCE_SCALE,
                                                                seed=0), repeat)
    return seconds, pipe


def bench_captions(decoder, max_new_tokens: int, use_cache: bool, repeat: int, device) -> tuple[float, int]:
    """(seconds per beam-search call on CAPTION_BATCH latents, decoding steps the call ran)."""
    latents = torch.randn(CAPTION_BATCH, decoder.config.prefix_length, decoder.config.hidden_dim, device=device)
    calls = []
    hook = decoder.gpt.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        seconds = median_seconds(lambda: decoder.generate_captions(
            latents, beam_size=BEAM, max_new_tokens=max_new_tokens, use_cache=use_cache), repeat, warmup=0)
    finally:
        hook.remove()
    return seconds, len(calls) // repeat


# -- one preset -------------------------------------------------------------------------------------
def run_preset(p: Preset, repeat: int, device, tokenizer, workdir: Path) -> list[dict]:
    rows = []

    def add(measurement, setting, value, unit, speedup=None):
        """Record the figure just timed, with the other processes' load during its timed runs."""
        rows.append({"config": p.name, "measurement": measurement, "setting": setting, "value": value,
                     "unit": unit, "speedup": speedup, "other_load": TIMING.last_other_load})
        print(f"  {measurement:<18} {setting:<44} {value:9.2f} {unit:<11}"
              + (f" x{speedup:<5.2f}" if speedup else " " * 7) + f" (others: {rows[-1]['other_load']:.2f} cores)",
              flush=True)

    torch.manual_seed(0)
    model = UViT(p.uvit).to(device).eval()
    u = p.uvit
    print(f"\n[{p.name}] U-ViT {n_params(model)} params: width {u.embed_dim}, depth {u.depth}, "
          f"{u.num_heads} heads, {u.img_size}x{u.img_size} latent, text_dim {u.text_dim}, "
          f"clip_img_dim {u.clip_img_dim}; {repeat} repeats", flush=True)

    for b in (1, 2):
        add("U-ViT forward", f"batch {b}", 1e3 * bench_forward(model, b, repeat, device), "ms")

    for b in (1, 4):
        two = bench_guidance_step(model, b, p.solver_steps, False, repeat, device)
        add("guided step", f"B={b} two-pass (2 fwd at batch {b})", 1e3 * two, "ms/step")
        one = bench_guidance_step(model, b, p.solver_steps, True, repeat, device)
        add("guided step", f"B={b} batched (1 fwd at batch {2 * b})", 1e3 * one, "ms/step", two / one)

    model_dir = make_model_dir(workdir / p.name, p.uvit)
    seconds, pipe = bench_i2t(model_dir, p.i2t_steps, repeat, device)
    add("i2t latents", f"{N_IMAGES} images, {p.i2t_steps} steps, scale {GUIDANCE_SCALE:g}", N_IMAGES / seconds,
        "latents/s")
    print(f"  (pipeline U-ViT: text_dim {pipe.config.uvit.text_dim}, clip_img_dim "
          f"{pipe.config.uvit.clip_img_dim}, {pipe.config.resolution}px images -> "
          f"{pipe.config.latent_size}x{pipe.config.latent_size} latent)", flush=True)

    dec_cfg = CaptionDecoderConfig(vocab_size=len(tokenizer), **p.decoder)
    decoder = init_caption_decoder(dec_cfg, tokenizer, seed=0).to(device)
    print(f"  caption decoder {n_params(decoder)} params: {dec_cfg.n_layer} layers x {dec_cfg.n_embd}, "
          f"hidden_dim {dec_cfg.hidden_dim}, vocab {len(tokenizer)}", flush=True)
    bench_captions(decoder, 2, True, 1, device)  # warm-up, both code paths
    bench_captions(decoder, 2, False, 1, device)
    for n in CAPTION_LENGTHS:
        setting = f"beam {BEAM}, batch {CAPTION_BATCH}, max {n} tokens"
        slow, steps_slow = bench_captions(decoder, n, False, repeat, device)
        add("captions no cache", f"{setting} ({steps_slow} steps)", CAPTION_BATCH / slow, "captions/s")
        fast, steps_fast = bench_captions(decoder, n, True, repeat, device)
        add("captions KV cache", f"{setting} ({steps_fast} steps)", CAPTION_BATCH / fast, "captions/s", slow / fast)
    return rows


# -- report -----------------------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    lines = ["| config | measurement | setting | result | speed-up | other load (cores) |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else ""
        lines.append(f"| {r['config']} | {r['measurement']} | {r['setting']} | {r['value']:.2f} {r['unit']} "
                     f"| {speedup} | {r['other_load']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,mid", help="comma-separated presets: " + ", ".join(PRESETS))
    ap.add_argument("--repeat", type=int, default=10, help="timed runs per figure (mid runs 20%% of them)")
    add_common_args(ap)
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        ap.error(f"unknown config(s): {', '.join(unknown)} (choose from {', '.join(PRESETS)})")
    device = apply_common_args(args)

    info = machine_info(device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("note: random-init caption decoders (practically) never emit EOS, so beams run to max length: the worst "
          "case; '(N steps)' in the caption rows is how many decoding steps each call ran")
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(Path(tmp) / "tokenizer")
        for name in names:
            repeat = max(1, round(args.repeat * PRESETS[name].repeat_scale))
            rows += run_preset(PRESETS[name], repeat, device, tokenizer, Path(tmp))
    report(markdown_table(rows), info, start, args, rows)

if __name__ == "__main__":
    main()
