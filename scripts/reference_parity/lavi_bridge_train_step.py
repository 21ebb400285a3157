"""Two optimizer steps of ``easygen train-lavi-bridge`` (drawing.lavi_train) against the loop body of
LaVi-Bridge's own ``train/t5_unet.py``, from the same starting weights on the same batch. Run by hand
(not in CI) with the reference environment's python (diffusers 0.24.0, transformers 4.38.0):

    .venv/bin/python -m drawing.tiny_layouts_lavi /tmp/lavi_tiny
    REF/bin/python scripts/reference_parity/lavi_bridge_train_step.py --reference-repo LaVi-Bridge \
        --tiny-dir /tmp/lavi_tiny

Our side runs first in our environment (``--our-python``): it builds the trainee as a run does (seed 0),
writes its starting LoRA lists and adapter, takes two steps on a fixed batch and writes the result.
The reference side then injects cloneofsimo-lora's trainable LoRA from those lists
(``inject_trainable_lora_extended(..., loras=...)``), builds the script's optimizer and scheduler,
and runs the script's loop body. ``PATCH`` marks where the reference is changed: the tiny folders,
the latents/noise/timesteps handed in instead of drawn (the draws differ by design), and every
dropout off on both sides (different random streams otherwise). Prints the losses and how far the
trained weights are apart, next to how far they moved.

Expect a few "mostly_off" tensors on the tiny U-Net: the ``time_emb_proj`` LoRA of its 32-channel
ResnetBlocks, whose true gradient is exactly zero (GroupNorm with 32 groups of one channel removes
the per-channel shift time_emb_proj adds), so both sides' Adam moves them by rounding noise alone;
elsewhere a few elements per thousand whose gradient is at rounding level go either way.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red circle", "a blue square on the city"]
STEPS = 2


def ours(tiny: Path, work: Path) -> None:
    """Our environment: the starting weights, the batch, and our two steps."""
    sys.path.insert(0, str(REPO))
    from drawing.lavi_lora import positional_list
    from drawing.lavi_train import LaviTrainConfig, _optimizer, build

    cfg = LaviTrainConfig(combo="t5_unet", data="", out="", diffusion=str(tiny / "stable-diffusion-v1-4"),
                          text_model=str(tiny / "t5-large"), dropout=0.0).resolved()
    torch.manual_seed(0)
    parts = build(cfg, torch.device("cpu"))
    t = parts.trainee
    t.lm.eval()  # T5's own dropout off (both sides)
    lists = lambda: {"vis": positional_list(t.vis, parts.vis_sites, torch.float32),  # noqa: E731
                     "text": positional_list(t.lm, parts.text_sites, torch.float32)}
    start = {k: [x.clone() for x in v] for k, v in lists().items()}
    torch.save([torch.nn.Parameter(x) for x in start["vis"]], work / "init_vis.pt")
    torch.save([torch.nn.Parameter(x) for x in start["text"]], work / "init_text.pt")
    torch.save(dict(t.adapter.state_dict()), work / "init_adapter.pt")
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(2, 4, 4, 4, generator=g), "noise": torch.randn(2, 4, 4, 4, generator=g),
             "timesteps": torch.tensor([10, 700])}
    torch.save(batch, work / "batch.pt")

    optimizer = _optimizer(parts, cfg)
    params = [p for p in t.parameters() if p.requires_grad]
    losses = []
    for _ in range(STEPS):
        loss = t(CAPTIONS, batch["latents"], batch["noise"], batch["timesteps"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    names = {"vis": [f"{site.name}.{w}" for site in parts.vis_sites for w in ("up", "down")],
             "text": [f"{site.name}.{w}" for site in parts.text_sites for w in ("up", "down")]}
    torch.save({**lists(), "adapter": dict(t.adapter.state_dict()), "losses": losses,
                "start": start, "names": names}, work / "ours.pt")


def reference(ref: Path, tiny: Path, work: Path) -> dict:
    """The loop body of train/t5_unet.py on the same start and batch."""
    import itertools

    import torch.nn.functional as F
    sys.path.insert(0, str(ref))
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401 (the script's)
    from diffusers.optimization import get_scheduler
    from transformers import AutoTokenizer, T5EncoderModel
    from modules.adapters import TextAdapter
    from modules.lora import extract_lora_ups_down, inject_trainable_lora_extended

    VIS_REPLACE_MODULES = {"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"}
    TEXT_ENCODER_REPLACE_MODULES = {"T5Attention"}
    sd14 = tiny / "stable-diffusion-v1-4"                       # PATCH: hub names in the script
    vis = UNet2DConditionModel.from_pretrained(sd14, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(sd14, subfolder="scheduler")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "t5-large")
    text_encoder = T5EncoderModel.from_pretrained(tiny / "t5-large")
    adapter = TextAdapter(32, 32, 32)                            # PATCH: (1024, 896, 768) at the real sizes
    adapter.load_state_dict(torch.load(work / "init_adapter.pt", weights_only=True))  # PATCH: our starting weights
    vis.requires_grad_(False)
    text_encoder.requires_grad_(False)
    vis_lora_params, _ = inject_trainable_lora_extended(vis, r=32, target_replace_module=VIS_REPLACE_MODULES,
                                                        loras=str(work / "init_vis.pt"))  # PATCH: start weights
    text_encoder_lora_params, _ = inject_trainable_lora_extended(
        text_encoder, r=32, target_replace_module=TEXT_ENCODER_REPLACE_MODULES, loras=str(work / "init_text.pt"))
    for m in itertools.chain(vis.modules(), text_encoder.modules(), adapter.modules()):
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0                                            # PATCH: dropout off (ours too)
    params_to_optimize = ([
        {"params": itertools.chain(*vis_lora_params), "lr": 1e-4},
        {"params": itertools.chain(*text_encoder_lora_params), "lr": 5e-6},
        {"params": adapter.parameters(), "lr": 1e-4},
    ])
    optimizer = torch.optim.AdamW(params_to_optimize, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=500, num_training_steps=1000)
    vis.train()
    text_encoder.eval()                                          # PATCH: train() (T5's dropout; off on both sides)
    adapter.train()
    batch = torch.load(work / "batch.pt", weights_only=True)
    losses = []
    for _ in range(STEPS):
        latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]  # PATCH: handed in
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        text_input = tokenizer(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt",
                               truncation=True).input_ids
        encoder_hidden_states_pre = text_encoder(text_input)[0]
        encoder_hidden_states = adapter(encoder_hidden_states_pre).sample
        model_pred = vis(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        params_to_clip = (itertools.chain(vis.parameters(), text_encoder.parameters(), adapter.parameters()))
        torch.nn.utils.clip_grad_norm_(params_to_clip, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    flat = lambda model, targets: [w for up, down in extract_lora_ups_down(model, targets)  # noqa: E731
                                   for w in (up.weight.detach(), down.weight.detach())]
    return {"vis": flat(vis, VIS_REPLACE_MODULES), "text": flat(text_encoder, TEXT_ENCODER_REPLACE_MODULES),
            "adapter": dict(adapter.state_dict()), "losses": losses, "lr": lr_scheduler.get_last_lr()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference-repo")
    ap.add_argument("--tiny-dir", required=True)
    ap.add_argument("--our-python", default=str(REPO / ".venv" / "bin" / "python"))
    ap.add_argument("--ours-into", help=argparse.SUPPRESS)  # internal: our side, run in our environment
    args = ap.parse_args()
    torch.set_num_threads(1)
    tiny = Path(args.tiny_dir).resolve()
    if args.ours_into:
        ours(tiny, Path(args.ours_into))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([args.our_python, __file__, "--tiny-dir", str(tiny), "--ours-into", str(work)], cwd=REPO,
                       check=True)
        mine = torch.load(work / "ours.pt", weights_only=True)
        theirs = reference(Path(args.reference_repo).resolve(), tiny, work)
    report = {"losses": {"ours": mine["losses"], "reference": theirs["losses"]}, "reference_lr": theirs["lr"]}
    for part in ("vis", "text", "adapter"):
        a = mine[part] if part != "adapter" else list(mine[part].values())
        b = theirs[part] if part != "adapter" else [theirs[part][k] for k in mine[part]]
        start = mine["start"][part] if part != "adapter" else None
        assert len(a) == len(b), (part, len(a), len(b))
        offs = [((x - y).abs() > 1e-7 + 1e-3 * y.abs()).float().mean().item() for x, y in zip(a, b)]
        off = sum(round(f * x.numel()) for f, x in zip(offs, a))
        names = mine["names"][part] if part != "adapter" else list(mine[part])
        report[part] = {"tensors": len(a), "max_abs_diff": max((x - y).abs().max().item() for x, y in zip(a, b)),
                        "elements": sum(x.numel() for x in a), "off_by_more_than_1e-3_relative": off,
                        "moved_max": (max((x - s).abs().max().item() for x, s in zip(a, start))
                                      if start is not None else None),
                        "mostly_off": [names[i] for i, f in enumerate(offs) if f > 0.5]}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
