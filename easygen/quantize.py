"""8-bit and 4-bit LLM weights (``--load-8bit`` / ``--load-4bit``, as in LLaVA and FastChat) through
bitsandbytes, which runs both on CPU and on CUDA (torchao covers int8 on CPU but its int4 formats
need CUDA kernels or a prototype API; see docs/official-weights.md).

The decoder layers' Linear layers are replaced one at a time by bitsandbytes' LLM.int8()
(``Linear8bitLt``) or NF4 (``Linear4bit``) layers, quantized as they move to the device; the token
embeddings, ``lm_head``, the norms and the projector stay in the LLM's dtype (as transformers
keeps ``lm_head``). A quantized model is for inference (and for LoRA on top, as QLoRA does).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import EasyGenError

QUANTIZATIONS = ("8bit", "4bit")


def _bnb():
    # On CPU it reports an optional kernels package it did not find, and LLM.int8() says on every
    # call that it casts the matmul input to float16: expected, not news to a user.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise EasyGenError("--load-8bit/--load-4bit need bitsandbytes (pip install bitsandbytes)") from None
    return bitsandbytes


def quantize_llm(model, bits: str, device: torch.device, compute_dtype: torch.dtype) -> int:
    """Quantize ``model``'s decoder layers in place onto ``device``; returns how many Linear layers
    were replaced."""
    if bits not in QUANTIZATIONS:
        raise EasyGenError(f"unknown quantization {bits!r} (choose from {', '.join(QUANTIZATIONS)})")
    bnb = _bnb()
    if compute_dtype == torch.float32 and bits == "8bit":
        compute_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16  # int8 matmuls take half inputs
    replaced = 0
    for parent in model.model.layers.modules():
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            weight = child.weight.data.to(compute_dtype)
            bias = child.bias is not None
            if bits == "8bit":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias,
                                          has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias,
                                        compute_dtype=compute_dtype, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if bias:
                new.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, new.to(device))  # bitsandbytes quantizes on the move
            replaced += 1
    _trim_heap()
    return replaced


def _trim_heap() -> None:
    """Hand the freed full-precision weights back to the system (glibc keeps freed heap memory,
    which would keep the process as large as the unquantized model)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
