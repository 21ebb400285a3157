"""EasyGen prompt building (FastChat template), tokenization with image sentinels, labels, padding,
and the tiny offline LLaMA tokenizer."""
from __future__ import annotations

import importlib
import time

import pytest
import torch
from fastchat.conversation import conv_templates, get_conv_template

import fastchat_ext.conversation as easygen_conv
from easygen.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_SLOT, IMAGE_TOKEN_ID, IMG_CLOSE
from easygen.llama_tokenizer import load_tokenizer
from easygen.processor import EasyGenProcessor
from easygen.tiny import build_llama_tokenizer, tiny_llama_config

# Several turns, images in two different user turns (one implicit, one LLaVA-style "<image>"),
# and an assistant reply that asks for a picture.
MESSAGES = [
    {"role": "user", "content": "What is in the picture?", "num_images": 1},
    {"role": "assistant", "content": "A red circle on a white background."},
    {"role": "user", "content": "Thanks. Can you draw a blue star?"},
    {"role": "assistant", "content": "Sure, here it is: <Img>a blue star</Img>"},
    {"role": "user", "content": "And what colour is this <image> square?"},
    {"role": "assistant", "content": "It is green."},
]
REPLIES = [m["content"] for m in MESSAGES if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny tokenizer, saved and reloaded as the builder loads it (the offline user path)."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_llama_tokenizer(out)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def proc(tokenizer):
    return EasyGenProcessor(tokenizer)


def runs(ids, value=IMAGE_TOKEN_ID):
    """(start, length) of each maximal run of ``value``."""
    out, start = [], None
    for i, x in enumerate(list(ids) + [None]):
        if x == value and start is None:
            start = i
        elif x != value and start is not None:
            out.append((start, i - start))
            start = None
    return out


# ---------------------------------------------------------------- template and prompts
def test_template_registration_is_idempotent():
    before = conv_templates["easygen"]
    easygen_conv.register_template()
    importlib.reload(easygen_conv)  # registers again at import: must not raise
    conv = easygen_conv.new_conversation()
    assert conv == before and conv is not before  # a fresh copy with the same fields
    assert (conv.roles, conv.sep, conv.sep2, conv.system_message) == (("USER", "ASSISTANT"), " ", "</s>", "")


def test_user_message_slots():
    um = easygen_conv.user_message
    assert um("What is it?", 1) == f"{IMAGE_SLOT} What is it?"
    assert um("Compare them.", 2) == f"{IMAGE_SLOT}{IMAGE_SLOT} Compare them."
    assert um("No image.") == "No image."
    assert um("<image>\nDescribe.", 1) == f"{IMAGE_SLOT}\nDescribe."  # LLaVA style: normalised, not added
    assert um(f"Look: {IMAGE_SLOT}") == f"Look: {IMAGE_SLOT}"
    with pytest.raises(ValueError, match="marks 1 image"):
        um("<image> and", 2)


def test_prompt_matches_fastchat_vicuna(proc):
    conv = get_conv_template("vicuna_v1.1")
    conv.set_system_message("")
    written = [f"{IMAGE_SLOT} What is in the picture?", REPLIES[0],
               "Thanks. Can you draw a blue star?", REPLIES[1],
               f"And what colour is this {IMAGE_SLOT} square?", REPLIES[2]]
    for i, text in enumerate(written):
        conv.append_message(conv.roles[i % 2], text)
    # The original EasyGen starts at "USER:": no separator after the empty system message.
    assert " " + proc.build_prompt(MESSAGES) == conv.get_prompt()

    conv.append_message(conv.roles[0], "One more?")
    conv.append_message(conv.roles[1], None)
    prompt = proc.build_prompt(MESSAGES + [{"role": "user", "content": "One more?"}])
    assert " " + prompt == conv.get_prompt() and prompt.endswith("USER: One more? ASSISTANT:")
    assert proc.build_prompt(MESSAGES[:1], system="Be brief.").startswith("Be brief. USER: ")


def test_bad_messages_are_rejected(proc):
    with pytest.raises(ValueError, match="alternate"):
        proc.build_prompt([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="unknown role"):
        proc.build_prompt([{"role": "system", "content": "hi"}])


# ---------------------------------------------------------------- prompt ids
def test_tokenize_prompt_without_image_equals_tokenizer_without_bos(proc, tokenizer):
    """As in the original, BOS comes with the image prefix: a text-only prompt has none."""
    text_only = [{"role": m["role"], "content": m["content"].replace("<image> ", "")} for m in MESSAGES]
    for prompt in [proc.build_prompt(text_only[:1]), proc.build_prompt(text_only),
                   "plain text with </s> inside and ü"]:
        assert IMAGE_PLACEHOLDER not in prompt
        assert proc.tokenize_prompt(prompt) == tokenizer(prompt, add_special_tokens=False).input_ids


def test_image_runs_are_77_sentinels_in_place(proc, tokenizer):
    prompt = proc.build_prompt(MESSAGES[:5])
    ids = proc.tokenize_prompt(prompt)
    assert runs(ids) == [(s, 77) for s, _ in runs(ids)] and len(runs(ids)) == 2
    assert proc.count_images(ids) == 2 and proc.count_images(torch.tensor(ids)) == 2
    # Independently: the first run starts right after BOS and the ids of the text before the
    # placeholder; after each image, "</Img> " and the rest are each tokenized on their own.
    head, middle, tail = prompt.split(IMAGE_PLACEHOLDER)
    (first, _), (second, _) = runs(ids)
    assert ids[:first] == tokenizer(head).input_ids

    def after_image(text):
        close = IMG_CLOSE + " "
        assert text.startswith(close)
        return (tokenizer(close, add_special_tokens=False).input_ids
                + tokenizer(text[len(close):], add_special_tokens=False).input_ids)
    assert ids[first + 77:second] == after_image(middle)
    assert ids[second + 77:] == after_image(tail)


def test_eos_text_is_one_token(tokenizer):
    ids = tokenizer("done</s>", add_special_tokens=False).input_ids
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id == 2
    assert tokenizer.convert_ids_to_tokens(ids[:-1]) == tokenizer.tokenize("done")


# ---------------------------------------------------------------- training labels
def test_labels_cover_exactly_the_replies(proc):
    out = proc.tokenize_conversation(MESSAGES)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels) and ids == proc.tokenize_prompt(proc.build_prompt(MESSAGES))

    # Expected labelled positions, from prompt lengths (not offsets): reply i occupies the ids
    # between the prompt ending "ASSISTANT:" and the prompt ending "reply</s>".
    expected = set()
    for i in range(1, len(MESSAGES), 2):
        start = len(proc.tokenize_prompt(proc.build_prompt(MESSAGES[:i])))
        end = len(proc.tokenize_prompt(proc.build_prompt(MESSAGES[:i + 1])))
        expected |= set(range(start, end))
    labelled = {j for j, lab in enumerate(labels) if lab != IGNORE_INDEX}
    assert labelled == expected
    assert all(labels[j] == ids[j] for j in labelled)
    assert all(labels[j] == IGNORE_INDEX for j, x in enumerate(ids) if x == IMAGE_TOKEN_ID)

    # Each labelled span decodes to exactly one reply and its "</s>".
    spans = [(s, n) for s, n in runs([lab != IGNORE_INDEX for lab in labels], True)]
    decoded = [proc.decode(labels[s:s + n], skip_special_tokens=False) for s, n in spans]
    assert decoded == [r + "</s>" for r in REPLIES]


def test_truncation_never_splits_an_image(proc):
    full = proc.tokenize_conversation(MESSAGES)
    (first, n), (second, _) = runs(full["input_ids"])
    # A cut inside the second image drops that image and everything after.
    out = proc.tokenize_conversation(MESSAGES, max_length=second + 10)
    assert out["input_ids"] == full["input_ids"][:second] and out["labels"] == full["labels"][:second]
    assert proc.count_images(out["input_ids"]) == 1
    # A cut in text keeps exactly max_length ids.
    out = proc.tokenize_conversation(MESSAGES, max_length=first + n + 3)
    assert out["input_ids"] == full["input_ids"][:first + n + 3]
    assert len(out["labels"]) == first + n + 3


# ---------------------------------------------------------------- batches and decoding
def test_pad_batch_left_and_right(proc, tokenizer):
    a, b = [1, 5, 6, 7], [1, 8]
    left = proc.pad_batch([a, b], side="left")
    assert left["input_ids"].tolist() == [a, [0, 0, 1, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert tokenizer.pad_token_id == 0 == tokenizer.unk_token_id  # Vicuna pads with <unk>

    right = proc.pad_batch([a, b], side="right", labels=[[-100, 5, 6, 7], [-100, 8]])
    assert right["input_ids"].tolist() == [a, [1, 8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 5, 6, 7], [-100, 8, -100, -100]]
    assert right["input_ids"].dtype == torch.long


def test_decode_skips_sentinels_and_special_tokens(proc, tokenizer):
    text = "USER: <Img></Img> a red circle</s>"
    ids = tokenizer(text).input_ids
    at = len(tokenizer("USER: <Img>").input_ids)
    with_image = ids[:at] + [IMAGE_TOKEN_ID] * 77 + ids[at:]
    assert proc.decode(with_image) == "USER: <Img></Img> a red circle"
    assert proc.decode(torch.tensor(with_image)) == proc.decode(with_image)


# ---------------------------------------------------------------- tiny tokenizer and config
def test_tiny_tokenizer_is_fast_llama_like_and_round_trips(tmp_path):
    t0 = time.perf_counter()
    tok = build_llama_tokenizer(tmp_path)
    assert time.perf_counter() - t0 < 1.0
    loaded = load_tokenizer(tmp_path)
    assert [loaded.unk_token_id, loaded.bos_token_id, loaded.eos_token_id] == [0, 1, 2]
    assert loaded.convert_ids_to_tokens([3, 258]) == ["<0x00>", "<0xFF>"]  # LLaMA's byte tokens
    assert len(loaded) == len(tok) <= 1000

    text = "USER: draw it ASSISTANT: <Img>a red circle</Img> done, ¿ü?"
    ids = loaded(text).input_ids
    assert ids[0] == 1 and 0 not in ids  # BOS first; byte fallback: never <unk>
    assert loaded.decode(ids, skip_special_tokens=True) == text  # <Img>/</Img> are not special
    assert len(loaded.tokenize("<Img>")) <= 2
    # LLaMA's slow-tokenizer behaviour: a word starts after </s>, and before a leading space.
    assert loaded.tokenize("a</s>USER") == ["▁a", "</s>", *loaded.tokenize("USER")]
    assert loaded.tokenize(" a")[0] == "▁"


def test_tiny_llama_config():
    cfg = tiny_llama_config(500, num_hidden_layers=1)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size, cfg.max_position_embeddings) == \
        (500, 64, 1, 4, 2, 128, 512)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.tie_word_embeddings) == (1, 2, 0, False)
