"""The shapes world: the spec of the built-in demo dataset.

Each image is 64x64 RGB on a white background holding one filled, flat-coloured shape: a circle,
a square or an upright triangle (apex at the top centre of its bounding box, base along the
bottom edge) in one of six named colours, with a bounding-box side of 20 to 40 px, placed fully
inside the canvas. The world's text is captions ("a red circle" and paraphrases), questions with
one-word answers, and draw requests answered with ``<Img>a green triangle</Img>``.
``parse_description`` and ``analyse_image`` read colour and shape back from text and images, so
a demo model's replies and drawings can be scored without a human.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
MIN_SIDE = 20
MAX_SIDE = 40
BACKGROUND = (255, 255, 255)

# Order matters: it fixes random_scene's draws and corpus() order.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Share of its bounding box each shape covers: how analyse_image tells shapes apart.
FILL_RATIO: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}

COLOUR_QUESTIONS: tuple[str, ...] = (
    "What color is the shape?",
    "What colour is the object in the image?",
    "Which color is the shape in this picture?",
    "What colour does the shape have?",
    "Tell me the color of the shape.",
)
SHAPE_QUESTIONS: tuple[str, ...] = (
    "What shape is it?",
    "Which shape is shown in the image?",
    "What kind of shape is in this picture?",
    "Which of the three shapes is it?",
    "Name the shape in the image.",
)
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Write a short caption for the image.",
    "What do you see?",
    "What does this image show?",
    "Describe this picture.",
)
DRAW_REQUESTS: tuple[str, ...] = (
    "Draw a {colour} {shape}.",
    "Show me a picture of a {colour} {shape}.",
    "Can you make an image of a {colour} {shape}?",
    "Please draw a {colour} {shape}.",
    "Paint a {colour} {shape}.",
    "Generate an image of a {colour} {shape}.",
    "I would like a picture of a {colour} {shape}.",
    "Could you draw me a {colour} {shape}?",
)


@dataclass(frozen=True)
class Scene:
    """One image: colour and shape names plus the shape's bounding box (side, top-left corner)."""
    colour: str
    shape: str
    side: int
    left: int
    top: int

    @property
    def caption(self) -> str:
        return captions(self.colour, self.shape)[0]


def random_scene(rng: random.Random) -> Scene:
    """A uniformly drawn colour, shape, size and position (bounding box fully inside the canvas)."""
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    side = rng.randint(MIN_SIDE, MAX_SIDE)
    left = rng.randint(0, IMAGE_SIZE - side)
    top = rng.randint(0, IMAGE_SIZE - side)
    return Scene(colour, shape, side, left, top)


DRAWING_SIDES = (32, 40)  # the pictures the assistant learns to draw: big, nearly centred shapes
DRAWING_JITTER = 3


def drawing_scene(rng: random.Random, colour: str, shape: str) -> Scene:
    """A scene as the assistant draws it: side 32 to 40, centred within 3 px. Uploads can be anything
    in the world; drawings are one clear, big shape (easier to draw well, and what a user wants)."""
    side = rng.randint(*DRAWING_SIDES)
    centre = (IMAGE_SIZE - side) // 2
    return Scene(colour, shape, side, centre + rng.randint(-DRAWING_JITTER, DRAWING_JITTER),
                 centre + rng.randint(-DRAWING_JITTER, DRAWING_JITTER))


def draw(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image; ImageDraw does not anti-alias, so only two colours appear."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    x0, y0 = scene.left, scene.top
    # inclusive corners: the box is `side` px wide
    _paint(ImageDraw.Draw(image), scene.shape, (x0, y0, x0 + scene.side - 1, y0 + scene.side - 1),
           COLOURS[scene.colour])
    return image


def _paint(pen: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """``shape`` filling the inclusive box (x0, y0, x1, y1); a triangle's apex is at the top centre."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        pen.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def captions(colour: str, shape: str) -> list[str]:
    """Paraphrases of one scene's description; the first is the canonical caption."""
    return [
        f"a {colour} {shape}",
        f"a {colour} {shape} on a white background",
        f"a picture of a {colour} {shape}",
        f"a {shape} that is {colour}",
        f"a single {colour} {shape}",
    ]


# Long descriptions for the LLM bridge: colour and shape come after the first 16 words, past what the
# demo's 16-token CLIP text encoder reads. The bridge trains on LONG_TRAIN; the eval draws LONG_HELD_OUT and
# PARAPHRASES_HELD_OUT, which neither drawing path saw in training.
LONG_TRAIN = (
    "On an empty white canvas with nothing else in it, drawn large and close to the centre of the frame, "
    "you can see a {colour} {shape}.",
    "This picture has a clean white background and no other objects or text anywhere at all, only one "
    "{colour} {shape} near the centre.",
    "Look closely at the picture: the background is completely white, nothing is written on it, and the "
    "single object shown is a {shape} coloured {colour}.",
    "There is a white background that fills the whole frame from edge to edge, and in front of it sits "
    "exactly one {colour} {shape}.",
    "The image is simple and quiet, with lots of empty white space around the middle, where the artist has "
    "placed a {shape} that is {colour}.",
    "Imagine a sheet of white paper seen from straight above; right in the centre of that sheet "
    "somebody painted a {colour} {shape}.",
)
LONG_HELD_OUT = (
    "In the middle of a plain white background, taking about half of the picture, there is one shape, and it "
    "is a {colour} {shape}.",
    "Everything around the edges of this image is plain white and empty, and the one thing drawn in the "
    "middle of it is a {colour} {shape}.",
    "If you look at the centre of this otherwise blank white picture, with nothing else around it, you will "
    "find a {shape} painted {colour}.",
)
PARAPHRASES_HELD_OUT = ("one {colour} {shape}", "the {shape} is {colour}", "{colour} {shape} drawn on white",
                        "a {shape} in {colour}")


def vqa_pairs(scene: Scene) -> list[tuple[str, str]]:
    """Every (question, answer) about the scene; answers are bare colour or shape names."""
    return ([(q, scene.colour) for q in COLOUR_QUESTIONS]
            + [(q, scene.shape) for q in SHAPE_QUESTIONS])


def draw_reply(colour: str, shape: str) -> str:
    """The assistant's answer to a draw request: the <Img> tag is what triggers image generation."""
    return f"Here is a {colour} {shape}: <Img>a {colour} {shape}</Img>"


def corpus() -> list[str]:
    """Every text the world can produce, in a fixed order without duplicates (for tokenizers)."""
    texts = [*CAPTION_PROMPTS, *COLOUR_QUESTIONS, *SHAPE_QUESTIONS, *COLOURS, *SHAPES]
    for colour in COLOURS:
        for shape in SHAPES:
            texts += captions(colour, shape)
            texts += [t.format(colour=colour, shape=shape) for t in DRAW_REQUESTS]
            texts.append(draw_reply(colour, shape))
    return list(dict.fromkeys(texts))  # dict keeps first-seen order


def _only(words: list[str], names) -> str | None:
    found = {w for w in words if w in names}
    return found.pop() if len(found) == 1 else None  # none or conflicting names: unknown


def parse_description(text: str) -> tuple[str | None, str | None]:
    """(colour, shape) named in free text, matched as whole words ("reddish" is not "red")."""
    words = re.findall(r"[a-z]+", text.lower())
    return _only(words, COLOURS), _only(words, SHAPES)


@dataclass(frozen=True)
class ImageAnalysis:
    """What analyse_image read from an image. colour is None for a (nearly) blank image; shape is
    None when no shape is drawn clearly enough to name (a blob, fragments, a stretched box)."""
    colour: str | None
    shape: str | None
    fill_ratio: float
    rgb: tuple[int, int, int] | None
    match: float = 0.0  # intersection over union of the mask with the named (or best) ideal shape


_NOT_BACKGROUND = 60.0  # RGB distance from white beyond which a pixel is surely part of the shape
_MIN_PIXELS = 20        # fewer candidate pixels than this is noise, not a shape
_MAX_ASPECT = 1.3       # every shape has a square bounding box; a box this stretched is no shape
_MIN_MATCH = 0.75       # IoU with the ideal shape needed to name it (a blob fits none this well)


def ideal_mask(shape: str, height: int, width: int) -> np.ndarray:
    """The shape drawn as ``draw`` draws it, filling a height x width box (bool array)."""
    image = Image.new("L", (width, height), 0)
    _paint(ImageDraw.Draw(image), shape, (0, 0, width - 1, height - 1), 1)
    return np.asarray(image, dtype=bool)


def analyse_image(image: Image.Image) -> ImageAnalysis:
    """Colour and shape of the one shape in an image, robust to blur and noise (generated images).

    The colour is the median of the clearly non-white pixels, named by the nearest palette colour.
    The shape is named only when the pixels of that colour, inside their (nearly square) bounding
    box, overlap one ideal shape drawn in that box by at least _MIN_MATCH (intersection over
    union): a blob or fragments match none and count as no shape, so they never score by luck."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float64)
    white = np.array(BACKGROUND, dtype=np.float64)
    to_white = np.linalg.norm(pixels - white, axis=-1)

    candidates = pixels[to_white > _NOT_BACKGROUND]
    if len(candidates) < _MIN_PIXELS:
        return ImageAnalysis(None, None, 0.0, None)
    # The median ignores blurred edges (colour mixed with white) and noise.
    rgb = np.median(candidates, axis=0)
    colour = min(COLOURS, key=lambda name: np.linalg.norm(rgb - COLOURS[name]))
    rgb_out = tuple(int(round(c)) for c in rgb)

    mask = np.linalg.norm(pixels - rgb, axis=-1) < to_white
    if not mask.any():  # scattered candidates with no common colour: nothing drawn
        return ImageAnalysis(colour, None, 0.0, rgb_out)
    # Rows/columns with a single mask pixel are likely strays; skip them when sizing the box.
    rows = np.flatnonzero(mask.sum(axis=1) >= 2)
    cols = np.flatnonzero(mask.sum(axis=0) >= 2)
    if len(rows) == 0 or len(cols) == 0:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fill_ratio = float(box.mean())
    height, width = box.shape
    if max(height, width) > _MAX_ASPECT * min(height, width) or min(height, width) < 4:
        return ImageAnalysis(colour, None, fill_ratio, rgb_out)
    outside = mask.sum() - box.sum()  # mask pixels beyond the box count against every shape
    scores = {}
    for name in SHAPES:
        ideal = ideal_mask(name, height, width)
        scores[name] = float((box & ideal).sum() / ((box | ideal).sum() + outside))
    best = max(scores, key=scores.get)
    shape = best if scores[best] >= _MIN_MATCH else None
    return ImageAnalysis(colour, shape, fill_ratio, rgb_out, round(scores[best], 3))
