"""EasyGen: the multimodal LLM side (projector, model, features, training, assistant, evaluation).

Depends on ``bidiffuser`` (images <-> text latents) and ``fastchat_ext`` (conversation template).
"""
