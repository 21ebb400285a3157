"""Golden images from ParaDiffusion's own inference code (weijiawu/ParaDiffusion), for
tests/test_draw_paradiffusion.py.

Run with the reference environment's python (diffusers 0.20.0, transformers 4.30.1, peft 0.7.1 —
the reference's pipeline imports ``randn_tensor`` from ``diffusers.utils``, gone after 0.21) on the
tiny released layout written by OUR environment:

    python -m drawing.tiny_layouts_paradiffusion /tmp/pd_tiny tests/fixtures/llama_tokenizer/tokenizer.model
    REF_PYTHON scripts/reference_parity/paradiffusion.py --reference-repo REPO --layout /tmp/pd_tiny \
        --out tests/fixtures/drawing_goldens/paradiffusion.json

It builds the pipeline with ``demo.py``'s ``get_pipe`` (its Llama + PeftModel LoRA, tokenizer with
pad = EOS and model_max_length 256, DPMSolverMultistepScheduler, VAE, U-Net, attention slicing) and
calls its ``StableDiffusionLlamaPipeline`` as ``predict()`` does. Patched, for CPU/float32/paths
only: ``get_pipe(half=False)`` and the pipeline's ``.to("cuda:0")`` sends it to the CPU; the paths
point at the tiny layout; the generators are one CPU generator per image (our backends' contract)
instead of ``predict()``'s single CUDA generator; ``output_type="np"`` keeps the float pixels.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

SHORT = "A red fox sits in the snow under a pine tree at dawn."
# predict()'s paragraph twice over: longer than the 256-token limit, so the truncation is exercised
LONG = ("A peaceful scene of a small town in winter, with snow-covered houses and trees around. The town is "
        "surrounded by mountains, and the sky is covered in clouds, creating a solemn atmosphere. In the "
        "foreground, there is a boat docked on the river, with the boat itself covered in snow. The water surface "
        "of the river is calm, reflecting the houses and trees in the distance. The roofs of the houses are covered "
        "in snow, and the windows are lit up, emitting a warm yellow light. The branches of the trees are also "
        "covered in snow, with the tips of the branches showing the blue-white color of the snow. The sky is blue, "
        "with some clouds drifting, and the sun is setting, casting a soft orange glow on the horizon. The entire "
        "scene is filled with the beauty of winter, evoking the feeling of tranquility and warmth. ") * 2
SETTINGS = {"prompts": [SHORT, LONG.strip()], "seeds": [45, 7], "steps": 4, "guidance": 7.5, "width": 32, "height": 24}
PARTS = ("Llama-2-7b-hf", "text_encoder_lora", "unet", "sdxl-vae-fp16-fix", "scheduler")


def sha256s(layout: Path) -> dict[str, str]:
    return {str(p.relative_to(layout)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(layout.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference-repo", required=True, help="an extracted copy of weijiawu/ParaDiffusion")
    ap.add_argument("--reference-commit", default="3b5be64c6b9f5efc520e21360376cbf63677c081")
    ap.add_argument("--layout", required=True, help="the tiny released layout")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import diffusers
    import peft
    import tokenizers
    import torch
    import transformers

    sys.path.insert(0, args.reference_repo)
    import demo  # the reference's demo.py: get_pipe and its imports (pipeline_stable_diffusion_llama)

    class CpuPipeline(demo.StableDiffusionLlamaPipeline):
        def to(self, *a, **k):  # PATCH: get_pipe calls pipe.to("cuda:0"); stay on the CPU
            return super().to("cpu")

    demo.StableDiffusionLlamaPipeline = CpuPipeline
    layout = Path(args.layout)
    w = {name: str(layout / name) for name in PARTS}
    pipe = demo.get_pipe(text_encoder_id=w["Llama-2-7b-hf"], tokenizer_id=w["Llama-2-7b-hf"], unet_id=w["unet"],
                         vae_id=w["sdxl-vae-fp16-fix"], scheduler_id=w["scheduler"], half=False,  # PATCH: fp32
                         peft_model_id=w["text_encoder_lora"])

    s = SETTINGS
    tok = pipe.tokenizer(s["prompts"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in s["seeds"]]
    images = pipe(prompt=s["prompts"], width=s["width"], height=s["height"], generator=generators,
                  num_inference_steps=s["steps"], num_images_per_prompt=1, guidance_scale=s["guidance"],
                  output_type="np").images
    golden = {
        **s,
        "reference": {"repo": "weijiawu/ParaDiffusion", "commit": args.reference_commit,
                      "code": "demo.py get_pipe + pipeline_stable_diffusion_llama.StableDiffusionLlamaPipeline"},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "tokenizers": tokenizers.__version__},
        "tokenizer_class": type(pipe.tokenizer).__name__,
        "padding_side": pipe.tokenizer.padding_side,
        "files_sha256": sha256s(layout),
        "input_ids": tok.input_ids.tolist(),
        "attention_mask": tok.attention_mask.tolist(),
        "images": [img.astype("float32").tolist() for img in images],  # H x W x 3 in [0, 1], before uint8
    }
    Path(args.out).write_text(json.dumps(golden) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(images)} images {images.shape[1:]} with {type(pipe.tokenizer).__name__}")


if __name__ == "__main__":
    main()
