"""The user message EasyGen gets for an lmms-eval context, under a ``prompt_style``.

lmms-eval's tasks write LLaVA's prompts: a VQA question followed by LLaVA's short-answer suffix
(VQAv2, POPE, MME, ...), or a fixed caption instruction (COCO, Karpathy). ``easygen eval`` asks
EasyGen's own way by default, so the same question gets the same prompt on both paths:

* ``easygen`` (default) / ``llava``: a question ending in LLaVA's suffix becomes the style's VQA
  prompt, a known caption instruction becomes the style's caption prompt (``easygen.eval.prompts``);
  any other context (multiple choice, yes/no with its own wording, ...) is kept as the task wrote it;
* ``task``: the context exactly as the task wrote it.

The result is a user message; ``EasyGenProcessor`` puts it in EasyGen's conversation template.
"""
from __future__ import annotations

from .prompts import DEFAULT_PROMPT_STYLE, PROMPT_STYLES

TASK_STYLE = "task"
STYLES = (*sorted(PROMPT_STYLES), TASK_STYLE)
# LLaVA's short-answer suffix, read off the llava style (what lmms-eval's VQA tasks append).
SHORT_ANSWER_SUFFIX = PROMPT_STYLES["llava"].vqa.split("{question}", 1)[1]
# The caption instructions of lmms-eval 0.7.3's captioning tasks (coco_cap, coco_karpathy, flickr, nocaps).
CAPTION_INSTRUCTIONS = frozenset({"Provide a one-sentence caption for the provided image.",
                                  "Describe the image briefly."})


def user_text(context: str, style: str = DEFAULT_PROMPT_STYLE) -> str:
    """The user message for ``context`` under ``style`` (see the module docstring)."""
    if style == TASK_STYLE:
        return context
    prompts = PROMPT_STYLES[style]
    if context.endswith(SHORT_ANSWER_SUFFIX):
        return prompts.vqa.replace("{question}", context[:-len(SHORT_ANSWER_SUFFIX)].strip())
    if context.strip() in CAPTION_INSTRUCTIONS:
        return prompts.caption
    return context
