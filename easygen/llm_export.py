"""EasyGen's LLM as a plain LLaMA directory, for engines that know LLaMA but not EasyGen (vLLM).

The projector is not part of it: image features are projected in EasyGen's process and reach the
engine as prompt embeddings (``easygen.vllm_engine``). A LoRA adapter is merged first (the builder
does it). The directory carries the tokenizer and a chat template that writes EasyGen's Vicuna
layout, so a text-only conversation sent to the engine's chat API gets exactly the ids that
``EasyGenProcessor`` gives (no BOS, the "USER: ... ASSISTANT:" turns, "</s>" after each answer).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from bidiffuser.checkpoint import atomic_dir

# FastChat's "easygen" template (empty system message, ADD_COLON_TWO with " " and "</s>") in
# Jinja, as transformers and vLLM render chat templates. Images are not expressible here: image
# prompts go through EasyGen, which sends their embeddings.
CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' and messages[0]['content'] %}"
    "{{ messages[0]['content'] + ' ' }}{% endif %}"
    "{% set turns = messages[1:] if messages and messages[0]['role'] == 'system' else messages %}"
    "{% for m in turns %}"
    "{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

EXPORT_NOTE = "easygen-llm.json"  # what was exported from where, beside the weights
# vLLM's CPU attention kernels take these head sizes only (vLLM 0.30, CPU_ATTN); real LLaMAs have 128,
# the tiny test and demo models 16, which the export widens (``widen_heads``).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_head_dim(head_dim: int) -> int:
    """The head size to export for vLLM's CPU kernels: ``head_dim`` itself when they take it, else
    the smallest multiple of it that they take."""
    if head_dim in VLLM_CPU_HEAD_SIZES:
        return head_dim
    for size in VLLM_CPU_HEAD_SIZES:
        if size % head_dim == 0 and size > head_dim:
            return size
    raise ValueError(f"head size {head_dim}: no size vLLM's CPU attention takes is a multiple of it")


def widen_heads(state: dict, config, new_dim: int) -> dict:
    """The same attention with heads of ``new_dim`` dimensions (a multiple m of the old size):
    the extra dimensions of q, k and v are zero, so every dot product is unchanged; each old rotary
    pair (k, k + d/2) moves to new pair m*k, whose frequency theta^(-2mk/md) is the same number;
    q is scaled by sqrt(m) to undo the larger 1/sqrt(head_dim). Equal to the original up to float
    rounding of that scale."""
    old = config.head_dim
    if new_dim % old:
        raise ValueError(f"head size {new_dim} is not a multiple of {old}")
    m, half = new_dim // old, old // 2
    where = torch.tensor([m * k for k in range(half)] + [new_dim // 2 + m * k for k in range(half)])

    def rows(w: torch.Tensor, heads: int, scale: float = 1.0) -> torch.Tensor:
        w = w.reshape(heads, old, -1)
        out = w.new_zeros(heads, new_dim, w.shape[-1])
        out[:, where] = w * scale
        return out.reshape(heads * new_dim, -1)

    state = dict(state)
    for name in list(state):
        if not name.endswith("_proj.weight") or ".self_attn." not in name:
            continue
        w = state[name]
        if ".q_proj." in name:
            state[name] = rows(w, config.num_attention_heads, m ** 0.5)
        elif ".k_proj." in name or ".v_proj." in name:
            state[name] = rows(w, config.num_key_value_heads)
        elif ".o_proj." in name:
            state[name] = rows(w.t(), config.num_attention_heads).t().contiguous()
    if any(k.endswith("_proj.bias") and ".self_attn." in k for k in state):
        raise ValueError("widening heads with attention biases is not supported")
    return state


def export_llm(loaded, out_dir: str | os.PathLike, source: str = "", head_dim: int | None = None) -> Path:
    """Write ``loaded``'s LLM (an ``easygen.builder.LoadedModel``) as a ``LlamaForCausalLM``
    directory: config, safetensors in the model's dtype, tokenizer with the chat template.
    ``head_dim``: widen the attention heads to this size (``widen_heads``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = loaded.model
    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("model_type", "architectures", "mm_hidden_size", "projector_hidden_size",
                           "projector_type", "num_image_tokens", "transformers_version", "auto_map")}
    config = LlamaConfig(**fields)
    config.architectures = ["LlamaForCausalLM"]
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("projector.")}
    if head_dim is not None and head_dim != config.head_dim:
        if head_dim < config.head_dim:
            raise ValueError(f"heads can be widened, not narrowed ({config.head_dim} -> {head_dim})")
        state = widen_heads(state, config, head_dim)
        config.head_dim = head_dim
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    missing, unexpected = llama.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:  # the builder gave a LLaMA: anything else is a bug, never skipped
        raise RuntimeError(f"LLaMA export: missing {missing[:5]}, unexpected {unexpected[:5]}")
    llama.generation_config = model.generation_config
    with atomic_dir(out_dir) as tmp:
        llama.save_pretrained(str(tmp))
        tokenizer = loaded.tokenizer
        saved_template = getattr(tokenizer, "chat_template", None)
        tokenizer.chat_template = CHAT_TEMPLATE
        try:
            tokenizer.save_pretrained(str(tmp))
        finally:
            tokenizer.chat_template = saved_template
        # Read tokenizer.json as written: transformers' LlamaTokenizer class would rebuild the
        # normalizer and pre-tokenizer and lose the word start after "</s>" (easygen.llama_tokenizer).
        tokenizer_file = tmp / "tokenizer_config.json"
        tokenizer_config = json.loads(tokenizer_file.read_text())
        if tokenizer_config.get("tokenizer_class") == "LlamaTokenizer" and (tmp / "tokenizer.json").is_file():
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
            tokenizer_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        (tmp / EXPORT_NOTE).write_text(json.dumps({
            "exported_from": source, "layout": loaded.layout, "dtype": str(model.dtype).removeprefix("torch."),
            "num_image_tokens": model.config.num_image_tokens, "head_dim": config.head_dim,
            "original_head_dim": model.config.head_dim,
            "note": "the projector stays with EasyGen; images reach this model as prompt embeddings"}, indent=2) + "\n")
    return Path(out_dir)
