"""The "easygen" FastChat conversation template, the helper that writes image slots, and how a
picture the model drew is read back from a message's text.

EasyGen talks in Vicuna v1.1 style with an empty system message::

     USER: <Img><ImageHere></Img> What is in the picture? ASSISTANT: A red circle.</s>USER: ...

Every prompt in the project is produced by FastChat's ``Conversation.get_prompt()`` on this
template, so training, generation and evaluation agree on the exact characters.
"""
from __future__ import annotations

import re

from fastchat.conversation import (
    Conversation,
    SeparatorStyle,
    conv_templates,
    get_conv_template,
    register_conv_template,
)

TEMPLATE_NAME = "easygen"
# The prompt's image marks belong to the template (easygen.constants re-exports them).
IMAGE_PLACEHOLDER = "<ImageHere>"               # where an image's features go in a prompt
IMG_OPEN, IMG_CLOSE = "<Img>", "</Img>"         # around an image, in prompts and in answers that draw
IMAGE_SLOT = f"{IMG_OPEN}{IMAGE_PLACEHOLDER}{IMG_CLOSE}"  # how a user turn holds an image (as EasyGen writes it)
LLAVA_IMAGE_TOKEN = "<image>"  # how LLaVA-style conversation data marks an image
# How a drawn picture leaves in an answer (``easygen serve``, ``easygen worker``): ``![description](url)``.
MARKDOWN_IMAGE = re.compile(r"!\[([^\]\n]*)\]\(([^)\s]*)\)")


def _template() -> Conversation:
    # Same fields as FastChat's "vicuna_v1.1", except the system message, which the original
    # EasyGen leaves empty (so a prompt starts with " USER: ").
    return Conversation(
        name=TEMPLATE_NAME,
        system_message="",
        roles=("USER", "ASSISTANT"),
        sep_style=SeparatorStyle.ADD_COLON_TWO,
        sep=" ",
        sep2="</s>",
        messages=[],  # a list, as get_conv_template's copies have: the registered entry compares equal
    )


def register_template() -> None:
    """Register the "easygen" template with FastChat; calling it again changes nothing."""
    template = _template()
    if conv_templates.get(TEMPLATE_NAME) != template:
        # override=True: a stale or foreign "easygen" entry must not win over ours.
        register_conv_template(template, override=True)


def new_conversation() -> Conversation:
    """A fresh, empty EasyGen conversation (a copy: safe to append to)."""
    return get_conv_template(TEMPLATE_NAME)


def user_message(text: str, num_images: int = 0) -> str:
    """The content of a user turn holding ``num_images`` images, as EasyGen writes it.

    Without an explicit placeholder, the slots go first: ``<Img><ImageHere></Img> question``.
    When the text already marks its images (``<ImageHere>``, or LLaVA's ``<image>``, which is
    rewritten to the full slot), the marks are kept where they are and no slot is added; a
    non-zero ``num_images`` must then match the number of marks.
    """
    text = text.replace(LLAVA_IMAGE_TOKEN, IMAGE_SLOT)
    marked = text.count(IMAGE_PLACEHOLDER)
    if marked:
        if num_images and num_images != marked:
            raise ValueError(
                f"user message marks {marked} image(s) but num_images={num_images}: {text[:80]!r}")
        return text
    slots = IMAGE_SLOT * num_images
    return f"{slots} {text}" if slots and text else slots + text


def read_back_pictures(answer: str) -> tuple[str, list[str]]:
    """An assistant message sent back by a client, as the model wrote it, and the pictures it drew:
    each markdown image is ``<Img>description</Img>`` again, and the ``data:`` URLs among them are
    the pictures, to show the model in the next user turn. Links and other URLs stay text only
    (nothing is ever fetched for them)."""
    drawn = []

    def tag(m: re.Match) -> str:
        if m.group(2).startswith("data:"):
            drawn.append(m.group(2))
        return f"{IMG_OPEN}{m.group(1)}{IMG_CLOSE}"

    return MARKDOWN_IMAGE.sub(tag, answer), drawn


register_template()
