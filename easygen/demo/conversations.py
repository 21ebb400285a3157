"""Scripted conversations in the shapes world: what the demo trains on and what ``demo eval`` asks.

A conversation has 2 to 6 user turns. Up to 3 images arrive, one per turn, at any turn. Every turn
is one of the ``KINDS``. Pictures are counted in the order they entered the conversation, whether
the user uploaded them or the assistant drew them: a drawn picture is part of the conversation
like an upload (the chat ``Assistant`` shows it to the model in the next user turn). "it", "this"
and "the same" refer to the latest picture, and "the first/second/third" to that picture in order.

A script is abstract: a turn's ``uploads`` are scenes, and a drawing is the scene asked for. The
training writer (``dataset.py``) turns scenes into image files, and ``demo eval`` (``evaluate.py``)
plays the script against the model and scores each answer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from . import world
from .world import Scene

# Turn kinds, and the row of the eval table each one fills.
KINDS: dict[str, str] = {
    "describe": "describe an uploaded image",
    "question": "question about the uploaded image",
    "second_image": "question about a second (or third) image",
    "follow_up": "follow-up about the latest image",
    "earlier_image": "follow-up about an earlier image",
    "draw_first": "draw request, first message",
    "draw_later": "draw request later in the conversation",
    "grounded_draw": "image-grounded draw request",
    "own_drawing": "question about the assistant's own drawing",
}
READING_KINDS = ("describe", "question", "second_image", "follow_up", "earlier_image", "own_drawing")
DRAWING_KINDS = ("draw_first", "draw_later", "grounded_draw")
MAX_UPLOADS = 3

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")

# Questions about the latest picture without attaching it again.
FOLLOW_UP_COLOUR = ("What color is it?", "And its colour?", "Which colour does it have?", "What colour is that?")
FOLLOW_UP_SHAPE = ("And its shape?", "What shape is that?", "Which shape does it have?", "What kind of shape is it?")
FOLLOW_UP_CAPTION = ("What is it again?", "Describe it once more.")
# Questions about a picture by its place in the conversation.
EARLIER_CAPTION = ("What was the {nth} one?", "What was in the {nth} picture?", "Describe the {nth} image.")
EARLIER_COLOUR = ("What color was the {nth} picture?", "What colour was the {nth} shape?",
                  "Which colour did the {nth} image have?")
EARLIER_SHAPE = ("What shape was the {nth} one?", "Which shape was in the {nth} picture?",
                 "What kind of shape did the {nth} image show?")
# Questions about the picture the assistant drew last.
OWN_COLOUR = ("What color did you make it?", "Which colour is your picture?", "What colour did you use?")
OWN_SHAPE = ("What shape did you draw?", "Which shape is in your picture?")
OWN_CAPTION = ("What did you draw?", "Describe your picture.")
# Drawings composed from what was seen: {colour}/{shape} are named, {nth} points at a picture.
SAME_SHAPE = ("Draw this shape in {colour}.", "Draw the same shape in {colour}.", "Now make it {colour}.",
              "Draw it again in {colour}.")
SAME_COLOUR = ("Draw a {shape} in the same colour.", "Draw a {shape} with that color.",
               "Now a {shape} of the same colour, please.")
COLOUR_OF_NTH = ("Draw a {shape} in the colour of the {nth} picture.",
                 "Make a {shape} with the color of the {nth} one.")
SHAPE_OF_NTH = ("Draw the {nth} shape in {colour}.", "Draw the shape of the {nth} picture in {colour}.")
COPY_NTH = ("Draw the {nth} one again.", "Make another picture like the {nth} one.")


def answer_for(ask: str, colour: str, shape: str) -> str:
    """The assistant's answer to a reading question: bare names, or the canonical caption."""
    return {"colour": colour, "shape": shape, "caption": f"a {colour} {shape}"}[ask]


@dataclass
class ScriptTurn:
    """One user turn and its expected answer. ``target`` is the (colour, shape) the answer must
    name (``ask`` says which part: "colour", "shape" or "caption") or, for a drawing, draw.
    ``refers_to`` is the index (among the conversation's pictures) the turn is about."""
    kind: str
    text: str
    answer: str
    target: tuple[str, str]
    ask: str = "caption"
    uploads: list[Scene] = field(default_factory=list)
    refers_to: int | None = None

    @property
    def draws(self) -> bool:
        return self.kind in DRAWING_KINDS


def random_colour_shape(rng: random.Random) -> tuple[str, str]:
    return rng.choice(list(world.COLOURS)), rng.choice(world.SHAPES)


def _reading(rng: random.Random, kind: str, pictures: list[tuple[str, str]], index: int, text_options,
             uploads: list[Scene] = ()) -> ScriptTurn:
    """A question about picture ``index``: the options are (ask, templates) pairs."""
    ask, templates = rng.choice(text_options)
    colour, shape = pictures[index]
    return ScriptTurn(kind, rng.choice(templates).format(nth=ORDINALS[index]), answer_for(ask, colour, shape),
                      (colour, shape), ask, list(uploads), index)


def _upload_turn(rng: random.Random, pictures: list, new_scene: Callable[[random.Random], Scene]) -> ScriptTurn:
    scene = new_scene(rng)
    kind = "second_image" if pictures else rng.choice(("describe", "question", "question"))
    pictures.append((scene.colour, scene.shape))
    index = len(pictures) - 1
    if kind == "describe" or (kind == "second_image" and rng.random() < 0.3):
        options = [("caption", world.CAPTION_PROMPTS)]
    else:
        options = [("colour", world.COLOUR_QUESTIONS), ("shape", world.SHAPE_QUESTIONS)]
    return _reading(rng, kind, pictures, index, options, [scene])


def _other(rng: random.Random, names, seen: str) -> str:
    """A name other than ``seen`` most of the time: the request then differs from the picture it points
    at, so the answer must take the named part from the text and the other part from the picture."""
    return rng.choice([n for n in names if n != seen]) if rng.random() < 0.8 else seen


def _grounded_draw(rng: random.Random, pictures: list[tuple[str, str]]) -> ScriptTurn:
    latest = len(pictures) - 1
    choices = ["same_shape", "same_colour"] + ["colour_of", "shape_of", "copy"] * (len(pictures) > 1)
    how = rng.choice(choices)
    index = latest if how in ("same_shape", "same_colour") else rng.randrange(len(pictures) - 1)
    seen_colour, seen_shape = pictures[index]
    nth = ORDINALS[index]  # an earlier picture is named by its place
    colour, shape = _other(rng, list(world.COLOURS), seen_colour), _other(rng, world.SHAPES, seen_shape)
    if how == "same_shape":
        shape, text = seen_shape, rng.choice(SAME_SHAPE).format(colour=colour)
    elif how == "same_colour":
        colour, text = seen_colour, rng.choice(SAME_COLOUR).format(shape=shape)
    elif how == "colour_of":
        colour, text = seen_colour, rng.choice(COLOUR_OF_NTH).format(shape=shape, nth=nth)
    elif how == "shape_of":
        shape, text = seen_shape, rng.choice(SHAPE_OF_NTH).format(colour=colour, nth=nth)
    else:
        colour, shape, text = seen_colour, seen_shape, rng.choice(COPY_NTH).format(nth=nth)
    return ScriptTurn("grounded_draw", text, world.draw_reply(colour, shape), (colour, shape), refers_to=index)


def random_script(rng: random.Random, new_scene: Callable[[random.Random], Scene] = world.random_scene,
                  turns: int | None = None, earlier_per_picture: int = 0) -> list[ScriptTurn]:
    """A conversation of ``turns`` (default 2 to 6) user turns; ``new_scene`` picks each upload.
    ``earlier_per_picture`` > 0 (training only) asks about earlier pictures more often the more
    pictures there are: that weight per earlier picture, instead of a flat 5."""
    turns = turns or rng.randint(2, 6)
    pictures: list[tuple[str, str]] = []  # (colour, shape) of every picture so far, uploads and drawings
    drawn: list[bool] = []  # per picture: did the assistant draw it?
    uploads, script = 0, []
    for position in range(turns):
        last = script[-1] if script else None
        options = ["draw"] * 2
        if uploads < MAX_UPLOADS:
            options += ["upload"] * 4
        if pictures:
            options += ["follow_up"] * 2 + ["grounded_draw"] * 3
        if len(pictures) > 1:
            options += ["earlier_image"] * (earlier_per_picture * (len(pictures) - 1) if earlier_per_picture else 5)
        if last is not None and last.draws:
            options += ["own_drawing"] * 6
        choice = rng.choice(options)
        if choice == "upload":
            turn = _upload_turn(rng, pictures, new_scene)
            uploads += 1
        elif choice == "draw":
            colour, shape = random_colour_shape(rng)
            text = rng.choice(world.DRAW_REQUESTS).format(colour=colour, shape=shape)
            turn = ScriptTurn("draw_first" if position == 0 else "draw_later", text,
                              world.draw_reply(colour, shape), (colour, shape))
        elif choice == "grounded_draw":
            turn = _grounded_draw(rng, pictures)
        elif choice == "follow_up":  # about the latest picture: the assistant's own when it drew last
            kind = "own_drawing" if drawn[-1] else "follow_up"
            turn = _reading(rng, kind, pictures, len(pictures) - 1,
                            [("colour", FOLLOW_UP_COLOUR), ("shape", FOLLOW_UP_SHAPE), ("caption", FOLLOW_UP_CAPTION)])
        elif choice == "earlier_image":
            turn = _reading(rng, "earlier_image", pictures, rng.randrange(len(pictures) - 1),
                            [("colour", EARLIER_COLOUR), ("shape", EARLIER_SHAPE), ("caption", EARLIER_CAPTION)])
        else:
            turn = _reading(rng, "own_drawing", pictures, len(pictures) - 1,
                            [("colour", OWN_COLOUR), ("shape", OWN_SHAPE), ("caption", OWN_CAPTION)])
        if turn.draws:
            pictures.append(turn.target)
        drawn += [turn.draws] * (len(pictures) - len(drawn))
        script.append(turn)
    return script


def corpus() -> list[str]:
    """Every phrasing the scripts use (for tokenizers), with every name filled in."""
    texts = []
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            for nth in ORDINALS:
                for group in (SAME_SHAPE, SAME_COLOUR, COLOUR_OF_NTH, SHAPE_OF_NTH, COPY_NTH, EARLIER_CAPTION,
                              EARLIER_COLOUR, EARLIER_SHAPE):
                    texts += [t.format(colour=colour, shape=shape, nth=nth) for t in group]
    texts += [*FOLLOW_UP_COLOUR, *FOLLOW_UP_SHAPE, *FOLLOW_UP_CAPTION, *OWN_COLOUR, *OWN_SHAPE, *OWN_CAPTION]
    return list(dict.fromkeys(texts))
