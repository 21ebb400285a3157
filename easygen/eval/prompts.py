"""The user messages that evaluation puts before each image: one style per training recipe.

``easygen`` is what the original EasyGen trained on (and what our recipe trains on): one of its
brief-description instructions for captions, and its VQA suffix "please giving an short answer."
(sic: the released weights learned it verbatim). ``llava`` is the LLaVA/LAVIS convention, for
models trained that way. ``easygen eval`` uses ``easygen`` unless told otherwise, and its results
record the style and the exact prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

# The original's twelve brief-description instructions (its caption data draws one at random).
DESCRIBE_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Can you describe this image briefly?",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo’s key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
EASYGEN_VQA_SUFFIX = " please giving an short answer."


@dataclass(frozen=True)
class PromptStyle:
    name: str
    caption: str   # the user message for captioning
    vqa: str       # the user message for VQA, with "{question}"


PROMPT_STYLES = {
    "easygen": PromptStyle("easygen", caption=DESCRIBE_INSTRUCTIONS[0], vqa="{question}" + EASYGEN_VQA_SUFFIX),
    "llava": PromptStyle("llava", caption="A short image caption:",
                         vqa="{question}\nAnswer the question using a single word or phrase."),
}
DEFAULT_PROMPT_STYLE = "easygen"
