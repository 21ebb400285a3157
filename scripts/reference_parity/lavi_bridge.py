"""Golden values for the lavi-bridge drawing backend, from LaVi-Bridge's own code.

Run with the reference environment's python (diffusers 0.24.0, transformers 4.38.0, peft 0.8.2 as in
LaVi-Bridge's environment.yaml; torch 2.13.0 CPU), on tiny files written by our
``drawing.tiny_layouts_lavi`` in our own environment:

    .venv/bin/python -m drawing.tiny_layouts_lavi /tmp/lavi_tiny
    REF/bin/python scripts/reference_parity/lavi_bridge.py --reference-repo LaVi-Bridge --tiny-dir /tmp/lavi_tiny

It imports ``modules/lora.py`` (cloneofsimo-lora) and ``modules/adapters.py`` from the extracted
repository (ShihaoZhaoZSH/LaVi-Bridge) and runs the loop of ``test/llama2_unet.py``,
``test/t5_unet.py`` and ``test/t5_transformer.py``, patched only where marked ``PATCH``: CPU instead of
``"cuda"``, the tiny folders instead of the hub names, float32 instead of Llama's float16, 64x64
instead of 512x512, fewer steps, and ``torch.manual_seed(seed)`` before the script's ``torch.randn``.

Writes ``tests/fixtures/drawing_goldens/lavi_bridge.json`` (settings, sha256 of every tiny file,
versions, the sentinel assignment of each module tree) and ``lavi_bridge.safetensors`` (the images as
floats in [0, 1] before the uint8 conversion).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "drawing_goldens"
PROMPTS = ["a red circle",
           "In homage to old-world botanical sketches, an illustration is rendered with detailed lines and "
           "subtle watercolor touches. The artwork captures an unusual fusion: a cactus bearing not just thorns "
           "but also the fragrant and delicate blooms of a lilac, all while taking on the mesmerizing form of a "
           "strip, capturing the essence of nature's diverse beauty and mathematical intrigue."]
SEEDS = [0, 7]
# Tokenizer probes: runs of spaces, tabs, trailing space, special tokens written as text, the word-start mark
PROBES = ["a red circle", "  two leading spaces", "tabs\tand\nnewlines", "Ünïcödé façade — naïve café 🦙",
          "a  b   c", "ends with space ", "<s> literal </s> specials<unk>", "x</s>y", "▁marker ▁", "word " * 100, ""]
STEPS, GUIDANCE, SIZE = 6, 7.5, 64
# PATCH: with LaVi-Bridge's torch 2.0.1, transformers 4.38 builds Llama with eager attention (its SDPA
# class needs torch >= 2.1.1), whose class is ``LlamaAttention``, the name the script targets. On a newer
# torch it builds ``LlamaSdpaAttention`` instead and the script silently applies no text LoRA at all.
LLAMA_ATTENTION = "eager"


def sentinel(model, targets, monkeypatch, injected) -> list[str]:
    """Module names in the order the reference gives them list pairs: pair k (up filled with 2k, down
    with 2k+1, rank 1 + k % 5 so shapes differ too) is read back from wherever the reference put it."""
    from torch import nn
    sites = []
    for ancestor in (m for m in model.modules() if type(m).__name__ in targets):
        for _, m in ancestor.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                sites.append(m)
    tensors = []
    for k, m in enumerate(sites):
        r = 1 + k % 5
        if isinstance(m, nn.Conv2d):
            up, down = (m.out_channels, r, 1, 1), (r, m.in_channels // m.groups, *m.kernel_size)
        else:
            up, down = (m.out_features, r), (r, m.in_features)
        tensors += [torch.full(up, 2.0 * k), torch.full(down, 2.0 * k + 1)]
    monkeypatch(model, tensors, r=32, target_replace_module=targets)
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, injected):
            k = int(m.lora_up.weight.flatten()[0].item()) // 2
            assert m.lora_down.weight.flatten()[0].item() == 2 * k + 1 and m.lora_up.weight.shape[1] == 1 + k % 5
            found[k] = name
    assert sorted(found) == list(range(len(sites))), "the reference left some pairs unassigned"
    return [found[k] for k in range(len(sites))]


# The bases' own configs (the fields that shape the module trees): SD1.4's U-Net, PixArt-XL-2-512x512's
# transformer, Llama-2-7b, t5-large. Built on the meta device, where values are lost, so pair k is
# told apart by its rank (k + 1) instead.
REAL = {
    "unet": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64),
    "pixart": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   patch_size=2, sample_size=64, caption_channels=4096, cross_attention_dim=1152,
                   norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000),
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000),
    "t5": dict(d_model=1024, d_kv=64, num_heads=16, d_ff=4096, num_layers=24, vocab_size=32128),
}


def real_size_sentinel(model, targets, monkeypatch, injected) -> list[str]:
    from torch import nn
    sites = []
    for ancestor in (m for m in model.modules() if type(m).__name__ in targets):
        for _, m in ancestor.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                sites.append(m)
    tensors = []
    for k, m in enumerate(sites):
        r = k + 1
        if isinstance(m, nn.Conv2d):
            up, down = (m.out_channels, r, 1, 1), (r, m.in_channels // m.groups, *m.kernel_size)
        else:
            up, down = (m.out_features, r), (r, m.in_features)
        tensors += [torch.empty(up, device="meta"), torch.empty(down, device="meta")]
    monkeypatch(model, tensors, r=32, target_replace_module=targets)
    found = {m.lora_up.weight.shape[1] - 1: name for name, m in model.named_modules() if isinstance(m, injected)}
    assert sorted(found) == list(range(len(sites)))
    return [found[k] for k in range(len(sites))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference-repo", required=True)
    ap.add_argument("--tiny-dir", required=True)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    ref, tiny, out = Path(args.reference_repo).resolve(), Path(args.tiny_dir).resolve(), Path(args.out)
    sys.path.insert(0, str(ref))
    torch.set_num_threads(1)

    import diffusers
    import peft
    import transformers
    from diffusers import AutoencoderKL, Transformer2DModel, UNet2DConditionModel, UniPCMultistepScheduler
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaTokenizer, T5EncoderModel
    from modules.adapters import TextAdapter
    from modules.lora import LoraInjectedConv2d, LoraInjectedLinear, monkeypatch_or_replace_lora_extended

    sd14, pixart = tiny / "stable-diffusion-v1-4", tiny / "PixArt-XL-2-512x512"
    llama_dir, t5_dir = tiny / "Llama-2-7b-hf", tiny / "t5-large"
    injected = (LoraInjectedLinear, LoraInjectedConv2d)
    trees = {
        "unet": (lambda: UNet2DConditionModel.from_pretrained(sd14, subfolder="unet"),
                 {"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"}),
        "pixart": (lambda: Transformer2DModel.from_pretrained(pixart, subfolder="transformer"), {"Attention", "GEGLU"}),
        "llama": (lambda: LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation=LLAMA_ATTENTION),
                  {"LlamaAttention"}),
        "t5": (lambda: T5EncoderModel.from_pretrained(t5_dir), {"T5Attention"}),
    }
    sentinels = {name: sentinel(make(), targets, monkeypatch_or_replace_lora_extended, injected)
                 for name, (make, targets) in trees.items()}

    from transformers import LlamaConfig, T5Config
    with torch.device("meta"):
        real_trees = {
            "unet": (UNet2DConditionModel(**REAL["unet"]), trees["unet"][1]),
            "pixart": (Transformer2DModel(**REAL["pixart"]), trees["pixart"][1]),
            "llama": (LlamaForCausalLM(LlamaConfig(**REAL["llama"], attn_implementation=LLAMA_ATTENTION)),
                      trees["llama"][1]),
            "t5": (T5EncoderModel(T5Config(**REAL["t5"])), trees["t5"][1]),
        }
        real_sentinels = {name: real_size_sentinel(model, targets, monkeypatch_or_replace_lora_extended, injected)
                          for name, (model, targets) in real_trees.items()}

    # the scripts' tokenizers as the scripts set them up and call them
    llama_tok = LlamaTokenizer.from_pretrained(llama_dir)
    llama_tok.pad_token = '[PAD]'
    t5_tok = AutoTokenizer.from_pretrained(t5_dir)
    token_ids = {"llama_77": [llama_tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROBES],
                 "t5_77": [t5_tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROBES],
                 "t5_120_mask": [t5_tok(p, padding="max_length", max_length=120, add_special_tokens=True,
                                        truncation=True).attention_mask for p in PROBES]}

    images, pad_ids = {}, {}
    for combo in ("llama2_unet", "t5_unet", "t5_transformer"):
        ckpt_dir = tiny / combo
        pos_prompt = ", best quality, extremely detailed, 4k resolution"
        height = width = SIZE                                  # PATCH: 512 in the scripts
        guidance_scale = GUIDANCE  # PATCH: steps set per run below (STEPS, and 50 as in the scripts)
        torch_device = "cpu"                                   # PATCH: "cuda" in the scripts
        base = pixart if combo == "t5_transformer" else sd14   # PATCH: hub names in the scripts
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae").to(torch_device)
        if combo == "t5_transformer":
            vis = Transformer2DModel.from_pretrained(base, subfolder="transformer").to(torch_device)
            VIS_REPLACE_MODULES = {"Attention", "GEGLU"}
        else:
            vis = UNet2DConditionModel.from_pretrained(base, subfolder="unet").to(torch_device)
            VIS_REPLACE_MODULES = {"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"}
        noise_scheduler = UniPCMultistepScheduler.from_pretrained(base, subfolder="scheduler")
        if combo == "llama2_unet":
            TEXT_ENCODER_REPLACE_MODULES = {"LlamaAttention"}
            tokenizer = LlamaTokenizer.from_pretrained(llama_dir)
            # PATCH: torch_dtype=torch.float16 in the script (float32 for a CPU comparison); eager attention
            # as LaVi-Bridge's torch 2.0.1 gets it (see LLAMA_ATTENTION)
            text_encoder = LlamaForCausalLM.from_pretrained(llama_dir, torch_dtype=torch.float32,
                                                            attn_implementation=LLAMA_ATTENTION).to(torch_device)
            adapter = TextAdapter.from_pretrained(os.path.join(ckpt_dir, "adapter")).to(torch_device)
            tokenizer.pad_token = '[PAD]'
            pad_ids[combo] = tokenizer.pad_token_id
        else:
            TEXT_ENCODER_REPLACE_MODULES = {"T5Attention"}
            tokenizer = AutoTokenizer.from_pretrained(t5_dir)
            text_encoder = T5EncoderModel.from_pretrained(t5_dir).to(torch_device)
            kw = {"use_safetensors": True} if combo == "t5_transformer" else {}
            adapter = TextAdapter.from_pretrained(os.path.join(ckpt_dir, "adapter"), **kw).to(torch_device)
            pad_ids[combo] = tokenizer.pad_token_id

        lora_vis = torch.load(os.path.join(ckpt_dir, "lora_vis.pt"), weights_only=True)
        monkeypatch_or_replace_lora_extended(vis, lora_vis, r=32,
                                             target_replace_module=VIS_REPLACE_MODULES)
        lora_text = torch.load(os.path.join(ckpt_dir, "lora_text.pt"), weights_only=True)
        monkeypatch_or_replace_lora_extended(text_encoder, lora_text, r=32,
                                             target_replace_module=TEXT_ENCODER_REPLACE_MODULES)
        vae.eval(), vis.eval(), text_encoder.eval(), adapter.eval()

        with torch.no_grad():
            # each prompt at STEPS, and the first once more at the scripts' own 50 steps (past UniPC's
            # lower-order finish, which only runs under 15 steps)
            for i, prompt, seed, num_inference_steps in [(0, PROMPTS[0], SEEDS[0], STEPS), (1, PROMPTS[1], SEEDS[1], STEPS),
                                                         ("50steps", PROMPTS[0], SEEDS[0], 50)]:
                prompt += pos_prompt
                if combo == "t5_transformer":  # test/t5_transformer.py
                    text_inputs = tokenizer(prompt, padding="max_length", max_length=120, add_special_tokens=True,
                                            return_tensors="pt", truncation=True).to(torch_device)
                    prompt_attention_mask = text_inputs.attention_mask
                    encoder_hidden_states = text_encoder(text_inputs.input_ids, attention_mask=prompt_attention_mask)[0]
                    encoder_hidden_states = adapter(encoder_hidden_states).sample
                    neg_text_inputs = tokenizer([""], padding="max_length", max_length=120, add_special_tokens=True,
                                                return_tensors="pt", truncation=True).to(torch_device)
                    neg_prompt_attention_mask = neg_text_inputs.attention_mask
                    neg_encoder_hidden_states = text_encoder(neg_text_inputs.input_ids,
                                                             attention_mask=neg_prompt_attention_mask)[0]
                    neg_encoder_hidden_states = adapter(neg_encoder_hidden_states).sample
                    text_embeddings = torch.cat([neg_encoder_hidden_states, encoder_hidden_states])
                    attention_mask = torch.cat([neg_prompt_attention_mask, prompt_attention_mask])
                else:  # test/llama2_unet.py, test/t5_unet.py
                    text_ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt",
                                         truncation=True).input_ids.to(torch_device)
                    uncond_input = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt")
                    if combo == "llama2_unet":
                        text_embeddings = text_encoder(input_ids=text_ids, output_hidden_states=True
                                                       ).hidden_states[-1].to(torch.float32)
                        uncond_embeddings = text_encoder(uncond_input.input_ids.to(torch_device),
                                                         output_hidden_states=True).hidden_states[-1].to(torch.float32)
                    else:
                        text_embeddings = text_encoder(input_ids=text_ids)[0]
                        uncond_embeddings = text_encoder(uncond_input.input_ids.to(torch_device))[0]
                    text_embeddings = adapter(text_embeddings).sample
                    uncond_embeddings = adapter(uncond_embeddings).sample
                    text_embeddings = torch.cat([uncond_embeddings, text_embeddings])

                torch.manual_seed(seed)  # PATCH: the scripts draw from the unseeded global generator
                latents = torch.randn((1, vis.in_channels, height // 8, width // 8)).to(torch_device)
                latents = latents * noise_scheduler.init_noise_sigma
                noise_scheduler.set_timesteps(num_inference_steps)
                for t in noise_scheduler.timesteps:
                    latent_model_input = torch.cat([latents] * 2)
                    latent_model_input = noise_scheduler.scale_model_input(latent_model_input, timestep=t)
                    if combo == "t5_transformer":
                        noise_pred = vis(latent_model_input, encoder_hidden_states=text_embeddings,
                                         encoder_attention_mask=attention_mask,
                                         timestep=torch.Tensor([t.item()]).expand(latent_model_input.shape[0]
                                                                                  ).to(torch_device),
                                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
                    else:
                        noise_pred = vis(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                    if combo == "t5_transformer":
                        noise_pred = noise_pred.chunk(2, dim=1)[0]
                        latents = noise_scheduler.step(noise_pred, t, latents)[0]
                    else:
                        latents = noise_scheduler.step(noise_pred, t, latents).prev_sample
                latents = 1 / 0.18215 * latents
                image = vae.decode(latents).sample
                image = (image / 2 + 0.5).clamp(0, 1).squeeze()
                images[f"{combo}/{i}"] = image.permute(1, 2, 0).contiguous()  # floats before `* 255 -> uint8`

    files = sorted(p for p in tiny.rglob("*") if p.is_file())
    commit = subprocess.run(["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    golden = {
        "reference": {"repository": "ShihaoZhaoZSH/LaVi-Bridge", "commit": commit or "5a725f379f153991b36f307e099de01500f364c2",
                      "scripts": ["test/llama2_unet.py", "test/t5_unet.py", "test/t5_transformer.py"]},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": sys.version.split()[0]},
        "prompts": PROMPTS, "seeds": SEEDS, "steps": STEPS, "guidance": GUIDANCE, "width": SIZE, "height": SIZE,
        "pad_token_ids": pad_ids,
        "probes": PROBES, "token_ids": token_ids,
        "files": {str(p.relative_to(tiny)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
        "sentinel": sentinels,
        "sentinel_real_size": real_sentinels,
        "images": "lavi_bridge.safetensors: '<combo>/<prompt index>' -> (64, 64, 3) float32 in [0, 1]",
    }
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    save_file(images, str(out / "lavi_bridge.safetensors"))
    (out / "lavi_bridge.json").write_text(json.dumps(golden, indent=1) + "\n")
    print("wrote", out / "lavi_bridge.json", {k: len(v) for k, v in sentinels.items()},
          {k: len(v) for k, v in real_sentinels.items()})


if __name__ == "__main__":
    main()
