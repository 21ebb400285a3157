"""Golden images for ELLA from ELLA's own code (TencentQQGYLab/ELLA), run on the tiny released-layout files.

Run with the reference environment's python (ELLA's time: diffusers 0.27.2, transformers 4.39.3):

    REF/bin/python scripts/reference_parity/ella.py --reference-repo DIR [--reference-commit SHA]

DIR holds ELLA's model.py and inference.py. The tiny files are written by
``drawing.tiny_layouts_ella`` through this repository's own python (``--our-python``, default
.venv/bin/python), so they are the bytes the test rebuilds. Writes
tests/fixtures/drawing_goldens/ella.json (settings, prompts, token ids, sha256 of every tiny file,
versions) and ella.safetensors (the pipeline's ``output_type="pt"`` images, float32 in [0, 1]).

What is patched, and only this: inference.py imports fire, gradio and torchvision.utils at the top
for its CLI, demo and PNG saving, none of which the drawing functions use, so they are stubbed;
its ``load_ella`` builds ``ELLA()`` at the released sizes, so ``ELLA`` is given the tiny widths;
its pipelines run in float16 on "cuda" with CUDA generators, here float32 on CPU with CPU generators
(the generators our interface draws noise from).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GOLDENS = REPO / "tests" / "fixtures" / "drawing_goldens"

# The cases the test replays. Prompts: one short, one longer than 128 T5 tokens (and than CLIP's 77).
SHORT = "A red book and a yellow vase."
LONG = ("a large, textured green crocodile lying comfortably on a patch of grass with a cute, knitted orange "
        "sweater enveloping its scaly body. Around its neck, the sweater features a whimsical pattern of blue and "
        "yellow stripes. In the background, a smooth, grey rock partially obscures the view of a small pond with "
        "lily pads floating on the surface. a mischievous raccoon standing on its hind legs, holding a bright red "
        "apple aloft in its furry paws.")
SETTINGS = dict(steps=4, guidance=12.0, size=64)
CASES = [  # name, mode, prompts drawn together, seeds, fixed_negative
    ("fixed", "fixed", [SHORT, LONG], [1001, 1002], False),
    ("flexible_short", "flexible", [SHORT], [1001], False),
    ("flexible_long", "flexible", [LONG], [1002], False),
    ("flexible_short_fixed_negative", "flexible", [SHORT], [1001], True),
]


def _stub_imports() -> None:
    """inference.py's CLI/demo/saving imports, unused by the functions called here."""
    for name in ("fire", "gradio", "torchvision", "torchvision.utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision.utils"].save_image = None
    sys.modules["torchvision"].utils = sys.modules["torchvision.utils"]


def _sha256_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-repo", required=True, type=Path)
    ap.add_argument("--reference-commit", default="3c228f1dc6c4d3cad0a47493816151a419f14db3")
    ap.add_argument("--our-python", default=str(REPO / ".venv" / "bin" / "python"))
    ap.add_argument("--out", type=Path, default=GOLDENS)
    args = ap.parse_args()

    files = Path(tempfile.mkdtemp(prefix="tiny_ella_"))
    subprocess.run([args.our_python, "-m", "drawing.tiny_layouts_ella", str(files)], cwd=REPO, check=True)

    import safetensors.torch
    import torch
    torch.set_num_threads(1)
    import diffusers  # noqa: F401  (before the stubs: both libraries probe for torchvision at import)
    import transformers  # noqa: F401
    sys.path.insert(0, str(args.reference_repo.resolve()))
    _stub_imports()
    import inference
    import model
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    tiny = json.loads((files / "stable-diffusion-v1-5" / "unet" / "config.json").read_text())["cross_attention_dim"]
    d_model = json.loads((files / "flan-t5-xl" / "config.json").read_text())["d_model"]
    inference.ELLA = functools.partial(model.ELLA, time_embed_dim=tiny, width=tiny, input_dim=d_model)  # patch: sizes

    # inference.py main(), on CPU in float32 (patch: device and dtype)
    pipe = StableDiffusionPipeline.from_pretrained(
        str(files / "stable-diffusion-v1-5"), torch_dtype=torch.float32, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    ella = inference.load_ella(str(files / "ella-sd1.5-tsc-t5xl.safetensors"), pipe.device, pipe.dtype)
    t5_encoder = model.T5TextEmbedder(pretrained_path=str(files / "flan-t5-xl")).to(pipe.device, dtype=torch.float32)

    images, cases = {}, []
    for name, mode, prompts, seeds, fixed_negative in CASES:
        kwargs = dict(guidance_scale=SETTINGS["guidance"], num_inference_steps=SETTINGS["steps"],
                      height=SETTINGS["size"], width=SETTINGS["size"],
                      generator=[torch.Generator().manual_seed(s) for s in seeds])  # patch: CPU generators
        inference.load_ella_for_pipe(pipe, ella)
        with torch.no_grad():
            if mode == "fixed":
                out = inference.generate_image_with_fixed_max_length(pipe, t5_encoder, prompts, **kwargs)
            else:
                out = inference.generate_image_with_flexible_max_length(
                    pipe, t5_encoder, prompts, fixed_negative=fixed_negative, **kwargs)
        inference.offload_ella_for_pipe(pipe)
        images[name] = out.float().contiguous()
        cases.append(dict(name=name, length=mode, prompts=prompts, seeds=seeds, fixed_negative=fixed_negative))
        print(f"{name}: {tuple(out.shape)} mean {out.mean():.6f}")

    token_ids = {p: t5_encoder.tokenizer(p, add_special_tokens=True).input_ids for p in (SHORT, LONG, "")}
    import huggingface_hub
    import sentencepiece
    import tokenizers
    golden = dict(
        reference=dict(repository="TencentQQGYLab/ELLA", commit=args.reference_commit,
                       code="model.py ELLA, T5TextEmbedder; inference.py load_ella, ELLAProxyUNet, "
                            "generate_image_with_fixed_max_length, generate_image_with_flexible_max_length"),
        versions=dict(python=sys.version.split()[0], torch=torch.__version__, diffusers=diffusers.__version__,
                      transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                      sentencepiece=sentencepiece.__version__, huggingface_hub=huggingface_hub.__version__),
        settings=SETTINGS, cases=cases, token_ids=token_ids,
        timesteps=[int(t) for t in pipe.scheduler.timesteps],
        scheduler={k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        files_sha256=_sha256_tree(files),
        images="ella.safetensors: one float32 tensor per case, B x 3 x H x W in [0, 1] (output_type='pt')",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ella.json").write_text(json.dumps(golden, indent=1, default=str) + "\n")
    safetensors.torch.save_file(images, str(args.out / "ella.safetensors"))
    (args.out / "ella.safetensors").chmod(0o644)
    print(f"wrote {args.out / 'ella.json'} and ella.safetensors")


if __name__ == "__main__":
    main()
