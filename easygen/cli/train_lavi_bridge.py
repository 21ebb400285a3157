"""``easygen train-lavi-bridge``: train LaVi-Bridge's adapter and LoRAs on its own bases (SD1.x U-Net or
PixArt, with Llama-2 or T5) as its training scripts do, and write its released layout. Import-light."""
from __future__ import annotations

import argparse

from bidiffuser.cliutil import positive_int

COMBOS = ["llama2_unet", "t5_unet", "t5_transformer"]  # drawing.lavi_bridge.COMBOS


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train-lavi-bridge", help="train LaVi-Bridge (adapter + LoRA) on its own bases",
                       description="Launch with torchrun --nproc_per_node=N (or plain python for one process). "
                                   "Rerunning the same command resumes from the last complete checkpoint. "
                                   "Defaults are the recipe of LaVi-Bridge's train/*.py "
                                   "(docs/lavi-bridge-training.md).")
    p.add_argument("--combo", required=True, choices=COMBOS, help="which released combo to train")
    p.add_argument("--data", required=True, metavar="TSV", help="captions TSV: image_path<TAB>caption per line")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for adapter/, lora_vis.pt, lora_text.pt and the named safetensors")
    p.add_argument("--diffusion", required=True, metavar="DIR",
                   help="the diffusers folder of the base: stable-diffusion-v1-4 (U-Net combos) or PixArt-XL-2-512x512")
    p.add_argument("--text-model", required=True, metavar="DIR",
                   help="the transformers folder of the language model: t5-large or Llama-2-7b-hf")
    p.add_argument("--image-root", metavar="DIR", help="relative image paths start here (default: the TSV's folder)")
    p.add_argument("--resolution", type=positive_int, default=512, help="training image size (default 512)")
    p.add_argument("--lora-rank", type=positive_int, default=32, help="LoRA rank (default 32, the scripts')")
    p.add_argument("--no-text-lora", action="store_true",
                   help="keep the language model frozen (lora_text.pt is then written as zeros)")
    p.add_argument("--adapter-int-dim", type=positive_int, metavar="N",
                   help="the adapter's middle width (default (LM width + vision text width) / 2, as released)")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="dropout of the LoRA layers and the adapter (default 0.1, the scripts')")
    p.add_argument("--lr", type=float, help="vision LoRA and adapter (default 1e-4; t5_transformer 2e-5)")
    p.add_argument("--lm-lr", type=float, default=5e-6, help="language-model LoRA (default 5e-6)")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="linear warm-up steps before the constant lr (default 0: the scripts' 500 are ignored "
                        "by diffusers' constant schedule)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="per process (default 1, the scripts')")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=positive_int, default=1)
    p.add_argument("--save-every", type=positive_int, default=500, help="checkpoint interval in steps")
    p.add_argument("--keep-last", type=positive_int, default=2, help="checkpoints kept")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--run-dir", help="checkpoints folder (default OUT/checkpoints)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="leave malformed rows out (and count them) instead of stopping at the first")
    return p


def run(args) -> int:
    from drawing.lavi_train import LaviTrainConfig, train_lavi

    cfg = LaviTrainConfig(
        combo=args.combo, data=args.data, out=args.out, diffusion=args.diffusion, text_model=args.text_model,
        image_root=args.image_root, resolution=args.resolution, lora_rank=args.lora_rank,
        text_lora=not args.no_text_lora, adapter_int_dim=args.adapter_int_dim, dropout=args.dropout, lr=args.lr,
        lm_lr=args.lm_lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm, batch_size=args.batch_size, steps=args.steps, epochs=args.epochs,
        save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every, seed=args.seed,
        device=args.device, run_dir=args.run_dir, skip_bad_rows=args.skip_bad_rows)
    train_lavi(cfg)
    return 0
