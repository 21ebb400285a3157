"""``easygen export-llm``: EasyGen's LLM as a plain LLaMA directory for vLLM (or any LLaMA engine).

The projector stays with EasyGen (``easygen serve --vllm-url`` sends the projected image vectors as
prompt embeddings); a LoRA adapter is merged; the tokenizer and a chat template of EasyGen's Vicuna
layout come along. Import-light: argparse only."""
from __future__ import annotations

import argparse

from bidiffuser.cliutil import positive_int


def head_dim_arg(text: str):
    return text if text in ("auto", "keep") else positive_int(text)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export-llm", help="write the LLM as a plain LLaMA directory, to serve with vLLM",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, metavar="DIR",
                   help="EasyGen model directory (ours, EasyGen's release, or a LoRA adapter with --model-base)")
    p.add_argument("--model-base", metavar="DIR", help="base model directory when --model-path is a LoRA adapter")
    p.add_argument("--lora", metavar="DIR", help="PEFT LoRA adapter directory, merged into the export")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="weights' dtype: the one `easygen serve --dtype` runs the model in, so both engines compute "
                        "alike (default float32, as serve's default)")
    p.add_argument("--head-dim", type=head_dim_arg, default="auto", metavar="N|auto|keep",
                   help="attention head size to write: auto (default) widens heads that vLLM's CPU kernels do "
                        "not take (under 32: the tiny and demo models) to the nearest size they take, exactly "
                        "equivalent up to float rounding; keep leaves them; N asks for a multiple of the head size")
    return p


def run(args) -> int:
    from ..builder import load_pretrained
    from ..errors import EasyGenError
    from ..llm_export import export_llm, vllm_head_dim

    loaded = load_pretrained(args.model_path, model_base=args.model_base, lora=args.lora, merge_lora=True,
                             load_bidiffuser=False, dtype=args.dtype, device="cpu")
    head_dim = args.head_dim
    if head_dim in ("auto", "keep"):
        head = loaded.model.config.head_dim
        head_dim = vllm_head_dim(head) if head_dim == "auto" else head
    try:
        out = export_llm(loaded, args.out, source=str(args.model_path), head_dim=head_dim)
    except ValueError as e:
        raise EasyGenError(f"--head-dim: {e}") from None
    print(f"exported the LLM of {args.model_path} to {out} ({loaded.layout}, head size {head_dim}); serve it with\n"
          f"  python -m vllm.entrypoints.openai.api_server --model {out} --enable-prompt-embeds "
          f"--dtype {str(loaded.model.dtype).removeprefix('torch.')}")
    return 0
