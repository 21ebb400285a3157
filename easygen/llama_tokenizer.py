"""Loading LLaMA/Vicuna tokenizers that tokenize exactly as LLaMA's SentencePiece model does.

EasyGen's released weights were trained with the slow, SentencePiece-backed ``LlamaTokenizer``
(``legacy`` behaviour). Two things decide whether a fast tokenizer agrees with it:

* merge order: SentencePiece merges the pair whose result has the highest score. A BPE merge
  list ordered any other way (transformers 5 orders pieces converted from ``tokenizer.model`` by
  id) tokenizes runs of spaces wrongly: ``"a  b"`` must be ``▁a ▁ ▁b``, not ``▁a ▁▁ b``;
* the word-start marker: every stretch of text, including the one right after ``</s>``, starts
  with ``▁`` (``"</s>USER"`` is ``</s> ▁US ER``), as the slow tokenizer encodes each stretch
  between special tokens on its own.

``load_tokenizer`` builds such a tokenizer from ``tokenizer.model`` (checked against
SentencePiece itself on probe strings) or from a ``tokenizer.json`` (checked against LLaMA's known
ids when the vocabulary is LLaMA's), and refuses with a clear error when it cannot agree.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import normalizers
from transformers import AutoTokenizer, LlamaTokenizer

from easygen.errors import EasyGenError

WORD_START = "▁"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

# Strings on which a converted tokenizer must agree with SentencePiece: runs of spaces, tabs and
# newlines, byte fallback, text around special tokens, and the prompt marks.
PROBES = (
    "a  b", "a   b    c", " leading", "trailing ", "  two leading", "           grabbed", "\n", " \n",
    "\ttabs\t\t\t\tout here", "ax\n####\nboo", "镇", "🦙Ꙋ", "USER: <Img>", "</Img> ",
    "A red circle.</s>USER: What colour is it? ASSISTANT:", "Numbers 1234567 and 3.14159!",
    "The llama (/ˈlɑːmə/; 🦙Spanish pronunciation: [ˈʎama]) is a domesticated camelid.",
    "def f(x):\n    return x  # comment", "Ünïcödé façade — naïve café", "<s>x</s>",
)

# LLaMA-1/2 (Vicuna v1.1) ids that only its real tokenizer gives; checked whenever a tokenizer.json
# carries LLaMA's vocabulary but no tokenizer.model to compare with.
LLAMA_VOCAB_MARKS = {29871: WORD_START, 3148: "▁US", 1001: "ER", 2646: "▁gra"}
LLAMA_KNOWN_IDS = {
    "a  b": [263, 29871, 289],
    "           grabbed": [9651, 2646, 1327, 287],
    " grabbed": [29871, 2646, 1327, 287],
    " \n": [259, 13],
    "ax\n####\nboo": [4853, 13, 4136, 13, 833, 29877],
    "</s>USER:": [2, 3148, 1001, 29901],
}


def merges_by_score(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges in SentencePiece's order: by the merged piece's score (highest first), then id.

    Every split of a piece into two pieces of the vocabulary is a merge that produces it."""
    merges = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def llama_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], **kwargs) -> LlamaTokenizer:
    """A fast LLaMA tokenizer with the slow tokenizer's behaviour (word start after specials)."""
    kwargs.setdefault("pad_token", "<unk>")  # Vicuna's training pads with <unk>
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_bos_token=True,
                         add_eos_token=False, **kwargs)
    # SentencePiece's dummy prefix is added to every stretch, even one that already starts with a
    # space (" a" is "▁ ▁a"); transformers' Metaspace skips it there, a normalizer does not.
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(WORD_START),
                                               normalizers.Replace(" ", WORD_START)])
    backend.pre_tokenizer = None
    return tok


def from_sentencepiece(model_file: str | os.PathLike) -> LlamaTokenizer:
    """The fast tokenizer equal to ``model_file`` (checked on ``PROBES``)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    tok = llama_tokenizer(vocab, merges_by_score(vocab, normal), unk_token=sp.id_to_piece(sp.unk_id()),
                          bos_token=sp.id_to_piece(sp.bos_id()), eos_token=sp.id_to_piece(sp.eos_id()))
    for text in PROBES:
        want = _slow_ids(sp, text)
        got = tok(text, add_special_tokens=False).input_ids
        if got != want:
            raise EasyGenError(f"{model_file}: cannot reproduce its tokenization of {text!r} with a fast "
                               f"tokenizer ({got} instead of {want}); this is not a LLaMA-style BPE model")
    return tok


def _slow_ids(sp, text: str) -> list[int]:
    """Ids as the slow LlamaTokenizer gives them (no BOS): each stretch between special tokens is
    encoded on its own by SentencePiece."""
    ids, rest = [], text
    while rest:
        hits = [(rest.find(s), s) for s in SPECIAL_TOKENS if s in rest]
        at, special = min(hits) if hits else (len(rest), None)
        if rest[:at]:
            ids += sp.encode(rest[:at])
        if special is None:
            break
        ids.append(sp.piece_to_id(special))
        rest = rest[at + len(special):]
    return ids


def _is_sentencepiece_bpe(raw: dict) -> bool:
    model = raw.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and WORD_START in model.get("vocab", {})


def from_tokenizer_json(path: str | os.PathLike) -> LlamaTokenizer:
    """The legacy LLaMA tokenizer with ``path``'s vocabulary and merges.

    With LLaMA's own vocabulary its merge order is checked against LLaMA's known ids (a file
    converted with merges out of order is refused); other vocabularies are trusted as they are."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    vocab = raw["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in raw["model"]["merges"]]
    tok = llama_tokenizer(vocab, merges)
    if all(vocab.get(piece) == i for i, piece in LLAMA_VOCAB_MARKS.items()):
        for text, want in LLAMA_KNOWN_IDS.items():
            got = tok(text, add_special_tokens=False).input_ids
            if got != want:
                raise EasyGenError(
                    f"{path} does not tokenize as LLaMA ({text!r} -> {got}, LLaMA gives {want}): its merges "
                    "are out of order (a file converted from tokenizer.model by a recent transformers). "
                    "Put LLaMA's tokenizer.model in the directory, which is then used instead.")
    return tok


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer of a model directory, LLaMA-exact when it is a LLaMA/Vicuna tokenizer.

    ``tokenizer.model`` (SentencePiece) wins over ``tokenizer.json``; a tokenizer of another kind
    (not SentencePiece-style BPE) is loaded by ``AutoTokenizer`` unchanged."""
    directory = Path(directory)
    if (directory / "tokenizer.model").is_file():
        return from_sentencepiece(directory / "tokenizer.model")
    tj = directory / "tokenizer.json"
    if tj.is_file():
        try:
            raw = json.loads(tj.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise EasyGenError(f"{tj}: unreadable tokenizer ({e})") from None
        if _is_sentencepiece_bpe(raw):
            return from_tokenizer_json(tj)
    return AutoTokenizer.from_pretrained(str(directory))
