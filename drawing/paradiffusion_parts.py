"""ParaDiffusion's released parts, loaded strictly on today's diffusers/transformers/peft.

What the reference (weijiawu/ParaDiffusion's ``demo.py`` on diffusers 0.20, transformers 4.30.1,
peft 0.7.1) builds, part by part; every weight file whose keys or shapes do not fit is refused with
the list of what differs (the libraries themselves only warn).
"""
from __future__ import annotations

from pathlib import Path

import torch

from bidiffuser.checkpoint import check_state_dict, read_json, read_state_dict, require_file
from bidiffuser.errors import BiDiffuserError

from .backend import DrawingError

# demo.py's get_pipe: tokenizer.model_max_length = 256, tokenizer.pad_token = tokenizer.eos_token
MAX_LENGTH = 256

# DPMSolverMultistepScheduler settings added after diffusers 0.20 (which ignored such keys), pinned to
# what 0.20 did: its last step lands on alphas_cumprod[0] (final_sigmas_type "sigma_min"; today's
# default "zero" also forces a first-order last step), no Euler last step, plain sigmas.
SCHEDULER_PINS = {
    "final_sigmas_type": "sigma_min", "euler_at_final": False, "use_lu_lambdas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False,
    "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
}


def _fail(e: BiDiffuserError) -> DrawingError:
    return DrawingError(str(e))


class PromptTokenizer:
    """The reference's tokenizer calls, exactly: ``AutoTokenizer`` there is transformers 4.30's
    LlamaTokenizerFast, i.e. the ``tokenizers`` backend read from ``tokenizer.json`` with a BOS/EOS
    template from tokenizer_config.json; prompts are padded to ``max_length`` with EOS and truncated.

    transformers 5's LLaMA tokenizer does not read tokenizer.json as is (it drops the dummy space
    before a leading space and splits ``</s>`` inside text), so the backend is used directly."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer, processors

        cfg_file = directory / "tokenizer_config.json"
        cfg = read_json(cfg_file, "tokenizer config") if cfg_file.is_file() else {}
        source = directory / "tokenizer.json"
        if not source.is_file():
            raise DrawingError(f"tokenizer.json not found in {directory}: ParaDiffusion tokenizes with the fast "
                               f"LLaMA tokenizer read from it (Llama-2-7b-hf ships one)")
        try:
            self.backend = Tokenizer.from_file(str(source))
        except Exception as e:  # tokenizers raises its own Exception type for a malformed file
            raise DrawingError(f"{source}: unreadable tokenizer ({str(e).splitlines()[0]})") from None
        bos, eos = _content(cfg.get("bos_token"), "<s>"), _content(cfg.get("eos_token"), "</s>")
        self.bos_id, self.eos_id = self.backend.token_to_id(bos), self.backend.token_to_id(eos)
        if self.bos_id is None or self.eos_id is None:
            raise DrawingError(f"{source}: no id for {bos!r} or {eos!r}")
        add_bos, add_eos = bool(cfg.get("add_bos_token", True)), bool(cfg.get("add_eos_token", False))
        # LlamaTokenizerFast.update_post_processor (transformers 4.30) replaces the file's template
        single = f"{(bos + ':0 ') * add_bos}$A:0{(' ' + eos + ':0') * add_eos}"
        pair = f"{single}{(' ' + bos + ':1') * add_bos} $B:1{(' ' + eos + ':1') * add_eos}"
        specials = [(t, i) for t, i, on in ((bos, self.bos_id, add_bos), (eos, self.eos_id, add_eos)) if on]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        # 4.30's LlamaTokenizerFast pads on the left unless tokenizer_config.json says otherwise;
        # Llama-2-7b-hf's says "right"
        self.padding_side = cfg.get("padding_side", "left")
        if self.padding_side not in ("left", "right"):
            raise DrawingError(f"{cfg_file}: padding_side must be left or right (got {self.padding_side!r})")
        self.source = source

    def __call__(self, prompts: list[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each len(prompts) x max_length, as
        ``tokenizer(prompts, padding="max_length", max_length=..., truncation=True)`` gives them."""
        self.backend.enable_truncation(max_length=max_length, stride=0, strategy="longest_first", direction="right")
        self.backend.enable_padding(length=max_length, direction=self.padding_side, pad_id=self.eos_id,
                                    pad_type_id=0, pad_token=self.backend.id_to_token(self.eos_id))
        enc = self.backend.encode_batch(list(prompts), add_special_tokens=True)
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        # the padding sits on the side the reference pads: the mask is ones then zeros (or the reverse)
        ordered = mask if self.padding_side == "right" else mask.flip(1)
        if not torch.equal(ordered, ordered.sort(dim=1, descending=True).values):
            raise DrawingError(f"{self.source}: the tokenizer did not pad on the {self.padding_side}")
        return ids, mask


def _content(token, default: str) -> str:
    if isinstance(token, dict):
        return token.get("content", default)
    return token or default


def load_text_encoder(llama_dir: Path, lora_dir: Path | None, dtype: torch.dtype):
    """Llama-2's ``LlamaModel`` (its ``lm_head`` is the only key left over) with the released PEFT
    LoRA on it, unmerged, as ``PeftModel.from_pretrained`` leaves it in the reference."""
    from transformers import LlamaModel

    require_file(llama_dir / "config.json", "Llama config")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would list lm_head; what matters is checked below
    try:
        model, info = LlamaModel.from_pretrained(str(llama_dir), dtype=dtype, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise DrawingError(f"{llama_dir}: cannot load the Llama ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = {"missing keys": sorted(info.get("missing_keys", [])),
                "unexpected keys": sorted(set(info.get("unexpected_keys", [])) - {"lm_head.weight"}),
                "mis-shaped keys": sorted(str(m) for m in info.get("mismatched_keys", []))}
    if any(problems.values()):
        raise DrawingError(f"{llama_dir}: its weights do not fit its config.json: "
                           + "; ".join(f"{k}: {', '.join(v[:6])}" for k, v in problems.items() if v))
    model.eval().requires_grad_(False)
    if lora_dir is None:
        return model
    return _with_lora(model, lora_dir)


def _with_lora(model, lora_dir: Path):
    from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    cfg_file = require_file(lora_dir / "adapter_config.json", "LoRA adapter config")
    try:
        config = LoraConfig.from_pretrained(str(lora_dir))
    except (TypeError, ValueError) as e:
        raise DrawingError(f"{cfg_file}: not a LoRA adapter config ({str(e).splitlines()[0]})") from None
    weights = [lora_dir / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (lora_dir / n).is_file()]
    if not weights:
        raise DrawingError(f"adapter_model.safetensors (or .bin) not found in {lora_dir}")
    peft_model = PeftModel(model, config)
    # peft only warns about keys that do not fit: compare with what save_pretrained would write
    expected = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    try:
        sd = read_state_dict(weights[0], "LoRA adapter")
        check_state_dict(expected, sd, weights[0])
    except BiDiffuserError as e:
        raise _fail(e) from None
    set_peft_model_state_dict(peft_model, sd)
    return peft_model.eval().requires_grad_(False)


def _diffusers_weights(directory: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise DrawingError(f"diffusion_pytorch_model.safetensors (or .bin) not found in {directory}")


def load_diffusers_model(cls, directory: Path, what: str, dtype: torch.dtype):
    """A diffusers model from its own config.json, its weights loaded strictly."""
    config = read_json(require_file(directory / "config.json", f"{what} config"), f"{what} config")
    try:
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError, KeyError) as e:
        raise DrawingError(f"{directory / 'config.json'}: not a {cls.__name__} config ({e})") from None
    weights = _diffusers_weights(directory)
    try:
        sd = read_state_dict(weights, f"{what} weights")
        check_state_dict(model.state_dict(), sd, weights)
    except BiDiffuserError as e:
        raise _fail(e) from None
    model.load_state_dict(sd, strict=True)
    if dtype != torch.float32:  # built in float32; casting to it again only adds a diffusers warning
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def load_scheduler(directory: Path):
    """``DPMSolverMultistepScheduler.from_pretrained(scheduler/)`` as diffusers 0.20 built it."""
    from diffusers import DPMSolverMultistepScheduler

    config = read_json(require_file(directory / "scheduler_config.json", "scheduler config"), "scheduler config")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    # the reference pipeline's __init__ rewrites a steps_offset other than 1 (0 when unset) to 1
    config["steps_offset"] = 1
    try:
        return DPMSolverMultistepScheduler.from_config({**config, **SCHEDULER_PINS})
    except (TypeError, ValueError, NotImplementedError) as e:
        raise DrawingError(f"{directory / 'scheduler_config.json'}: {e}") from None
