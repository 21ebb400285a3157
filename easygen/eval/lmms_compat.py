"""Where lmms-eval 0.7.3 loses ``loglikelihood``'s (loss, is_greedy) pairs, and the one fix.

Its evaluator passes every model response through ``unwrap_generation_output``, which keeps text and
turns anything else into its ``str()``: a model's fresh ``(loss, is_greedy)`` tuple, and the
``[loss, is_greedy]`` list its response cache (``--use_cache``) hands back, both reach multiple
choice as strings it cannot unpack. (Wrapping the pair in a ``GenerationResult`` gets a fresh pair
through, but the cache strips a ``GenerationResult``'s text and crashes.) ``install`` makes the
evaluator pass such pairs on as tuples; every other response goes to lmms-eval's own function, and
nothing is patched when lmms-eval already keeps pairs.
"""
from __future__ import annotations

import functools
import numbers


def is_pair(output) -> bool:
    """A loglikelihood response: (a real number, a bool), as a tuple or as the cache's JSON list."""
    return (isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[1], bool)
            and isinstance(output[0], numbers.Real) and not isinstance(output[0], bool))


def install() -> None:
    from lmms_eval import evaluator

    unwrap = evaluator.unwrap_generation_output
    if is_pair(unwrap((0.5, True))[0]):  # already kept (a later lmms-eval, or installed before)
        return

    @functools.wraps(unwrap)
    def keep_pairs(output):
        if is_pair(output):
            return (float(output[0]), output[1]), None
        return unwrap(output)

    evaluator.unwrap_generation_output = keep_pairs
