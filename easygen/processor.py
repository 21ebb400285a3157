"""Prompt formatting and tokenization for EasyGen (the role transformers' LlavaProcessor plays).

A prompt is text from FastChat's "easygen" template in which every ``<ImageHere>`` stands for one
image. Tokenizing it gives ordinary token ids plus, per image, ``num_image_tokens`` copies of the
sentinel ``IMAGE_TOKEN_ID``; the model later replaces each sentinel run by the projected image
features (77 positions: the BiDiffuser text latent).

The token layout is the original EasyGen's, token for token (the released weights expect it)::

    <s> ▁US ER : ▁< Img >  [77 image positions]  ▁</ Img > ▁  ▁What ... ▁A SS IST ANT : ▁A ... </s> ▁US ER : ...

* the prompt starts at "USER:" (empty system message, no separator before the first turn);
* the text is cut at each image and right after the "</Img> " that closes it, and every piece is
  tokenized on its own, so each starts with SentencePiece's word-start marker; the original builds
  "USER: <Img>", "</Img> " and the question the same way, each with the slow LLaMA tokenizer;
* special tokens inside the text ("</s>") are the tokenizer's; the text after one starts a word;
* BOS comes with the image prefix: a prompt without any image has none, as in the original's
  text-only samples.

Training and generation share this code, so the model always sees the same ids for the same prompt.
"""
from __future__ import annotations

from typing import Sequence

import torch

from easygen.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, IMG_CLOSE, NUM_IMAGE_TOKENS
from fastchat_ext.conversation import new_conversation, user_message

_ROLES = {"user": 0, "human": 0, "assistant": 1, "gpt": 1}  # LLaVA's names accepted as aliases


class EasyGenProcessor:
    """Builds EasyGen prompts with FastChat and turns them into ids, labels and padded batches.

    ``messages`` everywhere are dicts ``{"role": "user"|"assistant", "content": str,
    "num_images": int (optional, user turns)}``, alternating and starting with the user.
    """

    def __init__(self, tokenizer, num_image_tokens: int = NUM_IMAGE_TOKENS):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        # The special tokens the tokenizer puts before any text (LLaMA: [BOS]), found by encoding
        # a probe both ways rather than assumed; they open every prompt that holds an image.
        # Trailing specials (add_eos_token) are deliberately not copied: a prompt is continued.
        with_special = tokenizer("a").input_ids
        plain = tokenizer("a", add_special_tokens=False).input_ids
        start = next(i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain)
        self.prefix_ids: list[int] = list(with_special[:start])

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def _conversation(messages: Sequence[dict], system: str = ""):
        """A FastChat conversation holding ``messages`` (validated), after ``system`` (EasyGen's
        own prompts have none)."""
        conv = new_conversation()
        conv.set_system_message(system)
        for i, msg in enumerate(messages):
            role = _ROLES.get(msg.get("role"))
            if role is None:
                raise ValueError(f"message {i}: unknown role {msg.get('role')!r} "
                                 "(expected 'user' or 'assistant')")
            if role != i % 2:
                raise ValueError(f"message {i}: roles must alternate user/assistant, starting with the user")
            content = msg.get("content") or ""
            if role == 0:
                content = user_message(content, msg.get("num_images", 0))
            elif msg.get("num_images"):
                raise ValueError(f"message {i}: assistant turns cannot hold input images")
            conv.append_message(conv.roles[role], content)
        return conv

    @staticmethod
    def _text(conv) -> str:
        """FastChat's prompt, without the separator it puts after an empty system message (the
        original starts at "USER:")."""
        prompt = conv.get_prompt()
        return prompt if conv.system_message else prompt.removeprefix(conv.sep)

    def build_prompt(self, messages: Sequence[dict], system: str = "") -> str:
        """The prompt text; after a user turn it ends with "ASSISTANT:" (ready for generation)."""
        conv = self._conversation(messages, system)
        if len(messages) % 2 == 1:
            conv.append_message(conv.roles[1], None)
        return self._text(conv)

    # ------------------------------------------------------------------ ids
    @staticmethod
    def pieces(text: str) -> list[tuple[int, int] | None]:
        """The layout's cut of ``text``: (start, end) spans, each tokenized on its own, and None
        where an image goes. The "</Img> " right after an image (its trailing space included) is
        a piece of its own."""
        out, pos = [], 0
        for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k:  # an image sits between this chunk and the previous one
                out.append(None)
                pos += len(IMAGE_PLACEHOLDER)
                if chunk.startswith(IMG_CLOSE):
                    close = len(IMG_CLOSE) + chunk[len(IMG_CLOSE):].startswith(" ")
                    out.append((pos, pos + close))
                    pos, chunk = pos + close, chunk[close:]
            if chunk:
                out.append((pos, pos + len(chunk)))
            pos += len(chunk)
        return out

    def _encode(self, text: str, spans: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` with sentinel runs and, if asked (fast tokenizers only), each id's
        character span in ``text`` (the placeholder's span for sentinels, empty for BOS)."""
        cut = self.pieces(text)
        bos = self.prefix_ids if None in cut else []
        ids, where = list(bos), [(0, 0)] * len(bos)
        pos = 0
        for piece in cut:
            if piece is None:
                ids += [IMAGE_TOKEN_ID] * self.num_image_tokens
                where += [(pos, pos + len(IMAGE_PLACEHOLDER))] * self.num_image_tokens
                pos += len(IMAGE_PLACEHOLDER)
                continue
            a, pos = piece
            enc = self.tokenizer(text[a:pos], add_special_tokens=False, return_offsets_mapping=spans)
            ids += enc.input_ids
            if spans:
                where += [(a + s, a + e) for s, e in enc.offset_mapping]
        return ids, where

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """The prompt's ids (see the layout above), each ``<ImageHere>`` replaced by
        ``num_image_tokens`` sentinel ids."""
        return self._encode(prompt)[0]

    def tokenize_conversation(self, messages: Sequence[dict], max_length: int | None = None) -> dict:
        """Training ids and labels for a whole conversation.

        Labels equal the ids on the assistant replies (the reply text, its leading separator space
        and its closing "</s>") and are IGNORE_INDEX elsewhere: system, user turns, role prefixes
        and image positions. Reply spans are found by growing the conversation one message at a
        time with FastChat and measuring the prompt, so they follow the template exactly.

        Truncation keeps the first ``max_length`` ids. If the cut falls inside an image run, that
        whole image and everything after it are dropped (the result is then shorter than
        ``max_length``): the model never receives part of an image, and the images kept are the
        first ``count_images(input_ids)`` of the conversation.
        """
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError("tokenize_conversation needs a fast tokenizer (character offsets)")
        prompt = self._text(self._conversation(messages))

        reply_spans = []
        for i in range(1, len(messages), 2):
            if not messages[i].get("content"):
                continue
            before = self.build_prompt(messages[:i])                     # ends with "ASSISTANT:"
            upto = self._text(self._conversation(messages[:i + 1]))   # ends with "reply</s>"
            if not (upto.startswith(before) and prompt.startswith(upto)):
                raise AssertionError("the conversation template does not build prompts incrementally")
            reply_spans.append((len(before), len(upto)))

        ids, spans = self._encode(prompt, spans=True)
        labels = [IGNORE_INDEX] * len(ids)
        for j, (a, b) in enumerate(spans):
            if ids[j] != IMAGE_TOKEN_ID and b > a and any(s <= a and b <= e for s, e in reply_spans):
                labels[j] = ids[j]

        if max_length is not None and len(ids) > max_length:
            cut = run_start = max_length
            while run_start > 0 and ids[run_start - 1] == IMAGE_TOKEN_ID:
                run_start -= 1
            if ids[cut] == IMAGE_TOKEN_ID:  # the cut falls in an image: move it back to that image's start
                cut = run_start + (cut - run_start) // self.num_image_tokens * self.num_image_tokens
            ids, labels = ids[:cut], labels[:cut]
        return {"input_ids": ids, "labels": labels}

    # ------------------------------------------------------------------ batches
    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
            if candidate is not None:
                return candidate
        return 0

    def pad_batch(self, list_of_ids: Sequence[Sequence[int]], side: str = "left",
                  labels: Sequence[Sequence[int]] | None = None) -> dict:
        """Pad to the longest sequence: "left" for generation, "right" for training.

        Returns long tensors ``input_ids`` and ``attention_mask`` (0 on pads), plus ``labels``
        padded with IGNORE_INDEX when given. Sentinel ids stay in ``input_ids`` (attention 1).
        """
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        rows = [list(map(int, ids)) for ids in list_of_ids]
        longest = max((len(r) for r in rows), default=0)

        def pad(row, value):
            fill = [value] * (longest - len(row))
            return fill + row if side == "left" else row + fill

        out = {
            "input_ids": torch.tensor([pad(r, self.pad_token_id) for r in rows], dtype=torch.long),
            "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows], dtype=torch.long),
        }
        if labels is not None:
            if [len(lab) for lab in labels] != [len(r) for r in rows]:
                raise ValueError("labels must have the same lengths as the ids")
            out["labels"] = torch.tensor([pad(list(map(int, lab)), IGNORE_INDEX) for lab in labels],
                                         dtype=torch.long)
        return out

    # ------------------------------------------------------------------ reading ids back
    def count_images(self, ids: Sequence[int] | torch.Tensor) -> int:
        """Number of images in a 1-D id sequence (sentinel runs of ``num_image_tokens``)."""
        n = sum(1 for i in (ids.tolist() if torch.is_tensor(ids) else ids) if i == IMAGE_TOKEN_ID)
        if n % self.num_image_tokens:
            raise ValueError(f"{n} image positions is not a multiple of {self.num_image_tokens}")
        return n // self.num_image_tokens

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``, skipping negative ids (image sentinels, IGNORE_INDEX) and special tokens."""
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)
