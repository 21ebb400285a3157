"""Tiny, offline stand-ins for Vicuna: a LLaMA-style tokenizer trained in milliseconds and a small
LLaMA config. Tests and the demo use them; nothing here touches the network.

The tokenizer copies LLaMA's layout and behaviour so the code under test meets the same quirks as
with the real Vicuna tokenizer: ids 0/1/2 = ``<unk>``/``<s>``/``</s>``, ids 3..258 = the 256 byte
tokens ``<0x00>``..``<0xFF>`` (byte fallback: no text is ever ``<unk>``), SentencePiece-style
``▁`` word starts with a dummy prefix, BOS added on encode, ``pad_token`` = ``<unk>`` as in
Vicuna's training.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaTokenizer

from easygen.constants import IMG_CLOSE, IMG_OPEN
from easygen.llama_tokenizer import llama_tokenizer

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as in LLaMA
NUM_BYTE_TOKENS = 256


def default_corpus() -> list[str]:
    """A few hundred varied sentences: captions, VQA, chat phrases and the prompt vocabulary."""
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
    shapes = ["circle", "square", "triangle", "star", "rectangle"]
    places = ["on a white background", "in the middle of the picture", "next to a tree",
              "on a wooden table", "under a cloudy sky"]
    captions = [f"a {c} {s} {p}" for c, s, p in itertools.product(colours, shapes, places[:3])]
    captions += [f"A photo of a {c} {s}." for c, s in itertools.product(colours, shapes)]
    captions += [f"Two {s}s, one {a} and one {b}, {p}." for s, (a, b), p in
                 zip(itertools.cycle(shapes), itertools.combinations(colours, 2), itertools.cycle(places))]
    qa = [
        ("What is in the picture?", "A {c} {s}."),
        ("What colour is the {s}?", "It is {c}."),
        ("How many shapes are there?", "There is one {c} {s}."),
        ("Describe the image in detail.", "The image shows a {c} {s} on a plain background."),
        ("Can you draw a {c} {s}?", "Sure, here it is: " + IMG_OPEN + "a {c} {s}" + IMG_CLOSE),
        ("Show me a picture of a {s}.", "Here is a picture: " + IMG_OPEN + "a {c} {s}" + IMG_CLOSE),
    ]
    dialogue = [f"USER: {q.format(c=c, s=s)} ASSISTANT: {a.format(c=c, s=s)}"
                for (q, a), c, s in zip(itertools.cycle(qa), itertools.cycle(colours),
                                        itertools.islice(itertools.cycle(shapes), 120))]
    dialogue += [f"USER: {IMG_OPEN}{IMG_CLOSE} {q.format(c=c, s='shape')}" for (q, _), c in zip(qa, colours)]
    chat = [
        "Hello! How can I help you today?", "Thank you, that is very helpful.",
        "Could you explain that again, please?", "Of course. Let me describe it step by step.",
        "I am not sure, but it looks like a drawing.", "Yes.", "No.", "Maybe later.",
        "The answer is 42.", "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100.",
        "A chat between a curious user and an artificial intelligence assistant.",
        "What else would you like to know?", "Goodbye, and have a nice day!",
        "USER:", "ASSISTANT:", IMG_OPEN, IMG_CLOSE, f"{IMG_OPEN}a small picture{IMG_CLOSE}",
    ]
    return captions + dialogue + chat


def build_llama_tokenizer(out_dir: str | Path | None, corpus: list[str] | None = None,
                          vocab_size: int = 1000) -> LlamaTokenizer:
    """Train a LLaMA-style BPE tokenizer on ``corpus`` (default: :func:`default_corpus`).

    ``vocab_size`` is an upper bound (special + byte tokens included); a small corpus may yield
    fewer pieces, so size models with ``len(tokenizer)``. When ``out_dir`` is given, the tokenizer
    is written there with ``save_pretrained`` and ``easygen.llama_tokenizer.load_tokenizer(out_dir)``
    loads it offline, with the same behaviour as LLaMA's (see that module). ``<Img>``/``</Img>`` stay ordinary text (the corpus just makes them short pieces).
    """
    reserved = len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must exceed {reserved} (special + byte tokens), got {vocab_size}")
    texts = corpus if corpus is not None else default_corpus()
    # Special tokens are never learned as text: blank them out of the training data.
    for special in SPECIAL_TOKENS:
        texts = [t.replace(special, " ") for t in texts]

    # Train merges on words that start with "▁" (as SentencePiece does), with <Img>/</Img> kept
    # apart so they become single pieces. Because no merge ever spans a word start, the encoder
    # below (Metaspace, split=False, exactly LLaMA's) reproduces these word boundaries.
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Split(Regex(r"</?Img>"), behavior="isolated"),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - reserved, show_progress=False)
    trainer_tok.train_from_iterator(texts, trainer)
    learned = json.loads(trainer_tok.to_str())["model"]

    # LLaMA's id layout: specials, then <0x00>..<0xFF>, then the learned pieces.
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"<0x{b:02X}>": reserved - NUM_BYTE_TOKENS + b for b in range(NUM_BYTE_TOKENS)})
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    tokenizer = llama_tokenizer(vocab, merges)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A 2-layer LLaMA with grouped-query attention, small enough for CPU tests."""
    fields = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def init_tiny_easygen(out_dir: str | Path, bidiffuser_dir: str | Path | None = None, seed: int = 0,
                      corpus: list[str] | None = None, **config_overrides) -> Path:
    """Write a random-initialised tiny EasyGen directory (layout a of the builder).

    The projector input width and the image positions per image follow the BiDiffuser directory (its
    features are caption-decoder wide and num_text_tokens long); the directory links that BiDiffuser as ``bidiffuser/`` so the builder finds it.
    """
    import torch

    from bidiffuser.model_dir import read_config

    from .builder import save_pretrained
    from .model import EasyGenConfig, EasyGenForCausalLM

    mm_hidden, image_tokens = 32, {}
    if bidiffuser_dir is not None:
        bd = read_config(bidiffuser_dir)
        mm_hidden, image_tokens = bd.caption_decoder.n_embd, {"num_image_tokens": bd.uvit.num_text_tokens}
    tokenizer = build_llama_tokenizer(None, corpus)
    fields = tiny_llama_config(len(tokenizer)).to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        fields.pop(k, None)
    fields.update(mm_hidden_size=mm_hidden, projector_hidden_size=128, **image_tokens)
    fields.update(config_overrides)
    torch.manual_seed(seed)
    model = EasyGenForCausalLM(EasyGenConfig(**fields))
    return save_pretrained(model, tokenizer, out_dir, bidiffuser_dir)
