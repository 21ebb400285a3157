"""Descriptions that no choice of the demo's recipe was tuned on: `easygen demo eval` reports them as its
held-out long-description and paraphrase rows.

``world.LONG_HELD_OUT`` and ``world.PARAPHRASES_HELD_OUT`` were never trained on, but the bridge's recipe
(layer, teacher, steps) was chosen by how it drew them, so they measure the tuning (the eval's "tuning"
rows). These were written after the recipe was fixed, with other wording and structure: the colour
after the shape or apart from it, lists, a question, a label; no sentence shared with the training
texts or the tuning templates. Nothing in the build reads this file, and nothing may be tuned on it:
a new recipe choice measured here turns these into tuning templates too (then write new ones).
"""
from __future__ import annotations

# Colour and shape after the first 16 words, past what the demo's 16-token CLIP text encoder reads.
LONG = (
    "A quick sketch for a children's book page, drawn in one flat paint without any shading, texture, border "
    "or background detail: one {shape}, {colour}.",
    "No words appear on this page and nothing hides in its corners, since the whole drawing is one flat figure "
    "in {colour} paint, in the form of a {shape}.",
    "Could you picture this for me: a blank page, no border, no writing, no other objects, nothing in the "
    "corners, and in the middle only a {colour} {shape}?",
)
PARAPHRASES = (
    "{shape}, {colour}",
    "just a {colour} {shape}, nothing more",
    "{colour} is the colour of this {shape}",
    "my {shape} should be {colour}",
)
