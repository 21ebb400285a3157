"""Scripted shapes-world conversations: what they ask, what they expect, and how they are written
as training data (drawn pictures shown in the next turn, as the chat Assistant shows them)."""
from __future__ import annotations

import collections
import random

from easygen.constants import IMAGE_TOKEN_ID
from easygen.data.readers import read_llava
from easygen.demo import world
from easygen.demo.conversations import (DRAWING_KINDS, KINDS, MAX_UPLOADS, READING_KINDS, corpus,
                                        random_script)
from easygen.demo.dataset import llava_conversation, write_training_data


def scripts(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [random_script(rng) for _ in range(n)]


def test_scripts_cover_every_kind_of_turn_with_consistent_answers():
    kinds = collections.Counter()
    for script in scripts(500):
        assert 2 <= len(script) <= 6
        assert sum(len(t.uploads) for t in script) <= MAX_UPLOADS
        pictures, drawn = [], []  # (colour, shape) per picture, uploads and drawings in order; drawn by us?
        for position, turn in enumerate(script):
            kinds[turn.kind] += 1
            assert turn.kind in KINDS
            pictures += [(s.colour, s.shape) for s in turn.uploads]
            drawn += [False] * len(turn.uploads)
            colour, shape = turn.target
            if turn.draws:
                assert turn.answer == world.draw_reply(colour, shape)
                assert (turn.kind == "draw_first") == (position == 0 and turn.kind != "grounded_draw")
                if turn.kind == "grounded_draw":  # composed from a picture already in the conversation
                    seen = pictures[turn.refers_to]
                    assert seen[0] == colour or seen[1] == shape
                pictures.append(turn.target)
                drawn.append(True)
                continue
            assert turn.kind in READING_KINDS
            assert pictures[turn.refers_to] == turn.target  # the picture the question is about
            said = world.parse_description(turn.answer)
            expected = {"colour": (colour, None), "shape": (None, shape), "caption": (colour, shape)}[turn.ask]
            assert said == expected, turn
            if turn.kind in ("describe", "question", "second_image"):
                assert len(turn.uploads) == 1 and turn.refers_to == len(pictures) - 1
                assert (turn.kind == "second_image") == (len(pictures) > 1)
            elif turn.kind == "own_drawing":  # about the latest picture, which the assistant drew
                assert turn.refers_to == len(pictures) - 1 and drawn[-1]
            elif turn.kind == "follow_up":
                assert turn.refers_to == len(pictures) - 1 and not drawn[-1] and not turn.uploads
            elif turn.kind == "earlier_image":
                assert turn.refers_to < len(pictures) - 1
                assert world.parse_description(turn.text) == (None, None)  # named by its place only
    assert set(kinds) == set(KINDS), kinds


def test_scripts_are_seeded_and_their_words_are_in_the_corpus():
    assert [[t.text for t in s] for s in scripts(20, 5)] == [[t.text for t in s] for s in scripts(20, 5)]
    words = set(" ".join(corpus() + world.corpus()).replace("?", " ").replace(".", " ").replace(",", " ").split())
    for script in scripts(200, 1):
        for turn in script:
            assert set(turn.text.replace("?", " ").replace(".", " ").replace(",", " ").split()) <= words, turn.text


def test_a_drawing_is_shown_first_in_the_next_turn():
    script = [t for s in scripts(300, 2) for t in [s]
              if any(a.draws and b.uploads for a, b in zip(s, s[1:]))][0]
    uploads = [[f"up{i}-{j}.png" for j in range(len(t.uploads))] for i, t in enumerate(script)]
    entry = llava_conversation("x", script, uploads, lambda colour, shape: f"drawn-{colour}-{shape}.png")
    expected = []
    for i, turn in enumerate(script):
        if i and script[i - 1].draws:
            expected.append("drawn-{}-{}.png".format(*script[i - 1].target))
        expected += uploads[i]
    assert entry["image"] == expected
    humans = entry["conversations"][::2]
    for i, human in enumerate(humans):
        shown = len(uploads[i]) + bool(i and script[i - 1].draws)
        assert human["value"].count("<ImageHere>") == shown
        if shown:  # the images first, as the chat writes a turn
            assert human["value"].startswith("<Img><ImageHere></Img>" * shown + " ")


def test_training_conversations_read_and_tokenize_within_the_demo_context(tmp_path, ci_demo):
    from easygen.builder import load_pretrained
    from easygen.demo.recipe import RECIPES

    paths = write_training_data(tmp_path, 120, 0, n_conversations=200)
    examples = read_llava(paths["conversations.json"])
    assert len(examples) == 200
    processor = load_pretrained(ci_demo.easygen, load_bidiffuser=False).processor  # the demo's tokenizer
    assert processor.num_image_tokens == 16
    longest = 0
    for ex in examples:
        tokens = processor.tokenize_conversation(ex["messages"])
        assert processor.count_images(tokens["input_ids"]) == len(ex["images"])
        longest = max(longest, len(tokens["input_ids"]))
        assert tokens["input_ids"].count(IMAGE_TOKEN_ID) == 16 * len(ex["images"])
    assert longest <= RECIPES["full"].llm_context // 2, longest  # never truncated in training
