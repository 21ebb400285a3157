"""Training data: readers for every supported file format and the mixtures built from a config.

``load_mixture(config)`` is the entry point; see ``easygen.data.readers`` for the example format.
"""
from .mixture import Mixture, load_mixture, read_config
from .readers import (CAPTION_PROMPTS, READERS, BadRows, read_coco, read_karpathy_captions, read_llava,
                      read_tsv)

__all__ = ["Mixture", "load_mixture", "read_config", "BadRows", "READERS", "CAPTION_PROMPTS",
           "read_tsv", "read_coco", "read_llava", "read_karpathy_captions"]
