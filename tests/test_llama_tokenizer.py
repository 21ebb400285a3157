"""The real LLaMA-1/2 (Vicuna v1.1) vocabulary: our tokenizer loading and our prompt layout give the
ids the original EasyGen code gives, labels included.

The fixture ``tests/fixtures/llama_tokenizer/tokenizer.model`` is LLaMA's tokenizer rebuilt from the
npm package llama-tokenizer-js (``scripts/llama_tokenizer_fixture.py``). The original code's
tokenizer is the slow SentencePiece ``LlamaTokenizer``; ``R`` below is that tokenizer written
against SentencePiece directly, and the ``original_*`` functions follow the original's
construction of image prompts, training samples and VQA prompts step by step.
"""
from __future__ import annotations

import importlib.util
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from easygen.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from easygen.errors import EasyGenError
from easygen.llama_tokenizer import _slow_ids, load_tokenizer
from easygen.processor import EasyGenProcessor

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = ROOT / "tests" / "fixtures" / "llama_tokenizer" / "tokenizer.model"
IMG = [IMAGE_TOKEN_ID] * 77
VQA_SUFFIX = " please giving an short answer."


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(MODEL_FILE))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Vicuna-like directory that ships only tokenizer.model."""
    d = tmp_path_factory.mktemp("vicuna_tokenizer")
    shutil.copy(MODEL_FILE, d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def proc(tok):
    return EasyGenProcessor(tok)


def R(sp, text: str) -> list[int]:
    """The original's ``tokenizer(text).input_ids``: slow LlamaTokenizer, BOS included."""
    return [1] + _slow_ids(sp, text)


# ------------------------------------------------------------------ the original's constructions
def original_prefix(sp) -> list[int]:
    """diff_llama.py prompt_wrap of "USER: <Img><ImageHere></Img> ": BOS prefix, image, suffix[1:]."""
    return R(sp, "USER: <Img>") + IMG + R(sp, "</Img> ")[1:]


def original_caption_sample(sp, query: str, text: str) -> tuple[list[int], list[int]]:
    """train.py's caption datasets: ids after the image prefix, labels after 88 ignored positions."""
    ids = R(sp, query + " ASSISTANT: " + text + "</s>")[1:]
    instruction_len = len(R(sp, query + " ASSISTANT: "))
    labels = [IGNORE_INDEX] * (instruction_len - 2) + ids[instruction_len - 2:]
    return original_prefix(sp) + ids, [IGNORE_INDEX] * 88 + labels


def original_masked(sp, conversation: str, drop: int) -> tuple[list[int], list[int]]:
    """train.py's preprocess_llava / preprocess_text_bind masking, then ``[drop:]``."""
    ids = R(sp, conversation)
    target = list(ids)
    sep = "ASSISTANT: "
    cur = 1
    target[:cur] = [IGNORE_INDEX] * cur
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(R(sp, rou))
        instruction_len = len(R(sp, parts[0])) - 2
        target[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    assert cur == len(ids), "the original would have masked the whole sample (tokenization mismatch)"
    return ids[drop:], target[drop:]


def vicuna_prompt(turns: list[tuple[str, str]]) -> str:
    """FastChat vicuna_v1.1 with the original's empty system message."""
    return "".join(f" USER: {q} ASSISTANT: {a}</s>" if i == 0 else f"USER: {q} ASSISTANT: {a}</s>"
                   for i, (q, a) in enumerate(turns))


# ------------------------------------------------------------------ the fixture is LLaMA's vocabulary
def test_fixture_reproduces_the_packages_llama_ids(sp):
    spec = importlib.util.spec_from_file_location("fixture", ROOT / "scripts" / "llama_tokenizer_fixture.py")
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    for text, want in fixture.PACKAGE_CASES.items():
        assert sp.encode(text) == want, text
    assert sp.get_piece_size() == 32000 and sp.id_to_piece(29871) == "▁"


# ------------------------------------------------------------------ loading
def probe_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["USER:", "ASSISTANT:", "<Img>", "</Img>", "</s>", "a", "red", "circle", "What's", "colour?",
             "Describe", "the", "image.", "12", "3.5", "naïve", "镇", "🦙", "x_y", "(ok)", "don't", "\n", "\t"]
    seps = [" ", " ", " ", "  ", "", "   ", "\n", " \n "]
    return ["".join(rng.choice(seps) * (k > 0 or rng.random() < 0.3) + rng.choice(words)
                    for k in range(rng.randint(1, 8))) + rng.choice(["", " ", "  "]) for _ in range(n)]


def test_tokenizer_model_only_directory_tokenizes_exactly_as_llama(tok, sp):
    probes = probe_strings(300)
    assert all(tok(t, add_special_tokens=False).input_ids == _slow_ids(sp, t) for t in probes)
    assert tok("a  b", add_special_tokens=False).input_ids == [263, 29871, 289]       # ▁a ▁ ▁b
    assert tok("a</s>USER:", add_special_tokens=False).input_ids == [263, 2, 3148, 1001, 29901]
    assert tok("hi").input_ids == [1, 7251] and tok.pad_token_id == 0


def test_transformers_conversion_is_wrong_and_refused(model_dir, sp, tmp_path):
    """transformers 5's own conversion of tokenizer.model disagrees with LLaMA; a tokenizer.json
    written from it is refused with a clear error, while our own tokenizer.json loads exactly."""
    from transformers import LlamaTokenizer

    converted = LlamaTokenizer.from_pretrained(str(model_dir))
    probes = probe_strings(300)
    agree = sum(converted(t, add_special_tokens=False).input_ids == _slow_ids(sp, t) for t in probes)
    assert agree < 250  # the reason load_tokenizer exists

    bad = tmp_path / "converted"
    converted.save_pretrained(str(bad))
    with pytest.raises(EasyGenError, match="does not tokenize as LLaMA.*tokenizer.model"):
        load_tokenizer(bad)

    good = tmp_path / "ours"
    load_tokenizer(model_dir).save_pretrained(str(good))
    assert not (good / "tokenizer.model").exists()
    reloaded = load_tokenizer(good)
    assert all(reloaded(t, add_special_tokens=False).input_ids == _slow_ids(sp, t) for t in probes)


# ------------------------------------------------------------------ the layout, against the original
def test_image_prefix_is_the_originals_88_positions(proc, sp):
    prefix = original_prefix(sp)
    assert len(prefix) == 88 and prefix[:7] == [1, 3148, 1001, 29901, 529, 25518, 29958]
    assert prefix[-4:] == [1533, 25518, 29958, 29871]  # "</Img> ": its trailing space is a token
    ids = proc.tokenize_prompt(proc.build_prompt([{"role": "user", "content": "Hi", "num_images": 1}]))
    assert ids[:88] == prefix


@pytest.mark.parametrize("query,caption", [
    ("Describe the image concisely.", "A man riding a wave on top of a surfboard."),
    ("Provide a brief description of the given image.", "two  dogs play\tin the snow"),
])
def test_caption_training_sample(proc, sp, query, caption):
    want_ids, want_labels = original_caption_sample(sp, query, caption)
    out = proc.tokenize_conversation([{"role": "user", "content": query, "num_images": 1},
                                      {"role": "assistant", "content": caption}])
    assert out["input_ids"] == want_ids
    assert out["labels"] == want_labels


def test_vqa_prompt(proc, sp):
    question = "What color is the bus?"
    want = original_prefix(sp) + R(sp, question + VQA_SUFFIX + " ASSISTANT:")[1:]
    prompt = proc.build_prompt([{"role": "user", "content": question + VQA_SUFFIX, "num_images": 1}])
    assert proc.tokenize_prompt(prompt) == want


def test_multi_turn_llava_sample(proc, sp):
    """preprocess_llava: the image first, the conversation tokenized whole and cut with [5:]."""
    turns = [("What is the man doing?", "He is surfing."),
             ("Is it dangerous?", "It can be, the waves are big.\nBe careful."),
             ("Thanks!", "You're welcome.")]
    ids, labels = original_masked(sp, vicuna_prompt(turns), drop=5)
    messages = []
    for i, (q, a) in enumerate(turns):
        messages += [{"role": "user", "content": q, "num_images": int(i == 0)}, {"role": "assistant", "content": a}]
    out = proc.tokenize_conversation(messages)
    assert out["input_ids"] == original_prefix(sp) + ids
    assert out["labels"] == [IGNORE_INDEX] * 88 + labels
    # Generation continues the same ids: the prompt for the last answer is a prefix of the sample.
    prompt = proc.tokenize_prompt(proc.build_prompt(messages[:-1]))
    assert out["input_ids"][:len(prompt)] == prompt


def test_text_only_sample(proc, sp):
    """preprocess_text_bind: no image, so no BOS (the original cuts it with [2:])."""
    turns = [("Write a haiku about the sea.", "Waves fold into foam"), ("Another one?", "Salt wind, gulls.")]
    ids, labels = original_masked(sp, vicuna_prompt(turns), drop=2)
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    out = proc.tokenize_conversation(messages)
    assert out["input_ids"] == ids and out["labels"] == labels
    assert out["input_ids"][:3] == [3148, 1001, 29901]


def test_eval_prompts_of_the_easygen_style(proc, sp):
    from easygen.eval.prompts import PROMPT_STYLES

    style = PROMPT_STYLES["easygen"]
    cap = proc.tokenize_prompt(proc.build_prompt([{"role": "user", "content": style.caption, "num_images": 1}]))
    assert cap == original_prefix(sp) + R(sp, style.caption + " ASSISTANT:")[1:]
    q = "Is there a dog?"
    vqa = proc.tokenize_prompt(proc.build_prompt(
        [{"role": "user", "content": style.vqa.format(question=q), "num_images": 1}]))
    assert vqa == original_prefix(sp) + R(sp, q + VQA_SUFFIX + " ASSISTANT:")[1:]
