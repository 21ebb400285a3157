"""Evaluation: COCO Karpathy captioning (BLEU, METEOR, ROUGE-L, CIDEr via pycocoevalcap) and VQAv2
accuracy, with a resumable, torchrun-shardable prediction loop.

``data`` reads the benchmark files, ``metrics`` scores predictions, ``runner`` produces them, and
``cli`` is ``easygen eval caption|vqa``. Nothing heavy is imported here, so ``easygen --help``
stays instant.
"""
