"""LaVi-Bridge's per-token adapter reads LM token i into slot i, with no mask: the prompt must sit in the
first slots (right padding, as LaVi-Bridge pads), whatever side the tokenizer pads on by default
(transformers' LLaMA tokenizers pad on the left). Trained and sampled through a tiny LLaMA."""
import pytest
import torch

from bidiffuser.bridge import TextModel, load_text_model
from bidiffuser.pipeline import BiDiffuser
from bidiffuser.train_bridge import BridgeTrainConfig, train_bridge

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
PROMPTS = ["a red square", "a blue circle on a white background"]


def _right_padded(mask: torch.Tensor) -> bool:
    """Every row is ones, then zeros."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all() and mask[:, 0].all())


def test_a_per_token_bridge_reads_the_prompt_from_its_first_slots(tiny_dir, tiny_easygen_dir, captions, tmp_path):
    model, tokenizer = load_text_model(tiny_easygen_dir)
    assert tokenizer.padding_side == "left"  # the default this guards against
    masks = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: masks.append(kw["attention_mask"].clone()),
                                           with_kwargs=True)
    out = train_bridge(BridgeTrainConfig(model=str(tiny_dir), data=str(captions), out=str(tmp_path / "b"),
                                         text_model=str(tiny_easygen_dir), kind="per_token", stage="distill",
                                         steps=2, batch_size=4, seed=0), text_model=(model, tokenizer))
    hook.remove()
    assert masks and all(_right_padded(m) for m in masks)  # training read the captions from the first slots
    assert tokenizer.padding_side == "left"  # a tokenizer handed over (EasyGen's chat one) is left as it was

    pipe = BiDiffuser.from_pretrained(tiny_dir, bridge=out, text_model=str(tiny_easygen_dir))
    ids, mask = pipe.text_model.tokenize(PROMPTS)
    assert ids.shape[1] == pipe.bridge_files.config.num_tokens  # cut or padded to the slot
    for k, prompt in enumerate(PROMPTS):
        own = tokenizer(prompt).input_ids
        assert ids[k, :len(own)].tolist() == own
        assert mask[k, :len(own)].all() and not mask[k, len(own):].any()
    states, mask = pipe.encode_bridge(PROMPTS)
    slots = pipe.bridge(states, mask)
    words = len(tokenizer(PROMPTS[0]).input_ids)
    # slot 0 reads <s> (the same state for every prompt); the next slots read the prompts' words
    torch.testing.assert_close(slots[0, 0], slots[1, 0])
    assert not torch.allclose(slots[0, 1:words], slots[1, 1:words])
    drawn = pipe.text_to_image(PROMPTS, steps=2, seed=0)
    assert len(drawn.images) == 2 and not torch.equal(drawn.image_latents[0], drawn.image_latents[1])


def test_padding_never_moves_a_prompt_for_either_kind(tiny_easygen_dir):
    """The resampler masks padded keys: a prompt reads the same alone or padded in a batch."""
    model, tokenizer = load_text_model(tiny_easygen_dir)
    text = TextModel(model, tokenizer, max_length=32)
    alone, _ = text.encode(PROMPTS[:1])
    batch, mask = text.encode(PROMPTS)
    assert _right_padded(mask)
    torch.testing.assert_close(batch[0, :alone.shape[1]], alone[0], rtol=1e-5, atol=1e-5)
