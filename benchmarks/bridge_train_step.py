"""Seconds per optimizer step of bridge training stage "t2i" at EasyGen's real size, on random weights:
the 7B ``diffllama`` LLM (bf16, loaded through EasyGen's builder) as the frozen text model, ELLA's
timestep-aware resampler (width 768, 6 blocks) reading its last hidden state, rank-32 LoRA on the
U-ViT v1 (952M) qkv/proj/fc1/fc2, the diffusion objective at 512 px, batch 1, bfloat16 autocast.

    python benchmarks/bridge_train_step.py --workdir /data/easygen-dry-run              # real size
    python benchmarks/bridge_train_step.py --size reduced --workdir /tmp/dry-run        # seconds (CI test)

The weights are benchmarks/real_size.py's (the same WORKDIR: written once, by a child process so
that this process's peak memory is the training's alone); a captions TSV of a few pictures with
~30-word captions is written under WORKDIR/bridge_train_data. Every step runs the LLM over the
caption (``encode_once`` off), the VAE and CLIP image encoder over the picture, the bridge and the
LoRA'd U-ViT forward and backward, and AdamW on the bridge and the LoRA matrices. Prints the bridge's
parameters, the trainable parameters, seconds per optimizer step (the first, warm-up, left out when
there is more than one), the process's peak RSS (getrusage; the LLM load included), the peak during
train_bridge alone (VmHWM reset after the LLM load) and the LLM / U-ViT / bridge resident bytes. It
reports, it never asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_size  # noqa: E402
from real_size import GIB, LORA_RANK, SIZES, dir_bytes  # noqa: E402

CAPTIONS = [
    ("red", "ellipse", "A bright red ellipse sits in the middle of a plain white background, its smooth curved edge "
                       "sharp and clean, with nothing else in the picture but empty space around the shape."),
    ("blue", "rectangle", "A deep blue rectangle fills the centre of a white square canvas, drawn flat without any "
                          "shading, texture or outline, like a simple geometric icon on a blank page."),
    ("green", "triangle", "One green triangle points upward on a white background; its three straight sides meet in "
                          "sharp corners and the colour is even everywhere, with no shadow or border."),
    ("orange", "ellipse", "An orange circle rests in the middle of an otherwise empty white picture, flat and evenly "
                          "coloured, looking like a plain sticker or a child's drawing of the sun."),
]


def write_pictures(data: Path, side: int) -> Path:
    """A few ``side`` px pictures and a captions TSV (image_path<TAB>caption) naming them."""
    from PIL import Image, ImageDraw

    data.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (colour, shape, caption) in enumerate(CAPTIONS):
        path = data / f"{k}-{colour}-{shape}.png"
        if not path.exists():
            image = Image.new("RGB", (side, side), "white")
            box = [side // 4, side // 4, 3 * side // 4, 3 * side // 4]
            draw = ImageDraw.Draw(image)
            if shape == "ellipse":
                draw.ellipse(box, fill=colour)
            elif shape == "rectangle":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(side // 2, side // 4), (3 * side // 4, 3 * side // 4), (side // 4, 3 * side // 4)],
                             fill=colour)
            image.save(path)
        lines.append(f"{path.name}\t{caption}")
    tsv = data / "captions.tsv"
    tsv.write_text("image_path\tcaption\n" + "\n".join(lines) + "\n")
    return tsv


def ensure_weights(work: Path, size_name: str) -> float:
    """real_size.py's BiDiffuser and diffllama directories, written by a child process when missing;
    returns the seconds that took (0 when they were there)."""
    if (work / "bidiffuser" / "bidiffuser.json").exists() and (work / "diffllama" / "config.json").exists():
        return 0.0
    t0 = time.perf_counter()
    code = ("import sys; from pathlib import Path; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/benchmarks']; "
            "import real_size as r; s = r.SIZES[sys.argv[2]]; w = Path(sys.argv[3]); "
            "r.write_bidiffuser(w / 'bidiffuser', s); r.write_llm(w / 'diffllama', s)")
    subprocess.run([sys.executable, "-c", code, str(ROOT), size_name, str(work)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def count(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="real")
    ap.add_argument("--workdir", type=Path, required=True, help="where the weights are written (reused)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3; the first is the warm-up)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    size = SIZES[args.size]
    work = args.workdir

    from bidiffuser import train_bridge as tb
    from bidiffuser.train_bridge import BridgeTrainConfig, train_bridge
    from easygen.builder import load_pretrained
    from easygen.profiling import module_bytes, peak_rss_bytes, reset_peak_rss

    written = ensure_weights(work, args.size)
    tsv = write_pictures(work / "bridge_train_data", size.resolution)
    out = work / "bridge_train"
    shutil.rmtree(out, ignore_errors=True)  # train_bridge resumes from OUT/checkpoints: start afresh

    t0 = time.perf_counter()
    loaded = load_pretrained(work / "diffllama", device=args.device, dtype="bfloat16", load_bidiffuser=False)
    llm = loaded.model.eval().requires_grad_(False)
    load_s = time.perf_counter() - t0

    bridge = real_size.bridge_config(size, real_size.read_config(work / "bidiffuser").uvit)
    cfg = BridgeTrainConfig(model=str(work / "bidiffuser"), data=str(tsv), out=str(out),
                            text_model=str(work / "diffllama"), stage="t2i", preset="ella",
                            width=bridge.width, depth=bridge.depth, heads=bridge.heads,
                            uvit_lora_rank=LORA_RANK, steps=args.steps, batch_size=1, dtype="bfloat16",
                            encode_once=False, device=args.device, log_every=1, save_every=10 ** 9, keep_last=1,
                            seed=0)

    captured = {}
    original = tb._build

    def build(*a, **k):  # the trainee, to read its sizes (train_bridge keeps it to itself)
        result = original(*a, **k)
        captured["trainee"] = result[0]
        return result

    tb._build = build
    # the training's own high-water mark too (Linux: VmHWM reset after the LLM load; else None)
    train_peak_known = reset_peak_rss()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        train_bridge(cfg, text_model=(llm, loaded.tokenizer))
        train_s = time.perf_counter() - t0
    finally:
        tb._build = original
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train_peak = peak_rss_bytes() if train_peak_known else None
    cuda_peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None

    trainee = captured["trainee"]
    log = [json.loads(line) for line in (out / "checkpoints" / "log.jsonl").read_text().splitlines()]
    per_step = [cfg.batch_size / r["samples_per_s"] for r in log]
    timed = per_step[1:] if len(per_step) > 1 else per_step
    result = {
        "size": args.size, "device": args.device, "steps": args.steps,
        "bridge_config": bridge.to_dict(), "uvit_lora_rank": LORA_RANK,
        "bridge_parameters": count(trainee.bridge),
        "uvit_lora_parameters": count(trainee.uvit, trainable_only=True),
        "trainable_parameters": count(trainee, trainable_only=True),
        "seconds_per_step": sum(timed) / len(timed), "step_seconds": per_step,
        "warmup_excluded": len(per_step) > 1,
        "peak_rss_bytes": peak, "train_peak_rss_bytes": train_peak, "cuda_peak_bytes": cuda_peak,
        "resident_bytes": {"llm": module_bytes(llm), "uvit": module_bytes(trainee.uvit),
                           "bridge": module_bytes(trainee.bridge)},
        "llm_load_s": load_s, "train_s": train_s, "weights_written_s": written,
        "disk_bytes": {name: dir_bytes(work / name) for name in ("bidiffuser", "diffllama")},
        "losses": [r["loss"] for r in log], "out": str(out),
    }
    r = result
    print(f"bridge: {r['bridge_parameters']:,} parameters ({bridge.kind}, width {bridge.width}, depth {bridge.depth}, "
          f"{bridge.lm_dim}-d LLM states -> {bridge.num_tokens} x {bridge.text_dim}); U-ViT LoRA rank {LORA_RANK}: "
          f"{r['uvit_lora_parameters']:,} parameters")
    print(f"trainable parameters: {r['trainable_parameters']:,}")
    print(f"seconds per optimizer step: {r['seconds_per_step']:.2f} (batch 1, {args.device}, bfloat16; "
          f"{'first step left out as warm-up' if r['warmup_excluded'] else 'one step: warm-up included'}; "
          f"steps: {', '.join(f'{s:.2f}' for s in per_step)})")
    res = r["resident_bytes"]
    print(f"peak RSS: {peak / GIB:.2f} GiB; resident weights: LLM {res['llm'] / GIB:.2f} GiB, "
          f"U-ViT {res['uvit'] / GIB:.2f} GiB, bridge {res['bridge'] / GIB:.3f} GiB")
    print("peak RSS during train_bridge (after the LLM load): "
          + (f"{train_peak / GIB:.2f} GiB" if train_peak else "n/a (no /proc/self/clear_refs)")
          + (f"; CUDA peak allocated {cuda_peak / GIB:.2f} GiB" if cuda_peak is not None else ""))
    print(f"LLM load {load_s:.1f} s, train_bridge {train_s:.1f} s (BiDiffuser and U-ViT load, {args.steps} steps, "
          f"bridge written)" + (f"; weights written in {written:.0f} s" if written else ""))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
