"""EasyGen draws through the bridge: the builder finds MODEL/bridge, the LLM itself is the bridge's text
model, --draw-with picks the path for chat, serve, worker and eval, and an image reply's description is
drawn from the LLM's hidden states (the CLIP path untouched when asked for)."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bidiffuser.errors import BiDiffuserError
from bidiffuser.train_bridge import BridgeTrainConfig, train_bridge
from easygen.assistant import Assistant, GenerationSettings
from easygen.builder import load_pretrained

from .conftest import overfit

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
DRAW = [{"role": "user", "content": "Draw a red square."},
        {"role": "assistant", "content": "Here it is: <Img>a red square</Img>"}]


@pytest.fixture(scope="module")
def bridged_model(tiny_dir, tiny_easygen_dir, captions, tmp_path_factory) -> Path:
    """A copy of the tiny EasyGen directory with a bridge trained from its own LLM in MODEL/bridge."""
    root = tmp_path_factory.mktemp("bridged")
    model = root / "model"
    shutil.copytree(tiny_easygen_dir, model, symlinks=True)
    train_bridge(BridgeTrainConfig(model=str(tiny_dir), data=str(captions), out=str(model / "bridge"),
                                   text_model=str(model), stage="distill", steps=2, batch_size=4, width=32, depth=1,
                                   heads=2, seed=0))
    return model


def test_the_builder_draws_through_the_models_bridge_with_its_own_llm(bridged_model, tiny_easygen_dir):
    auto = load_pretrained(bridged_model, device="cpu")
    assert auto.draw_with == "bridge"
    assert auto.bidiffuser.text_model.model is auto.model  # the LLM that wrote the description reads it
    assert load_pretrained(bridged_model, device="cpu", draw_with="clip").draw_with == "clip"
    assert load_pretrained(tiny_easygen_dir, device="cpu").draw_with == "clip"  # no bridge: the original path
    with pytest.raises(BiDiffuserError, match="--draw-with bridge: .* has no bridge/ directory"):
        load_pretrained(tiny_easygen_dir, device="cpu", draw_with="bridge")
    with pytest.raises(BiDiffuserError, match="--draw-with must be one of"):
        load_pretrained(tiny_easygen_dir, device="cpu", draw_with="t5")


def test_the_bridge_tokenizes_descriptions_as_the_llm_does(bridged_model):
    """The bridge was trained through transformers' AutoTokenizer; EasyGen hands it its own tokenizer."""
    from transformers import AutoTokenizer
    auto = AutoTokenizer.from_pretrained(bridged_model)
    ours = load_pretrained(bridged_model, device="cpu").tokenizer
    for text in ("a red square", "In the middle of a plain white background there is one green triangle."):
        assert auto(text).input_ids == ours(text).input_ids


def test_an_image_reply_is_drawn_from_the_llm_hidden_states(bridged_model, tmp_path):
    calls = {}
    for path in ("bridge", "clip"):
        loaded = load_pretrained(bridged_model, device="cpu", draw_with=path)
        overfit(loaded, DRAW)
        calls[path] = []
        if loaded.bidiffuser.has_bridge:
            loaded.bidiffuser.bridge.register_forward_hook(lambda *a, c=calls[path]: c.append(1))
        assistant = Assistant(loaded, GenerationSettings(temperature=0, seed=0, image_steps=2, image_scale=0.0),
                              out_dir=tmp_path / path)
        reply = assistant.send("Draw a red square.")
        assert reply.image_descriptions == ["a red square"] and reply.image_paths[0].is_file()
    assert calls["bridge"] and calls["clip"] == []
    # Assistant.draw (easygen eval t2i) takes the same path and seeds
    loaded = load_pretrained(bridged_model, device="cpu")
    a = Assistant(loaded, GenerationSettings(image_steps=2, image_scale=0.0))
    one, again = a.draw(["a red square"], [3])[0], a.draw(["a red square"], [3])[0]
    assert torch.equal(torch.from_numpy(np.asarray(one)), torch.from_numpy(np.asarray(again)))


def test_the_ci_demo_trains_a_bridge_and_its_services_draw_through_it(ci_demo):
    """The reduced recipe runs both bridge stages; chat, serve and worker load MODEL/bridge by default."""
    assert (ci_demo.root / "bridge" / "config.json").is_file() and (ci_demo.easygen / "bridge").is_dir()
    loaded = load_pretrained(ci_demo.easygen, device="cpu")
    assert loaded.draw_with == "bridge"


def test_draw_with_flag_reaches_the_engine(bridged_model):
    import argparse

    from easygen.cli.engine_args import add_engine_args, load_engine, resolve_model
    p = argparse.ArgumentParser()
    add_engine_args(p)
    for flag, want in (([], "bridge"), (["--draw-with", "clip"], "clip"), (["--draw-with", "bridge"], "bridge")):
        args = p.parse_args(["--model-path", str(bridged_model), "--device", "cpu", *flag])
        resolve_model(args)
        loaded, _, _ = load_engine(args)
        assert loaded.draw_with == want


@pytest.fixture(scope="module")
def lavi_model(tiny_dir, tiny_easygen_dir, captions, tmp_path_factory) -> Path:
    """A copy of the tiny EasyGen directory whose MODEL/bridge was trained with the lavi-bridge preset
    (per-token adapter, LoRA on the U-ViT and on the LLM's attention) from its own LLM."""
    model = tmp_path_factory.mktemp("lavi") / "model"
    shutil.copytree(tiny_easygen_dir, model, symlinks=True)
    train_bridge(BridgeTrainConfig(model=str(tiny_dir), data=str(captions), out=str(model / "bridge"),
                                   text_model=str(model), preset="lavi-bridge", stage="t2i", steps=2, batch_size=4,
                                   uvit_lora_rank=2, lm_lora_rank=2, lm_lr=1e-2, seed=0))
    return model


def test_a_bridge_with_llm_lora_draws_in_chat_and_the_chat_is_unchanged(lavi_model, tmp_path):
    """The builder hands the chat LLM to the bridge; its LoRA is on only while a description is read."""
    import copy

    from bidiffuser.bridge import TextModel, add_lora, load_lora
    loaded = load_pretrained(lavi_model, device="cpu")
    files = loaded.bidiffuser.bridge_files
    assert loaded.draw_with == "bridge" and files.lm_lora is not None and files.config.kind == "per_token"
    overfit(loaded, DRAW)
    probe = torch.tensor([loaded.tokenizer("USER: Draw a red square. ASSISTANT: Here it is").input_ids])
    with torch.no_grad():
        before = loaded.model(input_ids=probe).logits
    assistant = Assistant(loaded, GenerationSettings(temperature=0, seed=0, image_steps=2, image_scale=0.0),
                          out_dir=tmp_path)
    reply = assistant.send("Draw a red square.")
    assert reply.image_descriptions == ["a red square"] and reply.image_paths[0].is_file()
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=probe).logits, before)
    assert assistant.send("Draw a red square.").text == reply.text  # the next answer as the first
    assert not any("lora" in k for k in loaded.model.state_dict())  # nothing stays in the chat LLM

    # what the drawing read: the LLM with the bridge's LoRA, as peft puts it in (on a private copy)
    c = files.config
    reference = copy.deepcopy(loaded.model)
    add_lora(reference, files.lm_lora)
    load_lora(reference, files.lm_lora_weights(), files.root)
    want, _ = TextModel(reference.eval(), loaded.tokenizer, c.layer, c.max_length, c.num_tokens).encode(["a red square"])
    base, _ = TextModel(loaded.model, loaded.tokenizer, c.layer, c.max_length, c.num_tokens).encode(["a red square"])
    got, _ = loaded.bidiffuser.encode_bridge(["a red square"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the LoRA did change what the drawing read
