"""``bidiffuser`` command line: init / assemble a model directory, sample in any UniDiffuser mode,
fine-tune the U-ViT (``train``, under torchrun for several processes)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .cliutil import add_device_args, positive_int, progress_bar, resolve_device, run_main, torch_dtype
from .errors import BiDiffuserError
from .modes import MODE_HELP, MODES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bidiffuser", description="BiDiffuser (UniDiffuser-v1) diffusion tools")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="write a random-initialised model directory (official file formats)")
    s.add_argument("out", type=Path, help="directory to create")
    s.add_argument("--preset", choices=["tiny"], default="tiny",
                   help="network sizes (only 'tiny': real sizes come from the official weights via assemble)")
    s.add_argument("--resolution", type=positive_int, default=32, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("assemble", help="make a model directory from the official UniDiffuser-v1 downloads")
    s.add_argument("out", type=Path, help="directory to create")
    s.add_argument("--uvit", required=True, help="uvit_v1.pth (or EasyGen's uvit_bi.pth)")
    s.add_argument("--caption-decoder", required=True, help="caption_decoder.pth")
    s.add_argument("--autoencoder", required=True, help="autoencoder_kl.pth")
    s.add_argument("--clip-image", required=True,
                   help="CLIP ViT-B/32: a transformers directory or OpenAI's ViT-B-32.pt")
    s.add_argument("--clip-text", required=True, help="CLIP ViT-L/14: a transformers directory (with tokenizer)")
    s.add_argument("--gpt2-tokenizer", required=True, help="the GPT-2 tokenizer directory")
    s.add_argument("--copy", action="store_true", help="copy the files instead of symlinking them")

    s = sub.add_parser("sample", help="sample in one of the seven UniDiffuser modes")
    s.add_argument("--model", required=True, type=Path, help="BiDiffuser model directory")
    s.add_argument("--mode", required=True, choices=MODES, help=MODE_HELP)
    s.add_argument("--prompt", action="append", help="text prompt (t2i, t2i2t); may repeat")
    s.add_argument("--image", action="append", help="input image (i2t, i2t2i); may repeat")
    s.add_argument("--steps", type=positive_int, default=None,
                   help="DPM-Solver++ steps (default: the model directory's sampling_defaults, else 50)")
    s.add_argument("--scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the model directory's sampling_defaults, else 7)")
    s.add_argument("--seed", type=int, default=1234, help="random seed (same seed, same output)")
    s.add_argument("--n-samples", type=positive_int, default=1, help="samples per prompt or image (every mode)")
    s.add_argument("--out", type=Path, default=Path("out"), help="directory for PNG outputs (default ./out)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--bridge", type=Path, help="a bridge directory: t2i draws from a language model's hidden "
                                               "states (prompts of any length) instead of CLIP's tokens")
    s.add_argument("--text-model", help="the bridge's language model (a transformers directory; default: the one "
                                        "the bridge was trained with), loaded in --dtype")
    s.add_argument("--draw-with", choices=["bridge", "clip"], default=None,
                   help="with --bridge: draw through it (default) or through CLIP as without one")
    add_device_args(s)

    s = sub.add_parser("train", help="train the U-ViT on captions, EasyGen's or UniDiffuser's objective "
                                     "(torchrun: DDP/FSDP)",
                       description="Train the U-ViT of a BiDiffuser directory on image-caption pairs with "
                                   "EasyGen's objective (image clean, text noised; the default) or UniDiffuser's "
                                   "joint one (both noised at independent timesteps) and write a new directory. "
                                   "Launch under torchrun for several processes; a rerun resumes from the last "
                                   "complete checkpoint.")
    s.add_argument("--model", required=True, help="BiDiffuser directory to start from")
    s.add_argument("--data", required=True, help="captions TSV: image_path<TAB>caption per line")
    s.add_argument("--image-root", help="folder that relative image paths start from (default: the TSV's folder)")
    s.add_argument("--out", required=True, help="the new BiDiffuser directory to write")
    s.add_argument("--run-dir", help="checkpoints and log.jsonl (default: OUT/checkpoints)")
    length = s.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="optimizer steps (instead of --epochs)")
    length.add_argument("--epochs", type=positive_int, default=1, help="passes over the data (default 1)")
    s.add_argument("--batch-size", type=positive_int, default=4, help="micro-batch per process (default 4)")
    s.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step (default 1)")
    s.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default 1e-5; bridge: 1e-4)")
    s.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warm-up share of the steps (default 0.03)")
    s.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                   help="after warm-up: cosine decay to 0 (default), or constant as in UniDiffuser's training")
    s.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    s.add_argument("--max-grad-norm", type=float, default=None,
                   help="gradient clipping (default 0: none; bridge: 1)")
    s.add_argument("--objective", choices=["easygen", "unidiffuser"], default="easygen",
                   help="easygen: image-to-text fine-tuning (default); unidiffuser: the joint objective, "
                        "for training a network from scratch")
    s.add_argument("--t2i-weight", type=float, default=0.0,
                   help="weight of the text-to-image loss (text clean, image noised; default 0: off)")
    s.add_argument("--t2i-data", default=None, metavar="TSV",
                   help="captions TSV whose pairs train the text-to-image term (default: the --data pairs), e.g. "
                        "the kind of pictures the model should draw")
    s.add_argument("--t2i-uncond", type=float, default=0.0, metavar="P",
                   help="share of text-to-image rows trained unconditionally (text = UniDiffuser's true-uncond "
                        "noise), so guidance has a trained branch; e.g. 0.1 (default 0)")
    s.add_argument("--snr-gamma", type=float, default=None,
                   help="Min-SNR-gamma loss weighting, e.g. 5 (default: off, plain MSE)")
    s.add_argument("--ema-decay", type=float, default=None,
                   help="EMA decay (default 0.9999; bridge: no EMA unless given); the EMA weights are written")
    s.add_argument("--no-ema", action="store_true", help="keep no EMA and write the raw weights")
    s.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun: DDP, or FSDP2 sharding per U-ViT block (default ddp)")
    s.add_argument("--save-every", type=positive_int, default=500, help="optimizer steps between checkpoints")
    s.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (default 2; 0 keeps all)")
    s.add_argument("--log-every", type=positive_int, default=10, help="optimizer steps between log.jsonl records")
    s.add_argument("--seed", type=int, default=42, help="data order and noise (default 42)")
    s.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute block activations in backward (bridge: its blocks, the U-ViT's and a LoRA'd LM's)")
    s.add_argument("--skip-bad-rows", action="store_true", help="skip malformed TSV rows (counted) instead of failing")
    s.add_argument("--copy", action="store_true", help="copy the unchanged components into OUT instead of symlinking")
    b = s.add_argument_group("LLM bridge (--bridge-stage): OUT is a bridge directory, the U-ViT stays as it is")
    b.add_argument("--bridge-stage", choices=["distill", "t2i"],
                   help="distill: match the CLIP path's text latents (images unused); t2i: the diffusion "
                        "objective through the U-ViT with LoRA")
    b.add_argument("--text-model", help="the language model: a transformers directory (or an EasyGen model)")
    b.add_argument("--bridge-init", dest="init", help="a bridge directory to start from (stage t2i: distill's OUT)")
    b.add_argument("--bridge-preset", dest="preset", choices=["lavi-bridge", "ella"],
                   help="published settings; flags given explicitly win")
    b.add_argument("--bridge-kind", dest="kind", choices=["resampler", "per_token"], help="default resampler")
    b.add_argument("--no-timestep-aware", dest="timestep_aware", action="store_false", default=None,
                   help="a resampler without AdaLN on the image timestep")
    b.add_argument("--bridge-width", dest="width", type=positive_int, help="resampler width (default 768)")
    b.add_argument("--bridge-depth", dest="depth", type=positive_int, help="resampler blocks (default 6)")
    b.add_argument("--bridge-heads", dest="heads", type=positive_int, help="resampler heads (default 8)")
    b.add_argument("--bridge-layer", dest="layer", type=int, help="LM hidden state: -1 last (default), -2 ...")
    b.add_argument("--bridge-max-length", dest="max_length", type=positive_int, help="LM tokens read (default 128)")
    b.add_argument("--uvit-lora-rank", type=int, help="stage t2i: LoRA rank on qkv/proj/fc1/fc2 (default 32; 0: none)")
    b.add_argument("--lm-lora-rank", type=int, help="stage t2i: LoRA on the LM's attention (default 0: LM frozen)")
    b.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 32: scale 1 at rank 32)")
    b.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.1)")
    b.add_argument("--lm-lr", type=float, help="learning rate of the LM's LoRA (default 5e-6)")
    b.add_argument("--distill-teacher", choices=["same", "first"], default=None,
                   help="stage distill: CLIP reads the row's own caption (same: GILL's), or the first caption of "
                        "the row's image in the TSV (first: for descriptions longer than CLIP's context)")
    b.add_argument("--uncond-prob", type=float, default=None,
                   help="stage t2i: share of rows whose text is the true-uncond noise (default 0.1)")
    s.add_argument("--encode-once", action="store_true",
                   help="encode every image and caption once before training and keep them in memory (small "
                        "data sets: saves the frozen encoders' work in every step; same results)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; one GPU per process)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the U-ViT and the frozen encoders (bridge: and the text model's "
                        "weights); trained weights, optimizer state and EMA stay float32")
    # the bridge group's flags (all but --bridge-stage): refused without --bridge-stage, where they do nothing
    s.set_defaults(bridge_flags=[(a.dest, a.option_strings[0]) for a in b._group_actions if a.dest != "bridge_stage"])
    return p


def _train(args) -> int:
    import dataclasses

    from .train import TrainConfig, train

    if args.device is not None:
        resolve_device(args.device)  # a clear error for an unknown or missing device
    if args.bridge_stage:
        return _train_bridge(args)
    _refuse(args, [dest for dest, _ in args.bridge_flags if getattr(args, dest) is not None],
            "{flags} {train} a bridge: give --bridge-stage (or leave {them} out)")
    given = lambda name: getattr(args, name) is not None  # noqa: E731  (unset: the dataclass default)
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                if hasattr(args, f.name) and (given(f.name) or f.name not in ("lr", "max_grad_norm", "ema_decay"))}
    ema_decay = None if args.no_ema else args.ema_decay if args.ema_decay is not None else 0.9999
    train(TrainConfig(**{**settings, "ema_decay": ema_decay}))
    return 0


def _refuse(args, dests: list[str], message: str) -> None:
    """One line naming the flags (``message`` has {flags}; {train}/{them}/{belong} agree with how many)."""
    if not dests:
        return
    names = dict(args.bridge_flags) | {"snr_gamma": "--snr-gamma"}
    one = len(dests) == 1
    raise BiDiffuserError(message.format(flags=", ".join(names[d] for d in dests), train="trains" if one else "train",
                                         them="it" if one else "them", belong="belongs" if one else "belong"))


# Flags of stage t2i only, and those that shape a new bridge (an init bridge brings its own shape).
_T2I_ONLY = ("uvit_lora_rank", "lm_lora_rank", "lora_alpha", "lora_dropout", "lm_lr", "uncond_prob", "snr_gamma")
_SHAPE = ("kind", "timestep_aware", "width", "depth", "heads", "layer", "max_length")


def _refuse_unused_bridge_flags(args, cfg) -> None:
    """Every flag given to a bridge run acts on it; the others are refused (``cfg``: the run, resolved)."""
    from .bridge import read_bridge

    if args.copy:
        raise BiDiffuserError("--copy writes a BiDiffuser directory's components; with --bridge-stage OUT is a "
                              "bridge directory (nothing to copy): leave it out")
    given = [dest for dest, _ in args.bridge_flags if getattr(args, dest) is not None]
    given += ["snr_gamma"] if args.snr_gamma is not None else []
    if cfg.stage == "distill":
        _refuse(args, [d for d in given if d in _T2I_ONLY],
                "{flags} {belong} to --bridge-stage t2i (distillation trains the bridge alone): leave {them} out")
    elif "distill_teacher" in given:
        _refuse(args, ["distill_teacher"], "{flags} {belong} to --bridge-stage distill: leave {them} out")
    if cfg.init:
        _refuse(args, [d for d in given if d in _SHAPE],
                "{flags}: the bridge's shape comes from --bridge-init: leave {them} out")
    if cfg.stage != "t2i":
        return
    init = read_bridge(cfg.init) if cfg.init else None
    kept = {"uvit_lora_rank": init is not None and init.uvit_lora, "lm_lora_rank": init is not None and init.lm_lora}
    _refuse(args, [d for d in kept if d in given and kept[d]],
            "{flags}: the --bridge-init bridge's LoRA trains on at its own rank: leave {them} out")
    new = (cfg.uvit_lora_rank and not kept["uvit_lora_rank"]) or (cfg.lm_lora_rank and not kept["lm_lora_rank"])
    if not new:
        _refuse(args, [d for d in ("lora_alpha", "lora_dropout") if d in given],
                "{flags} set up a new LoRA, and this run starts none: leave {them} out")
    if not (cfg.lm_lora_rank or kept["lm_lora_rank"]) and "lm_lr" in given:
        _refuse(args, ["lm_lr"], "{flags} is the LM LoRA's learning rate, and no LM LoRA trains in this run "
                                 "(--lm-lora-rank): leave {them} out")


def _train_bridge(args) -> int:
    import dataclasses

    from .train_bridge import BridgeTrainConfig, train_bridge

    if not args.text_model:
        raise BiDiffuserError("--bridge-stage needs --text-model (the language model the bridge reads)")
    unused = [flag for flag, on in (("--objective", args.objective != "easygen"), ("--t2i-weight", args.t2i_weight),
                                    ("--t2i-data", args.t2i_data), ("--t2i-uncond", args.t2i_uncond))
              if on]
    if unused:
        raise BiDiffuserError(f"{', '.join(unused)} train the U-ViT itself, not a bridge; leave them out")
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(BridgeTrainConfig)
                if hasattr(args, f.name)}
    settings["stage"] = args.bridge_stage
    settings["ema_decay"] = None if args.no_ema else args.ema_decay
    for name in ("max_grad_norm", "distill_teacher", "uncond_prob"):  # unset: the dataclass default
        if settings.get(name) is None:
            settings.pop(name)
    cfg = BridgeTrainConfig(**settings)
    _refuse_unused_bridge_flags(args, cfg.resolved())
    train_bridge(cfg)
    return 0


def _sample(args) -> int:
    from .images import load_image, save_png
    from .model_dir import SamplingDefaults
    from .pipeline import BiDiffuser

    needs_prompt, needs_image = args.mode in ("t2i", "t2i2t"), args.mode in ("i2t", "i2t2i")
    if needs_prompt and not args.prompt:
        raise BiDiffuserError(f"--mode {args.mode} needs --prompt")
    if needs_image and not args.image:
        raise BiDiffuserError(f"--mode {args.mode} needs --image")
    if args.prompt and not needs_prompt:
        raise BiDiffuserError(f"--prompt is not used by --mode {args.mode}")
    if args.image and not needs_image:
        raise BiDiffuserError(f"--image is not used by --mode {args.mode}")
    if any(not p.strip() for p in args.prompt or []):
        raise BiDiffuserError("--prompt is empty")

    if (args.text_model or args.draw_with) and not args.bridge:
        raise BiDiffuserError("--text-model and --draw-with go with --bridge")
    if args.bridge and args.mode != "t2i" and args.draw_with != "clip":
        raise BiDiffuserError(f"--bridge draws in --mode t2i (not {args.mode})")
    dtype = torch_dtype(args.dtype)
    pipe = BiDiffuser.from_pretrained(args.model, device=resolve_device(args.device), dtype=dtype,
                                      bridge=args.bridge, text_model=args.text_model, text_model_dtype=dtype)
    if args.image:  # fail on a bad image before loading any network; n samples of each image
        images = [im for im in (load_image(p) for p in args.image) for _ in range(args.n_samples)]
    update, close = progress_bar(f"{args.mode} sampling", disable=args.quiet)
    steps, scale = (pipe.config.sampling_defaults or SamplingDefaults()).for_mode(args.mode)
    common = dict(steps=args.steps or steps, seed=args.seed, progress=update)
    guided = dict(common, scale=scale if args.scale is None else args.scale)
    try:
        if args.mode == "t2i":
            out = pipe.text_to_image(args.prompt, n_samples=args.n_samples, draw_with=args.draw_with, **guided)
        elif args.mode == "t2i2t":
            out = pipe.text_variation(args.prompt, n_samples=args.n_samples, **guided)
        elif args.mode == "i2t":
            out = pipe.image_to_text(images, **guided)
        elif args.mode == "i2t2i":
            out = pipe.image_variation(images, **guided)
        elif args.mode == "joint":
            out = pipe.joint(n_samples=args.n_samples, **guided)
        elif args.mode == "i":
            out = pipe.image(n_samples=args.n_samples, **common)
        else:
            out = pipe.text(n_samples=args.n_samples, **common)
    finally:
        close()
    for i, text in enumerate(out.texts or []):
        print(f"text[{i}]: {text}")
    for i, image in enumerate(out.images or []):
        print(f"image[{i}]: {save_png(image, args.out / f'{args.mode}-{args.seed}-{i}.png')}")
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init":
        from .model_dir import init_tiny
        init_tiny(args.out, seed=args.seed, resolution=args.resolution)
        print(f"wrote a random tiny BiDiffuser directory to {args.out}")
        return 0
    if args.command == "assemble":
        from .model_dir import assemble
        assemble(args.out, uvit=args.uvit, caption_decoder=args.caption_decoder, autoencoder=args.autoencoder,
                 clip_image=args.clip_image, clip_text=args.clip_text, gpt2_tokenizer=args.gpt2_tokenizer,
                 copy=args.copy)
        print(f"wrote BiDiffuser directory {args.out}")
        return 0
    if args.command == "train":
        return _train(args)
    return _sample(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("bidiffuser", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
