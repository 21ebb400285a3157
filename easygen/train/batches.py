"""From examples (``{"id", "images", "messages"}``) to model batches: tokenized with labels,
right-padded, with the image features of the images that survived truncation."""
from __future__ import annotations

import torch

from ..errors import EasyGenError
from ..features import ImageFeatureExtractor
from ..processor import EasyGenProcessor


class Batcher:
    def __init__(self, examples: list[dict], processor: EasyGenProcessor, max_length: int,
                 features: ImageFeatureExtractor | None):
        self.examples, self.processor, self.max_length, self.features = examples, processor, max_length, features

    def tokenize(self, index: int) -> tuple[list[int], list[int], list]:
        """(ids, labels, feature sources): an image path each, or ("text", caption) for features made
        from text (an example with ``feature_texts`` instead of images)."""
        ex = self.examples[index]
        tok = self.processor.tokenize_conversation(ex["messages"], max_length=self.max_length)
        ids, labels = tok["input_ids"], tok["labels"]
        kept = self.processor.count_images(ids)  # truncation may drop trailing images
        sources = list(ex.get("images", [])) + [("text", t) for t in ex.get("feature_texts", [])]
        return ids, labels, sources[:kept]

    def __call__(self, indices: list[int]) -> dict:
        rows = [self.tokenize(i) for i in indices]
        batch = self.processor.pad_batch([r[0] for r in rows], side="right", labels=[r[1] for r in rows])
        sources = [s for r in rows for s in r[2]]
        if sources:
            if self.features is None:
                raise EasyGenError("the data has images but no BiDiffuser directory is configured "
                                   "(set bidiffuser=DIR, or put it in the model directory as bidiffuser/)")
            batch["image_features"] = self._features(sources)
        batch["num_tokens"] = int(batch["attention_mask"].sum())  # every position the model processes
        return batch

    def _features(self, sources: list) -> torch.Tensor:
        """Features in ``sources`` order: images through the extractor, texts through BiDiffuser's
        text encoder (both end in ``decode_prefix``)."""
        texts = [i for i, s in enumerate(sources) if isinstance(s, tuple)]
        images = [i for i, s in enumerate(sources) if not isinstance(s, tuple)]
        parts = {}
        if images:
            parts.update(zip(images, self.features([sources[i] for i in images])))
        if texts:
            parts.update(zip(texts, self.features.from_texts([sources[i][1] for i in texts])))
        return torch.stack([parts[i] for i in range(len(sources))])


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
