"""The model flags every EasyGen command that loads a model shares (they map onto
``easygen.builder.load_pretrained``). Import-light: argparse only."""
from __future__ import annotations

import argparse

from bidiffuser.cliutil import PRECISION_NAMES, add_device_args


# BiDiffuser's own ways, then the released systems (drawing.BACKENDS; named here to keep this import-light)
DRAW_WITH = ["auto", "bridge", "clip", "ella", "lavi-bridge", "paradiffusion"]


def add_drawer_args(g) -> None:
    """Where a released drawing system's files are, and how it runs."""
    g.add_argument("--drawer", metavar="DIR", help="with --draw-with ella|lavi-bridge|paradiffusion: that system's "
                                                   "files as downloaded (see docs/drawing-backends.md)")
    g.add_argument("--drawer-option", metavar="KEY=VALUE", action="append", default=[],
                   help="an option of the --draw-with backend (repeatable; e.g. mode=flexible for ELLA)")
    g.add_argument("--drawer-device", metavar="DEVICE",
                   help="device of the --draw-with backend (default: --device); e.g. cpu keeps it off the LLM's GPU")
    g.add_argument("--drawer-offload", action="store_true",
                   help="keep the --draw-with backend's weights on the CPU and move them to its device only "
                        "while it draws (the LLM keeps the GPU between pictures)")
    g.add_argument("--drawer-dtype", metavar="DTYPE",
                   help="dtype of the --draw-with backend (default: each part as its reference code runs it)")


def add_model_args(p: argparse.ArgumentParser, model_path_note: str = "", required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-path", required=required, metavar="DIR",
                   help="EasyGen model directory (ours, EasyGen's release, a plain LLaMA/Vicuna with "
                        "--projector, or a LoRA adapter with --model-base)" + model_path_note)
    g.add_argument("--model-base", metavar="DIR", help="base model directory when --model-path is a LoRA adapter")
    g.add_argument("--lora", metavar="DIR", help="PEFT LoRA adapter directory applied on top of --model-path")
    g.add_argument("--projector", metavar="FILE", help="projector file, for a plain LLaMA/Vicuna --model-path")
    g.add_argument("--bidiffuser", metavar="DIR", help="BiDiffuser model directory (default: MODEL_PATH/bidiffuser)")
    g.add_argument("--bridge", metavar="DIR", help="LLM bridge directory for image replies (default: MODEL_PATH/bridge)")
    g.add_argument("--draw-with", choices=DRAW_WITH, default="auto",
                   help="how image replies are drawn: bridge (the LLM's hidden states over the description), clip "
                        "(the description re-encoded by CLIP, as EasyGen's released weights), auto (default: the "
                        "bridge when the model has one), or a released system from its own files (--drawer): "
                        "ella, lavi-bridge, paradiffusion")
    add_drawer_args(g)
    add_device_args(g)
    q = g.add_mutually_exclusive_group()
    q.add_argument("--load-8bit", dest="quantization", action="store_const", const="8bit",
                   help="LLM decoder layers in 8 bits (bitsandbytes LLM.int8(); CPU and CUDA)")
    q.add_argument("--load-4bit", dest="quantization", action="store_const", const="4bit",
                   help="LLM decoder layers in 4 bits (bitsandbytes NF4; CPU and CUDA)")
    g.add_argument("--bidiffuser-dtype", choices=PRECISION_NAMES, default="auto",
                   help="precision of the U-ViT and CLIP encoders, independent of the LLM's --dtype (default auto: "
                        "float16 autocast on CUDA, as the original EasyGen; float32 on CPU). The VAE and the "
                        "caption decoder always run in float32")
