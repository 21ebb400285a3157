"""LaVi-Bridge's text side: Llama-2 (last hidden states, no mask) or the T5 encoder, tokenized as its
scripts tokenize (``padding="max_length"``, right-padded, truncated)."""
from __future__ import annotations

from pathlib import Path

import torch

from bidiffuser.checkpoint import read_json, require_file
from bidiffuser.clip import quiet_transformers
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
    """Llama-2 as ``test/llama2_unet.py`` runs it: the slow ``LlamaTokenizer`` of transformers 4.38 with
    ``pad_token = '[PAD]'``, and the causal LM's ``hidden_states[-1]`` (the final-norm output) over all
    77 positions, pads included. Tokens come from LLaMA's SentencePiece model itself, split on the
    special tokens as the slow tokenizer splits (``legacy`` as the tokenizer config says)."""

    SPECIALS = ("<unk>", "<s>", "</s>")

    def __init__(self, model, spm_path: Path, cfg: dict):
        import sentencepiece as spm
        self.model = model
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_path))
        self.add_bos, self.add_eos = bool(cfg.get("add_bos_token", True)), bool(cfg.get("add_eos_token", False))
        self.legacy = cfg.get("legacy") is not False  # transformers 4.38 takes a missing value as legacy
        # '[PAD]' is not in LLaMA's vocabulary: the slow tokenizer resolves it to the unknown piece (id 0)
        self.pad_id = self.sp.piece_to_id("[PAD]")
        self.special_ids = {self.sp.piece_to_id(t) for t in self.SPECIALS}
        if not self.legacy:
            # as transformers 4.38's get_spm_processor: the same model without SentencePiece's dummy prefix
            try:
                from sentencepiece import sentencepiece_model_pb2
            except ImportError:
                raise DrawingError(f"{spm_path}: its tokenizer config says legacy=false, which needs the protobuf "
                                   "package to read the SentencePiece model (pip install protobuf)") from None
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(spm_path.read_bytes())
            proto.normalizer_spec.add_dummy_prefix = False
            self.raw = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            self.unk_length = len(self.raw.encode("<unk>"))

    @classmethod
    def load(cls, directory: Path, device, dtype) -> "LlamaText":
        from transformers import LlamaForCausalLM

        try:
            spm_path = require_file(directory / "tokenizer.model", "LLaMA tokenizer")
            cfg = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
            with quiet_transformers():
                loaded = LlamaForCausalLM.from_pretrained(str(directory), dtype=dtype, output_loading_info=True)
            model = _checked(loaded, "Llama", directory)
            return cls(model.to(device), spm_path, cfg)
        except DrawingError:
            raise
        except BiDiffuserError as e:
            raise DrawingError(str(e)) from None
        except (OSError, ValueError, RuntimeError) as e:
            raise DrawingError(f"cannot load Llama from {directory}: {first_line(e)}") from None

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def _chunks(self, text: str):
        """(text, None) and (None, special id) in order: the slow tokenizer never splits a special token."""
        while text:
            hits = [(text.find(t), t) for t in self.SPECIALS if t in text]
            at, special = min(hits) if hits else (len(text), None)
            if text[:at]:
                yield text[:at], None
            if special is None:
                return
            yield None, self.sp.piece_to_id(special)
            text = text[at + len(special):]

    def pieces(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS, as ``LlamaTokenizer.tokenize`` (transformers 4.38) gives them."""
        if not text:
            return []
        if self.legacy:
            return [i for chunk, special in self._chunks(text)
                    for i in (self.sp.encode(chunk) if chunk is not None else [special])]
        ids = []
        for chunk, special in self._chunks("▁" + text.replace("▁", " ")):
            if chunk is None:
                ids.append(special)
            elif chunk.startswith(("▁", " ")):  # encoded after "<unk>", which is then dropped
                ids += self.raw.encode("<unk>" + chunk)[self.unk_length:]
            else:
                ids += self.raw.encode(chunk)
        if len(ids) > 1 and ids[0] == self.sp.piece_to_id("▁") and ids[1] in self.special_ids:
            ids = ids[1:]
        return ids

    def ids(self, prompt: str, max_length: int) -> list[int]:
        special = int(self.add_bos) + int(self.add_eos)
        body = self.pieces(prompt)[:max(0, max_length - special)]  # truncation keeps room for BOS/EOS
        ids = [self.sp.bos_id()] * self.add_bos + body + [self.sp.eos_id()] * self.add_eos
        return ids + [self.pad_id] * (max_length - len(ids))

    def encode(self, prompts: list[str], max_length: int, masked: bool):
        device = self.model.device
        ids = torch.tensor([self.ids(p, max_length) for p in prompts], device=device)
        states = self.model.model(input_ids=ids).last_hidden_state  # = hidden_states[-1] of the causal LM
        return states.float(), None


class T5Text:
    """t5-large's encoder and its ``tokenizer.json``, run as the scripts' ``AutoTokenizer`` runs it
    (transformers 4.38's T5TokenizerFast: the file's own pipeline, truncated to the length with room for
    ``</s>``, right-padded with ``<pad>``). The file is read with the tokenizers library directly, since
    transformers 5's T5Tokenizer rebuilds the normalizer and pre-tokenizer from code instead."""

    def __init__(self, model, tokenizer, pad_token: str):
        self.model, self.tokenizer = model, tokenizer
        self.pad_token = pad_token
        self.pad_id = tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise DrawingError(f"t5 tokenizer: its pad token {pad_token!r} is not in its vocabulary")

    @classmethod
    def load(cls, directory: Path, device, dtype) -> "T5Text":
        from tokenizers import Tokenizer
        from transformers import T5EncoderModel

        if not (directory / "config.json").is_file():
            raise DrawingError(f"t5: {directory} is not a transformers model folder (no config.json)")
        try:
            path = require_file(directory / "tokenizer.json", "T5 tokenizer")
            cfg = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
            pad = cfg.get("pad_token") or "<pad>"
            tokenizer = Tokenizer.from_file(str(path))
            with quiet_transformers():  # t5-large's file also holds the decoder: reported, not a problem
                loaded = T5EncoderModel.from_pretrained(str(directory), dtype=dtype, output_loading_info=True)
            model = _checked(loaded, "T5 encoder", directory)
            return cls(model.to(device), tokenizer, pad["content"] if isinstance(pad, dict) else pad)
        except DrawingError:
            raise
        except BiDiffuserError as e:
            raise DrawingError(str(e)) from None
        except Exception as e:  # tokenizers raises plain Exceptions on a malformed file
            raise DrawingError(f"cannot load T5 from {directory}: {first_line(e)}") from None

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    def tokenize(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) as ``tokenizer(prompts, padding="max_length", max_length=..., truncation=True)``."""
        tok = self.tokenizer
        tok.enable_truncation(max_length)
        tok.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token, length=max_length)
        try:
            encodings = tok.encode_batch(list(prompts))
        finally:
            tok.no_truncation()
            tok.no_padding()
        return (torch.tensor([e.ids for e in encodings]), torch.tensor([e.attention_mask for e in encodings]))

    def encode(self, prompts: list[str], max_length: int, masked: bool):
        device = self.model.device
        ids, mask = self.tokenize(prompts, max_length)
        ids, mask = ids.to(device), mask.to(device)
        # the U-Net scripts give the encoder no mask; t5_transformer.py gives it (and the transformer) one
        states = self.model(input_ids=ids, attention_mask=mask if masked else None)[0]
        return states.float(), (mask if masked else None)
