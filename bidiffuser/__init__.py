"""BiDiffuser: the UniDiffuser-v1 diffusion stack (U-ViT, caption decoder, VAE, CLIP, sampler,
pipeline) and the LLM bridge that lets it draw from any language model's hidden states. It knows
nothing about EasyGen.

Public names are imported lazily so that `bidiffuser --help` does not pay for torch.
"""
from importlib import import_module

_EXPORTS = {
    "UViT": "uvit", "UViTConfig": "uvit", "load_uvit": "uvit",
    "CaptionDecoder": "caption_decoder", "CaptionDecoderConfig": "caption_decoder",
    "load_caption_decoder": "caption_decoder",
    "AutoencoderConfig": "autoencoder", "load_autoencoder": "autoencoder",
    "CLIPImageEncoder": "clip", "CLIPTextEncoder": "clip",
    "load_clip_image_encoder": "clip", "load_clip_text_encoder": "clip",
    "NoiseSchedule": "sampler", "dpm_solver_pp_sample": "sampler",
    "BiDiffuser": "pipeline", "BiDiffuserOutput": "pipeline", "MODES": "modes",
    "BiDiffuserConfig": "model_dir", "read_config": "model_dir", "init_tiny": "model_dir",
    "BiDiffuserError": "errors", "CheckpointError": "errors",
    "Bridge": "bridge", "BridgeConfig": "bridge", "read_bridge": "bridge", "save_bridge": "bridge",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'bidiffuser' has no attribute {name!r}")
