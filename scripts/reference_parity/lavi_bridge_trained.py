"""What ``easygen train-lavi-bridge`` writes, loaded by LaVi-Bridge's own test scripts: their loading code
(``monkeypatch_or_replace_lora_extended`` on ``lora_vis.pt`` / ``lora_text.pt`` with ``r=32``,
``TextAdapter.from_pretrained(ckpt_dir/adapter)``) and their sampling loop draw the same images as our
lavi-bridge backend drawing the same files. Run by hand (not in CI), with the reference environment's
python (diffusers 0.24.0, transformers 4.38.0, torch 2.13.0 CPU):

    .venv/bin/python -m drawing.tiny_layouts_lavi /tmp/lavi_tiny
    .venv/bin/python -m easygen.cli train-lavi-bridge --combo t5_unet --data CAPTIONS.tsv --out /tmp/trained/t5_unet \\
        --diffusion /tmp/lavi_tiny/stable-diffusion-v1-4 --text-model /tmp/lavi_tiny/t5-large --resolution 32 --steps 4
    REF/bin/python scripts/reference_parity/lavi_bridge_trained.py --reference-repo LaVi-Bridge \\
        --tiny-dir /tmp/lavi_tiny --trained /tmp/trained/t5_unet --combo t5_unet

It runs the loop of ``test/<combo>.py`` of ShihaoZhaoZSH/LaVi-Bridge (patched only where marked
``PATCH``, as in ``lavi_bridge.py`` beside this file), then our backend in our environment
(``--our-python``, default ``.venv/bin/python``) on the same prompts, seeds, steps and size, and prints
the max abs difference of the images as floats in [0, 1] (exit 1 above ``--atol``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "a small cat with tea on a big glass square"]
SEEDS = [0, 7]
STEPS, GUIDANCE, SIZE = 6, 7.5, 64
LLAMA_ATTENTION = "eager"  # PATCH: what transformers 4.38 builds on LaVi-Bridge's torch 2.0.1 (see lavi_bridge.py)

OURS = """
import sys, torch
from safetensors.torch import save_file
from drawing import load_backend
trained, combo, diffusion, text_model, out, steps, guidance, size = sys.argv[1:9]
torch.set_num_threads(1)
b = load_backend("lavi-bridge", trained, combo=combo, diffusion=diffusion, text_model=text_model, dtype="float32")
prompts, seeds = {prompts!r}, {seeds!r}
images = b.sample(prompts, seeds, int(steps), float(guidance), int(size), int(size))
save_file({{str(i): im.permute(1, 2, 0).contiguous() for i, im in enumerate(images)}}, out)
"""


def reference_images(ref: Path, tiny: Path, ckpt_dir: Path, combo: str, steps: int, size: int) -> list[torch.Tensor]:
    sys.path.insert(0, str(ref))
    from diffusers import AutoencoderKL, Transformer2DModel, UNet2DConditionModel, UniPCMultistepScheduler
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaTokenizer, T5EncoderModel
    from modules.adapters import TextAdapter
    from modules.lora import monkeypatch_or_replace_lora_extended

    pos_prompt = ", best quality, extremely detailed, 4k resolution"
    height = width = size                                  # PATCH: 512 in the scripts
    num_inference_steps, guidance_scale = steps, GUIDANCE  # PATCH: 50 steps in the scripts
    torch_device = "cpu"                                   # PATCH: "cuda" in the scripts
    base = tiny / ("PixArt-XL-2-512x512" if combo == "t5_transformer" else "stable-diffusion-v1-4")  # PATCH: hub names
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
        tokenizer = LlamaTokenizer.from_pretrained(tiny / "Llama-2-7b-hf")
        # PATCH: torch_dtype=torch.float16 in the script (float32 for a CPU comparison); eager attention
        text_encoder = LlamaForCausalLM.from_pretrained(tiny / "Llama-2-7b-hf", torch_dtype=torch.float32,
                                                        attn_implementation=LLAMA_ATTENTION).to(torch_device)
        adapter = TextAdapter.from_pretrained(os.path.join(ckpt_dir, "adapter")).to(torch_device)
        tokenizer.pad_token = '[PAD]'
    else:
        TEXT_ENCODER_REPLACE_MODULES = {"T5Attention"}
        tokenizer = AutoTokenizer.from_pretrained(tiny / "t5-large")
        text_encoder = T5EncoderModel.from_pretrained(tiny / "t5-large").to(torch_device)
        kw = {"use_safetensors": True} if combo == "t5_transformer" else {}
        adapter = TextAdapter.from_pretrained(os.path.join(ckpt_dir, "adapter"), **kw).to(torch_device)

    lora_vis = torch.load(os.path.join(ckpt_dir, "lora_vis.pt"), weights_only=True)
    monkeypatch_or_replace_lora_extended(vis, lora_vis, r=32,
                                         target_replace_module=VIS_REPLACE_MODULES)
    lora_text = torch.load(os.path.join(ckpt_dir, "lora_text.pt"), weights_only=True)
    monkeypatch_or_replace_lora_extended(text_encoder, lora_text, r=32,
                                         target_replace_module=TEXT_ENCODER_REPLACE_MODULES)
    vae.eval(), vis.eval(), text_encoder.eval(), adapter.eval()

    images = []
    with torch.no_grad():
        for prompt, seed in zip(PROMPTS, SEEDS):
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
            images.append((image / 2 + 0.5).clamp(0, 1).squeeze().permute(1, 2, 0).contiguous())
    return images


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference-repo", required=True)
    ap.add_argument("--tiny-dir", required=True, help="the bases, as drawing.tiny_layouts_lavi writes them")
    ap.add_argument("--trained", required=True, help="a folder easygen train-lavi-bridge wrote")
    ap.add_argument("--combo", required=True, choices=["llama2_unet", "t5_unet", "t5_transformer"])
    ap.add_argument("--our-python", default=str(REPO / ".venv" / "bin" / "python"))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--size", type=int, default=SIZE)
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref, tiny, trained = (Path(p).resolve() for p in (args.reference_repo, args.tiny_dir, args.trained))
    theirs = reference_images(ref, tiny, trained, args.combo, args.steps, args.size)

    from safetensors.torch import load_file
    base = tiny / ("PixArt-XL-2-512x512" if args.combo == "t5_transformer" else "stable-diffusion-v1-4")
    text = tiny / ("Llama-2-7b-hf" if args.combo == "llama2_unet" else "t5-large")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ours.safetensors"
        subprocess.run([args.our_python, "-c", OURS.format(prompts=PROMPTS, seeds=SEEDS), str(trained), args.combo,
                        str(base), str(text), str(out), str(args.steps), str(GUIDANCE), str(args.size)],
                       cwd=REPO, check=True)
        ours = load_file(str(out))
    diff = max((ours[str(i)] - im).abs().max().item() for i, im in enumerate(theirs))
    spread = max(im.std().item() for im in theirs)
    import diffusers
    import transformers
    commit = subprocess.run(["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"combo": args.combo, "trained": str(trained), "steps": args.steps, "size": args.size,
                      "prompts": PROMPTS, "seeds": SEEDS, "max_abs_diff": diff, "image_std": spread,
                      "reference": commit or "5a725f379f153991b36f307e099de01500f364c2",
                      "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                   "transformers": transformers.__version__}}, indent=1))
    return 0 if diff <= args.atol else 1


if __name__ == "__main__":
    sys.exit(main())
