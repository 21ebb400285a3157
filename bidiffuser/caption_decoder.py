"""The UniDiffuser caption decoder: a GPT-2 prefix decoder that turns 77x64 text latents into captions.

Text latents are the CLIP ViT-L/14 text features (77x768) squeezed by ``encode_prefix`` (768->64);
``decode_prefix`` (64->768) expands them back and GPT-2 continues that 77-token prefix with a
caption that ends in ``<|EOS|>`` (the GPT-2 vocabulary plus that one token: 50258 for the real model).

Generation follows the original ``generate_beam`` scoring exactly (summed log-probabilities,
normalised by the number of generated tokens, finished beams frozen), but batched over inputs and
using the GPT-2 KV cache instead of re-running the whole prefix at every step.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import check_state_dict, read_state_dict, save_safetensors, strip_prefix
from .config_base import DictConfig
from .errors import BiDiffuserError, first_line

EOS_TOKEN = "<|EOS|>"
# Per-layer causal-mask buffers that old transformers saved with GPT-2; current GPT-2 has none.
_OLD_BUFFER = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
_LM_HEAD, _WTE = "gpt.lm_head.weight", "gpt.transformer.wte.weight"


@dataclass
class CaptionDecoderConfig(DictConfig):
    """Sizes of the caption decoder (GPT-2 plus the two prefix projections)."""

    vocab_size: int = 50258
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    prefix_length: int = 77  # CLIP text tokens fed as the GPT-2 prefix
    hidden_dim: int = 64  # text latent width (encode_prefix output)

    @classmethod
    def official(cls) -> "CaptionDecoderConfig":
        """GPT-2 small with '<|EOS|>' added, as in UniDiffuser-v1's ``caption_decoder.pth``."""
        return cls()

    @classmethod
    def tiny(cls, vocab_size: int = 512) -> "CaptionDecoderConfig":
        """A few-thousand-parameter decoder for tests; set ``vocab_size`` to ``len(tokenizer)``."""
        # 160 positions: room for the 77-token prefix plus the default 67 generated tokens.
        return cls(vocab_size=vocab_size, n_positions=160, n_embd=32, n_layer=2, n_head=2,
                   prefix_length=77, hidden_dim=8)




class CaptionDecoder(nn.Module):
    """GPT-2 prefix captioner with the official module names (``gpt``, ``encode_prefix``, ``decode_prefix``).

    ``tokenizer`` is a transformers fast tokenizer whose eos token is '<|EOS|>'; it may be None for a
    model that is only inspected (e.g. built on the meta device), but generation needs it.
    """

    def __init__(self, config: CaptionDecoderConfig, tokenizer=None):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.config = config
        self.tokenizer = tokenizer
        # '<|EOS|>' is the last token of the official vocabulary (added after gpt2's 50257).
        eos_id = tokenizer.eos_token_id if tokenizer is not None else config.vocab_size - 1
        gpt_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_positions,
                                n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                                bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
        self.gpt = GPT2LMHeadModel(gpt_config)
        self.encode_prefix = nn.Linear(config.n_embd, config.hidden_dim)
        self.decode_prefix = nn.Linear(config.hidden_dim, config.n_embd)

    @property
    def eos_token_id(self) -> int:
        return self.gpt.config.eos_token_id

    # ---------------------------------------------------------------- training

    def forward(self, tokens: torch.Tensor, prefix_embeds: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Caption loss: GPT-2 reads decode_prefix(encode_prefix(prefix_embeds)) then ``tokens``.

        tokens: B x T ids; prefix_embeds: B x L x n_embd CLIP text features; attention_mask: B x T
        over the tokens (0 = padding, ignored by the loss). The loss covers caption tokens only.
        """
        prefix = self.decode_prefix(self.encode_prefix(prefix_embeds))
        embeds = torch.cat([prefix, self.gpt.transformer.wte(tokens)], dim=1)
        L = prefix.shape[1]
        mask = None
        if attention_mask is not None:
            mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        logits = self.gpt(inputs_embeds=embeds, attention_mask=mask).logits
        targets = tokens if attention_mask is None else tokens.masked_fill(attention_mask == 0, -100)
        # Position L-1+i (last prefix slot, then each token) predicts caption token i.
        return F.cross_entropy(logits[:, L - 1:-1].flatten(0, 1).float(), targets.flatten(),
                               ignore_index=-100)

    # ---------------------------------------------------------------- generation

    def generate_captions(self, latents: torch.Tensor, method: str = "beam", beam_size: int = 5,
                          max_new_tokens: int = 67, use_cache: bool = True) -> list[str]:
        """Decode B x L x hidden_dim text latents into B captions (special tokens and spaces stripped).

        ``use_cache=False`` runs the same algorithm re-feeding the whole sequence each step (slow;
        kept as the reference the cached path is tested against).
        """
        if self.tokenizer is None:
            raise BiDiffuserError("caption decoder has no tokenizer: load it with load_caption_decoder")
        if latents.dim() != 3 or latents.shape[-1] != self.config.hidden_dim:
            raise BiDiffuserError(f"text latents must be B x L x {self.config.hidden_dim}, "
                                  f"got {tuple(latents.shape)}")
        if latents.shape[1] + max_new_tokens > self.config.n_positions:
            raise BiDiffuserError(f"prefix ({latents.shape[1]}) + max_new_tokens ({max_new_tokens}) "
                                  f"exceeds the decoder context ({self.config.n_positions})")
        if method not in ("beam", "greedy") or beam_size < 1 or max_new_tokens < 1:
            raise BiDiffuserError(f"bad generation settings: method={method!r} (beam|greedy), "
                                  f"beam_size={beam_size}, max_new_tokens={max_new_tokens}")
        param = self.decode_prefix.weight
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                prefix = self.decode_prefix(latents.to(param.device, param.dtype))
                if method == "beam":
                    seqs = self._beam_search(prefix, beam_size, max_new_tokens, use_cache)
                else:
                    seqs = self._greedy(prefix, max_new_tokens, use_cache)
        finally:
            self.train(was_training)
        return [self.tokenizer.decode(s, skip_special_tokens=True).strip() for s in seqs]

    def _next_logprobs(self, prefix, tokens, past, use_cache):
        """Log-probabilities of the next token for every row, and the updated KV cache.

        With the cache only the newest token is fed; without it the prefix and all tokens so far.
        ``tokens`` is None on the first step (the prefix alone).
        """
        if tokens is None:
            out = self.gpt(inputs_embeds=prefix, use_cache=use_cache)
        elif use_cache:  # embeddings rather than ids: ids equal to the pad id trigger HF warnings
            out = self.gpt(inputs_embeds=self.gpt.transformer.wte(tokens[:, -1:]),
                           past_key_values=past, use_cache=True)
        else:
            embeds = torch.cat([prefix, self.gpt.transformer.wte(tokens)], dim=1)
            out = self.gpt(inputs_embeds=embeds, use_cache=False)
        return out.logits[:, -1].float().log_softmax(-1), out.past_key_values

    def _beam_search(self, prefix, beam_size, max_new_tokens, use_cache) -> list[list[int]]:
        """Batched beam search over B x beam_size rows; returns the best beam's tokens per input."""
        B, K, eos = prefix.shape[0], beam_size, self.eos_token_id
        logp, past = self._next_logprobs(prefix, None, None, use_cache)
        scores, first = logp.topk(K, dim=-1)  # the K best first tokens of each input
        scores, tokens = scores.reshape(-1), first.reshape(-1, 1)  # row b*K + k
        lengths = torch.ones_like(scores)  # generated tokens counted in the score normalisation
        stopped = tokens[:, 0] == eos
        prefix = prefix.repeat_interleave(K, dim=0)
        if use_cache:
            past.batch_repeat_interleave(K)
        offsets = torch.arange(B, device=prefix.device)[:, None] * K
        for _ in range(max_new_tokens - 1):
            if stopped.all():
                break
            logp, past = self._next_logprobs(prefix, tokens, past, use_cache)
            V = logp.shape[-1]
            # A finished beam survives only as one zero-cost continuation (EOS as padding),
            # so its score and length stay fixed while it competes with live beams.
            logp[stopped] = float("-inf")
            logp[stopped, eos] = 0.0
            lengths = lengths + (~stopped).to(lengths.dtype)
            average = (scores[:, None] + logp) / lengths[:, None]
            average, flat = average.view(B, K * V).topk(K, dim=-1)
            source = (flat // V + offsets).reshape(-1)  # which row each new beam extends
            next_tokens = (flat % V).reshape(-1, 1)
            tokens = torch.cat([tokens[source], next_tokens], dim=1)
            lengths, stopped = lengths[source], stopped[source] | (next_tokens[:, 0] == eos)
            scores = average.reshape(-1) * lengths
            if use_cache:
                past.reorder_cache(source)
        best = (scores / lengths).view(B, K).argmax(-1) + offsets[:, 0]
        return [tokens[i, : int(lengths[i])].tolist() for i in best.tolist()]

    def _greedy(self, prefix, max_new_tokens, use_cache) -> list[list[int]]:
        """Batched argmax decoding until every row has produced EOS (or max_new_tokens)."""
        eos = self.eos_token_id
        tokens, past = None, None
        done = torch.zeros(prefix.shape[0], dtype=torch.bool, device=prefix.device)
        for _ in range(max_new_tokens):
            logp, past = self._next_logprobs(prefix, tokens, past, use_cache)
            next_tokens = logp.argmax(-1).masked_fill(done, eos)
            tokens = next_tokens[:, None] if tokens is None else torch.cat([tokens, next_tokens[:, None]], 1)
            done |= next_tokens == eos
            if done.all():
                break
        seqs = []
        for row in tokens.tolist():
            seqs.append(row[: row.index(eos) + 1] if eos in row else row)
        return seqs


# -------------------------------------------------------------------- tokenizer

_TINY_CORPUS = [
    "a dog running across a grassy field",
    "a man riding a horse on the beach",
    "two cats sleeping on a red couch",
    "a bowl of fruit on a wooden table",
    "a red double decker bus on a city street",
    "a woman holding an umbrella in the rain",
    "a plate of food with broccoli and rice",
    "a group of people standing next to a train",
    "a small boat floating on a calm lake",
    "a child flying a kite in a park",
    "a pizza with cheese and tomatoes on a plate",
    "an airplane flying over snowy mountains",
    "a cat sitting on top of a laptop computer",
    "a bathroom with a white sink and a mirror",
    "a giraffe standing near a tall tree",
    "a skateboarder doing a trick on a ramp",
    "a bird perched on a branch of a tree",
    "a kitchen with a stove and a refrigerator",
    "a tennis player swinging a racket",
    "an elephant walking through the water",
    "a clock tower in front of a blue sky",
    "a surfer riding a large wave in the ocean",
    "a teddy bear sitting on a bed",
    "a traffic light at a busy intersection",
]


def _ensure_eos(tokenizer):
    """Make '<|EOS|>' the eos token (adding it, as UniDiffuser did to the GPT-2 tokenizer)."""
    if EOS_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    elif tokenizer.eos_token != EOS_TOKEN:
        tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    return tokenizer


def build_tiny_tokenizer(out_dir: str | os.PathLike, corpus: list[str] | None = None,
                         vocab_size: int = 512):
    """Train a small byte-level BPE tokenizer offline, save it with save_pretrained, return it.

    Laid out like GPT-2's: '<|endoftext|>' is bos/unk, '<|EOS|>' (the last id) is eos and pad.
    ``vocab_size`` counts '<|EOS|>'; the vocabulary comes out smaller when the corpus runs out of merges.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    # One id is kept free for '<|EOS|>', added last as in the official tokenizer.
    bpe.train_from_iterator(corpus or _TINY_CORPUS, vocab_size=vocab_size - 1, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", eos_token="<|endoftext|>")
    _ensure_eos(tokenizer)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """Load a HF tokenizer directory (never the hub) and make '<|EOS|>' its eos token."""
    from transformers import AutoTokenizer

    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise BiDiffuserError(f"caption decoder tokenizer directory not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise BiDiffuserError(f"cannot load a tokenizer from {path}: {first_line(e)}") from None
    return _ensure_eos(tokenizer)


# -------------------------------------------------------------------- weights

def init_caption_decoder(config: CaptionDecoderConfig, tokenizer, seed: int = 0) -> CaptionDecoder:
    """A randomly initialised decoder (tiny preset); its vocabulary is set to ``len(tokenizer)``."""
    config = dataclasses.replace(config, vocab_size=len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CaptionDecoder(config, tokenizer).eval()


def official_state_dict(model: CaptionDecoder) -> dict[str, torch.Tensor]:
    """The weights in ``caption_decoder.pth`` layout: ``module.`` prefix, tied ``lm_head.weight``,
    and the per-layer ``attn.bias`` (causal mask) / ``attn.masked_bias`` buffers old GPT-2 saved."""
    sd = dict(model.state_dict())
    n, device = model.config.n_positions, model.decode_prefix.weight.device
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril().view(1, 1, n, n)
    for i in range(model.config.n_layer):
        sd[f"gpt.transformer.h.{i}.attn.bias"] = mask
        sd[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4, device=device)
    return {f"module.{k}": v for k, v in sd.items()}


def save_caption_decoder(model: CaptionDecoder, path: str | os.PathLike) -> None:
    """Write our own safetensors file (keys as ``model.state_dict()``), atomically."""
    save_safetensors(model.state_dict(), path)


def load_caption_decoder(path: str | os.PathLike, config: CaptionDecoderConfig,
                         tokenizer_dir: str | os.PathLike, device="cpu",
                         dtype: torch.dtype = torch.float32) -> CaptionDecoder:
    """Load ``caption_decoder.pth`` (official layout, with or without ``module.``, old buffers and
    ``lm_head.weight``) or our safetensors, strictly: any other mismatch is a CheckpointError."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) != config.vocab_size:
        raise BiDiffuserError(f"tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the "
                              f"caption decoder vocabulary is {config.vocab_size}")
    sd = strip_prefix(read_state_dict(path, "caption decoder checkpoint"), "module.")
    sd = {k: v for k, v in sd.items() if not _OLD_BUFFER.match(k)}
    if _LM_HEAD not in sd and _WTE in sd:
        sd[_LM_HEAD] = sd[_WTE]  # tied to the token embedding, so files may omit it
    model = CaptionDecoder(config, tokenizer)
    check_state_dict(model.state_dict(), sd, path)
    sd[_LM_HEAD] = sd[_WTE]  # keep the tie exact even if a file stored a stale copy
    model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype).eval()
