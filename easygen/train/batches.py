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

    def tokenize(self, index: int) -> tuple[list[int], list[int], list[str]]:
        ex = self.examples[index]
        tok = self.processor.tokenize_conversation(ex["messages"], max_length=self.max_length)
        ids, labels = tok["input_ids"], tok["labels"]
        kept = self.processor.count_images(ids)  # truncation may drop trailing images
        return ids, labels, list(ex.get("images", []))[:kept]

    def __call__(self, indices: list[int]) -> dict:
        rows = [self.tokenize(i) for i in indices]
        batch = self.processor.pad_batch([r[0] for r in rows], side="right", labels=[r[1] for r in rows])
        images = [p for r in rows for p in r[2]]
        if images:
            if self.features is None:
                raise EasyGenError("the data has images but no BiDiffuser directory is configured "
                                   "(set bidiffuser=DIR, or put it in the model directory as bidiffuser/)")
            batch["image_features"] = self.features(images)
        batch["num_tokens"] = int(batch["attention_mask"].sum())  # every position the model processes
        return batch


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
