"""--load-8bit / --load-4bit: the LLM's decoder layers through bitsandbytes on CPU, the rest kept."""
from __future__ import annotations

import pytest
import torch

from easygen.builder import load_pretrained
from easygen.profiling import module_bytes

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in requirements.txt; absent only in a partial install")


def _logits(loaded, text="What is in the picture?"):
    p = loaded.processor
    ids = torch.tensor([p.tokenize_prompt(p.build_prompt([{"role": "user", "content": text}]))])
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits.float()


@pytest.mark.parametrize("bits,linear,max_err", [("8bit", "Linear8bitLt", 0.05), ("4bit", "Linear4bit", 0.5)])
def test_quantized_llm_loads_runs_and_is_smaller(tiny_easygen_dir, bits, linear, max_err):
    full = load_pretrained(tiny_easygen_dir, dtype="bfloat16", load_bidiffuser=False)
    quant = load_pretrained(tiny_easygen_dir, dtype="bfloat16", load_bidiffuser=False, quantization=bits)
    assert quant.layout.endswith(f"+{bits}")
    layer = quant.model.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == linear and type(layer.mlp.down_proj).__name__ == linear
    assert type(quant.model.lm_head) is torch.nn.Linear and quant.model.lm_head.weight.dtype == torch.bfloat16
    assert module_bytes(*quant.model.model.layers) < 0.6 * module_bytes(*full.model.model.layers)
    ref, got = _logits(full), _logits(quant)
    assert torch.isfinite(got).all()
    assert ((got - ref).norm() / ref.norm()).item() < max_err
    p = quant.processor
    ids = torch.tensor([p.tokenize_prompt(p.build_prompt([{"role": "user", "content": "hi"}]))])
    out = quant.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 3  # EasyGen's generate returns the new tokens


def test_quantized_model_refuses_a_merge(tiny_easygen_dir, tmp_path):
    from bidiffuser.errors import BiDiffuserError

    with pytest.raises(BiDiffuserError, match="cannot be merged into a quantized model"):
        load_pretrained(tiny_easygen_dir, quantization="8bit", merge_lora=True, load_bidiffuser=False)


def test_lora_adapter_applies_unmerged_on_a_quantized_model(tiny_easygen_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_pretrained(tiny_easygen_dir, load_bidiffuser=False)
    peft_model = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    quant = load_pretrained(tiny_easygen_dir, lora=tmp_path / "adapter", quantization="8bit", load_bidiffuser=False)
    assert "+8bit+lora" in quant.layout
    q_proj = quant.model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear8bitLt" and hasattr(q_proj, "lora_A")
    assert torch.isfinite(_logits(quant)).all()
