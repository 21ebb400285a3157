"""LaVi-Bridge's text side: Llama-2 (last hidden states, no mask) or the T5 encoder, tokenized as its
scripts tokenize (``padding="max_length"``, right-padded, truncated)."""
from __future__ import annotations

from pathlib import Path

import torch

from bidiffuser.checkpoint import read_json, require_file
from bidiffuser.errors import BiDiffuserError, first_line

from .backend import DrawingError


def _checked(model_and_info, what: str, directory: Path):
    """A transformers model loaded with ``output_loading_info``; missing or mis-shaped keys refuse it.
    (Unexpected keys are normal: t5-large's file also holds the decoder the encoder does not use.)"""
    model, info = model_and_info
    bad = {k: info.get(k) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise DrawingError(f"{what} {directory} does not fit its config: "
                           + "; ".join(f"{k}: {list(v)[:4]}" for k, v in bad.items()))
    return model.eval().requires_grad_(False)


class LlamaText:
    """Llama-2 as ``test/llama2_unet.py`` runs it: LlamaTokenizer with ``pad_token = '[PAD]'`` and the
    causal LM's ``hidden_states[-1]`` (the final-norm output) over all 77 positions, pads included."""

    def __init__(self, model, sp, add_bos: bool, add_eos: bool):
        import sentencepiece  # noqa: F401  (the tokenizer is LLaMA's SentencePiece model itself)
        self.model, self.sp, self.add_bos, self.add_eos = model, sp, add_bos, add_eos
        # '[PAD]' is not in LLaMA's vocabulary: the slow tokenizer resolves it to the unknown piece (id 0)
        self.pad_id = sp.piece_to_id("[PAD]")

    @classmethod
    def load(cls, directory: Path, device, dtype) -> "LlamaText":
        import sentencepiece as spm
        from transformers import LlamaForCausalLM

        try:
            spm_path = require_file(directory / "tokenizer.model", "LLaMA tokenizer")
            cfg = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
            sp = spm.SentencePieceProcessor(model_file=str(spm_path))
            model = _checked(LlamaForCausalLM.from_pretrained(str(directory), dtype=dtype, output_loading_info=True),
                             "Llama", directory)
        except DrawingError:
            raise
        except BiDiffuserError as e:
            raise DrawingError(str(e)) from None
        except (OSError, ValueError, RuntimeError) as e:
            raise DrawingError(f"cannot load Llama from {directory}: {first_line(e)}") from None
        return cls(model.to(device), sp, bool(cfg.get("add_bos_token", True)), bool(cfg.get("add_eos_token", False)))

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def ids(self, prompt: str, max_length: int) -> list[int]:
        body = self.sp.encode(prompt)
        special = int(self.add_bos) + int(self.add_eos)
        body = body[:max(0, max_length - special)]  # truncation=True keeps room for the special tokens
        ids = [self.sp.bos_id()] * self.add_bos + body + [self.sp.eos_id()] * self.add_eos
        return ids + [self.pad_id] * (max_length - len(ids))

    def encode(self, prompts: list[str], max_length: int, masked: bool):
        device = self.model.device
        ids = torch.tensor([self.ids(p, max_length) for p in prompts], device=device)
        states = self.model.model(input_ids=ids).last_hidden_state  # = hidden_states[-1] of the causal LM
        return states.float(), None


class T5Text:
    """t5-large's encoder with its own tokenizer (``AutoTokenizer``), ``[0]`` of the encoder output."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def load(cls, directory: Path, device, dtype) -> "T5Text":
        from transformers import AutoTokenizer, T5EncoderModel

        if not (directory / "config.json").is_file():
            raise DrawingError(f"t5: {directory} is not a transformers model folder (no config.json)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
            model = _checked(T5EncoderModel.from_pretrained(str(directory), dtype=dtype, output_loading_info=True),
                             "T5 encoder", directory)
        except DrawingError:
            raise
        except BiDiffuserError as e:
            raise DrawingError(str(e)) from None
        except (OSError, ValueError, RuntimeError) as e:
            raise DrawingError(f"cannot load T5 from {directory}: {first_line(e)}") from None
        return cls(model.to(device), tokenizer)

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    def encode(self, prompts: list[str], max_length: int, masked: bool):
        device = self.model.device
        tok = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        # the U-Net scripts give the encoder no mask; t5_transformer.py gives it (and the transformer) one
        states = self.model(input_ids=ids, attention_mask=mask if masked else None)[0]
        return states.float(), (mask if masked else None)
