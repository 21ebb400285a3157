"""EasyGenForCausalLM: a transformers LLaMA causal LM that also reads images.

Each image is BiDiffuser's 77 x 768 feature sequence, mapped by the projector to 77 LLM input
embeddings. Prompts carry one sentinel id (IMAGE_TOKEN_ID) per image position, so sequence lengths,
padding and attention masks are all known before the model runs; ``forward`` replaces the
sentinels' embeddings by the projected features, in order (row-major over the batch).
"""
from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from .constants import IGNORE_INDEX, IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS
from .projector import build_projector


@strict
class EasyGenConfig(LlamaConfig):
    """A LlamaConfig plus the projector's sizes. ``mm_hidden_size`` is BiDiffuser's feature width
    (the caption decoder's 768); the projector's output is the LLM's ``hidden_size``."""
    model_type = "easygen"
    mm_hidden_size: int = 768
    projector_hidden_size: int = 3072
    projector_type: str = "mlp"
    num_image_tokens: int = NUM_IMAGE_TOKENS


class EasyGenForCausalLM(LlamaForCausalLM):
    config_class = EasyGenConfig

    def __init__(self, config: EasyGenConfig):
        super().__init__(config)
        self.projector = build_projector(config.projector_type, config.mm_hidden_size,
                                         config.projector_hidden_size, config.hidden_size)
        self.post_init()

    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings, with each run of sentinel ids replaced by one image's projected features.

        ``image_features``: N x num_image_tokens x mm_hidden_size, N = number of images in the batch,
        in reading order (first sample's images first).
        """
        is_image = input_ids == IMAGE_TOKEN_ID
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        n_positions = int(is_image.sum())
        if n_positions == 0:
            if self.training and torch.is_grad_enabled():
                # A text-only batch must still give the projector a (zero) gradient: DDP and FSDP
                # reduce gradients with collectives that every rank has to join with the same tensors.
                probe = self.projector(embeds.new_zeros(1, self.config.mm_hidden_size, dtype=self.projector_dtype))
                embeds = embeds + 0.0 * probe.sum().to(embeds.dtype)
            return embeds
        if image_features is None:
            raise ValueError("the prompt has image positions but no image_features were given")
        n_images, n_tokens = image_features.shape[:2]
        if n_images * n_tokens != n_positions:
            raise ValueError(f"the prompt has {n_positions} image positions but image_features give "
                             f"{n_images} x {n_tokens} = {n_images * n_tokens}")
        projected = self.projector(image_features.to(device=embeds.device, dtype=self.projector_dtype))
        return embeds.masked_scatter(is_image.unsqueeze(-1), projected.to(embeds.dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                image_features: torch.Tensor | None = None, **kwargs):
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed_inputs(input_ids, image_features)
            if labels is not None:  # image positions never carry a loss, whatever the caller passed
                labels = labels.masked_fill(input_ids == IMAGE_TOKEN_ID, IGNORE_INDEX)
            input_ids = None
        return super().forward(input_ids=input_ids,
                               attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                               use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs):
        """``generate`` over prompts that may hold images (left-padded for batches).

        The prompt is embedded once (images spliced in) and passed as ``inputs_embeds``, so the
        returned ids are the NEW tokens only, with or without images.
        """
        if input_ids is None:
            return super().generate(attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_inputs(input_ids, image_features)
        return super().generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


AutoConfig.register("easygen", EasyGenConfig)
AutoModelForCausalLM.register(EasyGenConfig, EasyGenForCausalLM)


def register() -> None:
    """The ``bidiffuser.text_models`` entry point: importing this module has registered the model type."""
