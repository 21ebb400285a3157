"""Real-size dry run: random weights at EasyGen's true sizes, in the official file formats, then one
turn through ``easygen chat --prompt`` with memory and time per phase.

    python benchmarks/real_size.py --workdir /data/easygen-dry-run            # ~19 GB of disk
    python benchmarks/real_size.py --size reduced --workdir /tmp/dry-run       # seconds (CI test)
    python benchmarks/real_size.py --workdir /data/easygen-dry-run --bridge   # the picture through the bridge

Writes (skipped when already there, so a second run only measures):
  bidiffuser/  uvit_v1.pth (U-ViT v1, 952M, fp32 state dict), caption_decoder.pth (GPT-2 small +
               prefix layers, DDP "module." keys), autoencoder_kl.pth (SD KL-f8, LDM names),
               clip_image/ (CLIP ViT-B/32 vision tower, HF), clip_text/ (CLIP L/14 text tower, HF),
               gpt2_tokenizer/, bidiffuser.json
  diffllama/   config.json (model_type "diffllama", Vicuna-7B shape), pytorch_model-0000N-of-0000M.bin
               shards in fp16 with the projector under model.fastchat_proj.*, and LLaMA's
               tokenizer.model only (the real vocabulary, from tests/fixtures)
  bridge/      (--bridge) a bidiffuser bridge directory: ELLA's timestep-aware resampler reading the
               LLM's hidden size (width 768, 6 blocks; reduced: 32, 2), rank-32 LoRA on the U-ViT's
               qkv/proj/fc1/fc2 with random A and B (B is not zero, so the LoRA path computes)
Tokenizer vocabularies are padded to the real sizes (GPT-2 50258, CLIP 49408) with unused pieces.

Then runs, on CPU: a 512 px image -> features (--feature-steps) -> the 7B LLM in bf16 -> a reply
forced to end in a picture (--force-image) -> text-to-image at 512 px (--steps) -> PNG, with
``--profile``: seconds, peak resident memory and resident weight bytes per phase. Prints the table
and the largest peak-to-weights ratio; it reports, it never asserts. With ``--bridge`` the turn runs
with ``--bridge WORKDIR/bridge --draw-with bridge``: the "draw" phase then also holds the LLM's pass
over the description and the resampler at every denoising step, with the U-ViT's LoRA on.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from bidiffuser.autoencoder import AutoencoderConfig, build_autoencoder, official_state_dict as vae_state_dict  # noqa: E402
from bidiffuser.bridge import (BRIDGE_CONFIG, BRIDGE_WEIGHTS, UVIT_LORA, UVIT_LORA_TARGETS, Bridge,  # noqa: E402
                               BridgeConfig, LoraSettings, add_lora, lora_state_dict, save_bridge)
from bidiffuser.caption_decoder import (CaptionDecoderConfig, init_caption_decoder,  # noqa: E402
                                        official_state_dict as decoder_state_dict)
from bidiffuser.checkpoint import save_torch  # noqa: E402
from bidiffuser.model_dir import OFFICIAL_FILES, BiDiffuserConfig, read_config, write_config  # noqa: E402
from bidiffuser.uvit import UViT, UViTConfig  # noqa: E402

LLAMA_TOKENIZER = ROOT / "tests" / "fixtures" / "llama_tokenizer" / "tokenizer.model"
GIB = 1024 ** 3
LORA_RANK = 32  # the U-ViT LoRA of a bridge (LaVi-Bridge's rank, train_bridge's default)


@dataclass
class Size:
    llm: dict                     # LLaMA config fields
    projector: tuple[int, int]    # (input width = caption decoder n_embd, hidden)
    shards: int
    uvit: UViTConfig
    vae: AutoencoderConfig
    decoder: CaptionDecoderConfig
    clip_image: dict              # CLIPVisionConfig fields
    clip_text: dict               # CLIPTextConfig fields (vocab_size included)
    resolution: int
    steps: dict = field(default_factory=lambda: {"feature": 2, "image": 2, "new_tokens": 8})
    bridge: dict = field(default_factory=dict)  # BridgeConfig.ella fields replaced (the real size: none)


SIZES = {
    "real": Size(
        llm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 vocab_size=32000, max_position_embeddings=2048),
        projector=(768, 3072), shards=3, uvit=UViTConfig.v1(), vae=AutoencoderConfig.sd(),
        decoder=CaptionDecoderConfig.official(),
        clip_image=dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12, projection_dim=512),
        clip_text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, projection_dim=768),
        resolution=512),
    # The same files and commands at a width that runs in seconds (the CI test runs this).
    "reduced": Size(
        llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=32000, max_position_embeddings=512),
        projector=(32, 64), shards=2,
        uvit=UViTConfig(embed_dim=32, depth=2, num_heads=2, text_dim=8, clip_img_dim=16),
        vae=AutoencoderConfig(ch=8, ch_mult=[1, 2, 2, 2], num_res_blocks=1, z_channels=4, embed_dim=4,
                              norm_num_groups=4),
        decoder=CaptionDecoderConfig(vocab_size=600, n_positions=160, n_embd=32, n_layer=2, n_head=2,
                                     prefix_length=77, hidden_dim=8),
        clip_image=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, projection_dim=16),
        clip_text=dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, projection_dim=32),
        resolution=64, steps={"feature": 2, "image": 2, "new_tokens": 4},
        bridge=dict(width=32, depth=2, heads=2)),
}


# ------------------------------------------------------------------------------------- writing
def padded_gpt2_tokenizer(vocab_size: int):
    """A GPT-2-style byte-level BPE tokenizer with exactly ``vocab_size`` ids, '<|EOS|>' last (as the
    caption decoder's): trained on a small corpus, then padded with pieces that never occur."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer
    from transformers import GPT2TokenizerFast

    from bidiffuser.caption_decoder import _TINY_CORPUS, _ensure_eos

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_TINY_CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    raw = json.loads(bpe._tokenizer.to_str())
    vocab = raw["model"]["vocab"]
    for i in range(len(vocab), vocab_size - 1):
        vocab[f"\u0120unused{i}"] = i
    tokenizer = GPT2TokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(raw)), bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", eos_token="<|endoftext|>")
    _ensure_eos(tokenizer)
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def write_bidiffuser(root: Path, size: Size) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    if (root / "bidiffuser.json").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    gpt2 = padded_gpt2_tokenizer(size.decoder.vocab_size)
    gpt2.save_pretrained(str(root / OFFICIAL_FILES["tokenizer"]))
    clip_tok = padded_gpt2_tokenizer(size.clip_text["vocab_size"])
    text_cfg = CLIPTextConfig(**size.clip_text, max_position_embeddings=size.uvit.num_text_tokens,
                              hidden_act="quick_gelu", bos_token_id=clip_tok.bos_token_id,
                              eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.eos_token_id)
    CLIPTextModel(text_cfg).save_pretrained(str(root / OFFICIAL_FILES["clip_text"]))
    clip_tok.save_pretrained(str(root / OFFICIAL_FILES["clip_text"]))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**size.clip_image, hidden_act="quick_gelu"))
    vision.save_pretrained(str(root / OFFICIAL_FILES["clip_image"]))
    del vision
    dec_cfg = CaptionDecoderConfig.from_dict({**size.decoder.to_dict(), "prefix_length": size.uvit.num_text_tokens})
    save_torch(decoder_state_dict(init_caption_decoder(dec_cfg, gpt2, 0)), root / OFFICIAL_FILES["caption_decoder"])
    save_torch(vae_state_dict(build_autoencoder(size.vae), size.vae), root / OFFICIAL_FILES["autoencoder"])
    uvit_cfg = UViTConfig.from_dict({**size.uvit.to_dict(), "img_size": size.resolution // size.vae.downsample_factor,
                                     "clip_img_dim": size.clip_image["projection_dim"], "in_chans": size.vae.embed_dim,
                                     "text_dim": dec_cfg.hidden_dim})
    uvit = UViT(uvit_cfg)
    save_torch(uvit.state_dict(), root / OFFICIAL_FILES["uvit"])
    del uvit
    cfg = BiDiffuserConfig(root=root, resolution=size.resolution, uvit=uvit_cfg, caption_decoder=dec_cfg,
                           autoencoder=size.vae, files=dict(OFFICIAL_FILES))
    cfg.validate()
    write_config(cfg)


def llm_tensors(size: Size):
    """(name, shape) of every tensor of a Vicuna-shaped diffllama checkpoint, in file order."""
    c = size.llm
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    yield "model.embed_tokens.weight", (v, h)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for proj in ("q", "k", "v", "o"):
            yield f"{p}self_attn.{proj}_proj.weight", (h, h)
        yield f"{p}mlp.gate_proj.weight", (i, h)
        yield f"{p}mlp.up_proj.weight", (i, h)
        yield f"{p}mlp.down_proj.weight", (h, i)
        yield f"{p}input_layernorm.weight", (h,)
        yield f"{p}post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    mm, hidden = size.projector
    yield "model.fastchat_proj.fc1.weight", (hidden, mm)
    yield "model.fastchat_proj.fc1.bias", (hidden,)
    yield "model.fastchat_proj.fc2.weight", (h, hidden)
    yield "model.fastchat_proj.fc2.bias", (h,)
    yield "lm_head.weight", (v, h)


def write_llm(root: Path, size: Size) -> None:
    """A diffllama directory with fp16 ``pytorch_model-0000N-of-0000M.bin`` shards and their index,
    written one shard at a time (never more than a shard in memory)."""
    if (root / "config.json").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    specs = list(llm_tensors(size))
    total = sum(torch.Size(s).numel() for _, s in specs) * 2
    budget = total / size.shards
    g = torch.Generator().manual_seed(0)
    shards, current, used = [], [], 0
    for name, shape in specs:
        current.append((name, shape))
        used += torch.Size(shape).numel() * 2
        if used >= budget and len(shards) < size.shards - 1:
            shards.append(current)
            current, used = [], 0
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"pytorch_model-{k:05d}-of-{len(shards):05d}.bin"
        sd = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                sd[name] = torch.ones(shape, dtype=torch.float16)
            elif name.endswith(".bias"):
                sd[name] = torch.zeros(shape, dtype=torch.float16)
            else:
                sd[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.float16)
            weight_map[name] = fname
        torch.save(sd, str(root / fname))
        del sd
    (root / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {"architectures": ["DiffLlamaForCausalLM"], "model_type": "diffllama", **size.llm,
              "rms_norm_eps": 1e-6, "hidden_act": "silu", "initializer_range": 0.02, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False, "torch_dtype": "float16",
              "use_cache": True}
    shutil.copy(LLAMA_TOKENIZER, root / "tokenizer.model")
    (root / "config.json").write_text(json.dumps(config, indent=1))


def bridge_config(size: Size, uvit: UViTConfig) -> BridgeConfig:
    """ELLA's resampler from the LLM's hidden size to the U-ViT's text slot (reduced: narrower, shallower)."""
    cfg = BridgeConfig.ella(lm_dim=size.llm["hidden_size"], text_dim=uvit.text_dim, num_tokens=uvit.num_text_tokens)
    return BridgeConfig.from_dict({**cfg.to_dict(), **size.bridge}).validate()


def uvit_lora_settings() -> LoraSettings:
    return LoraSettings(rank=LORA_RANK, alpha=float(LORA_RANK), dropout=0.1, targets=list(UVIT_LORA_TARGETS))


def random_uvit_lora(uvit: UViTConfig, settings: LoraSettings, seed: int = 0) -> dict[str, torch.Tensor]:
    """LoRA A/B matrices for every module ``add_lora`` adapts in this U-ViT (the names the pipeline
    loads), found on a meta-device U-ViT (no 952M weights built); A ~ N(0, 1/fan_in), B ~ N(0, 0.02^2)
    (not peft's zeros: the LoRA path changes the output)."""
    with torch.device("meta"):
        model = UViT(uvit)
    add_lora(model, settings)
    shapes = {k: v.shape for k, v in lora_state_dict(model).items()}
    del model
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        std = torch.Size(shape[1:]).numel() ** -0.5 if ".lora_A." in name else 0.02
        out[name] = torch.randn(shape, generator=g) * std
    return out


def write_bridge(root: Path, size: Size, bidiffuser_dir: Path, llm_dir: Path) -> None:
    """A bridge directory (bidiffuser.bridge format, named safetensors) with random weights, sized for
    the LLM and the U-ViT of ``bidiffuser_dir``; skipped when already there."""
    if (root / BRIDGE_CONFIG).exists():
        return
    uvit = read_config(bidiffuser_dir).uvit
    cfg = bridge_config(size, uvit)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        bridge = Bridge(cfg)
    settings = uvit_lora_settings()
    save_bridge(root, cfg, bridge.state_dict(), uvit_lora=(settings, random_uvit_lora(uvit, settings)),
                text_model=str(llm_dir.resolve()), info={"stage": "random", "note": "benchmarks/real_size.py"})


def safetensors_numel(path: Path) -> int:
    """Parameters in a safetensors file, read off its header (no tensor loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())


def bridge_info(root: Path) -> dict:
    meta = json.loads((root / BRIDGE_CONFIG).read_text())
    return {"dir": str(root), "config": meta["bridge"], "uvit_lora": meta["uvit_lora"],
            "parameters": safetensors_numel(root / BRIDGE_WEIGHTS),
            "lora_parameters": safetensors_numel(root / UVIT_LORA) if (root / UVIT_LORA).exists() else 0}


def write_image(path: Path, side: int) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), "white")
    ImageDraw.Draw(image).ellipse([side // 4, side // 4, 3 * side // 4, 3 * side // 4], fill="red")
    image.save(path)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------- running
def run_chat(work: Path, size: Size, dtype: str, extra: list[str], bridge: Path | None = None) -> dict:
    image = work / "input.png"
    write_image(image, size.resolution)
    profile = work / "profile.json"
    out_dir = work / "images"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "easygen.cli", "chat", "--model-path", str(work / "diffllama"),
           "--bidiffuser", str(work / "bidiffuser"), "--device", "cpu", "--dtype", dtype,
           "--bidiffuser-dtype", dtype, "--image-file", str(image), "--prompt", "Describe the image concisely.",
           "--feature-steps", str(size.steps["feature"]), "--steps", str(size.steps["image"]),
           "--max-new-tokens", str(size.steps["new_tokens"]), "--seed", "0", "--force-image",
           "--profile", str(profile), "--json", "--out-dir", str(out_dir),
           *(["--bridge", str(bridge), "--draw-with", "bridge"] if bridge is not None else []), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"easygen chat failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"reply": reply, "phases": json.loads(profile.read_text())["phases"], "wall_s": wall,
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "command": " ".join(cmd), "stderr": proc.stderr}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="real")
    ap.add_argument("--workdir", type=Path, required=True, help="where the weights are written (reused)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="LLM and BiDiffuser precision (default bfloat16)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--bridge", action="store_true",
                    help="also write WORKDIR/bridge (random ELLA resampler + rank-32 U-ViT LoRA) and draw the "
                         "forced picture through it from the LLM's hidden states (--draw-with bridge)")
    ap.add_argument("extra", nargs="*", help="more `easygen chat` flags after --, e.g. -- --load-8bit")
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    work = args.workdir
    t0 = time.perf_counter()
    write_bidiffuser(work / "bidiffuser", size)
    write_llm(work / "diffllama", size)
    bridge = None
    if args.bridge:
        write_bridge(work / "bridge", size, work / "bidiffuser", work / "diffllama")
        bridge = bridge_info(work / "bridge")
    written = time.perf_counter() - t0
    sizes = {name: dir_bytes(work / name) for name in ("bidiffuser", "diffllama", *(["bridge"] if bridge else []))}
    result = run_chat(work, size, args.dtype, args.extra, work / "bridge" if bridge else None)
    print(f"weights on disk: BiDiffuser {sizes['bidiffuser'] / GIB:.2f} GiB, diffllama {sizes['diffllama'] / GIB:.2f} "
          + (f"GiB, bridge {sizes['bridge'] / GIB:.2f} " if bridge else "")
          + f"GiB (written in {written:.0f} s; reused when already there)")
    if bridge:
        c = bridge["config"]
        print(f"bridge: {bridge['parameters']:,} parameters ({c['kind']}, width {c['width']}, depth {c['depth']}, "
              f"{c['lm_dim']}-d LLM states -> {c['num_tokens']} x {c['text_dim']}); U-ViT LoRA rank "
              f"{bridge['uvit_lora']['rank']}: {bridge['lora_parameters']:,} parameters")
    reply = result["reply"]
    print(f"reply: {reply['text'][:120]!r}\npicture: {reply['images']}")
    print(result["stderr"].strip().split("\n\n")[-1] if "phase" in result["stderr"] else "")
    ratios = [p["peak_rss_bytes"] / p["weights_bytes"] for p in result["phases"]
              if p.get("peak_rss_bytes") and p.get("weights_bytes")]
    print(f"largest peak RSS / resident weights: {max(ratios):.2f}x; whole process peak "
          f"{result['process_peak_rss_bytes'] / GIB:.2f} GiB; wall {result['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "dtype": args.dtype, "disk_bytes": sizes,
                                         **({"bridge": bridge} if bridge else {}),
                                         **{k: v for k, v in result.items() if k != "stderr"}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
