"""Caption decoder: official checkpoint layout, strict loading, and KV-cached beam/greedy decoding.

A tiny GPT-2 is overfitted for a second on a few captions so that generation has something real
to find: captions that end in '<|EOS|>' at different lengths, which exercises the stop logic.
"""
import json
import os
import re
from pathlib import Path

import pytest
import torch

from bidiffuser.caption_decoder import (EOS_TOKEN, CaptionDecoder, CaptionDecoderConfig,
                                        build_tiny_tokenizer, init_caption_decoder,
                                        load_caption_decoder, load_tokenizer, official_state_dict,
                                        save_caption_decoder)
from bidiffuser.checkpoint import save_torch
from bidiffuser.errors import BiDiffuserError, CheckpointError

CAPTIONS = ["a dog running across a grassy field", "a man riding a horse on the beach",
            "two cats sleeping on a red couch", "a bowl of fruit on a wooden table",
            "a red double decker bus on a city street", "a child flying a kite in a park"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def trained(tok_dir):
    """A tiny decoder overfitted on CAPTIONS, and the CLIP-like features each caption belongs to."""
    tok = load_tokenizer(tok_dir)
    model = init_caption_decoder(CaptionDecoderConfig.tiny(), tok, seed=0)
    batch = tok([c + EOS_TOKEN for c in CAPTIONS], padding=True, return_tensors="pt")
    features = torch.randn(len(CAPTIONS), 77, model.config.n_embd, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(60):
        loss = model(batch.input_ids, features, batch.attention_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return model, features, losses


def _latents(model, features, n_random=4, seed=1):
    """Latents of the training captions plus random ones (which decode to varied, mixed captions)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen = model.encode_prefix(features)
    return torch.cat([seen, 2 * torch.randn(n_random, *seen.shape[1:], generator=g)])


# ------------------------------------------------------------------ tokenizer and config

def test_tiny_tokenizer_layout(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    assert tok.eos_token_id == len(tok) - 1  # added last, as in gpt2 + '<|EOS|>'
    ids = tok.encode(CAPTIONS[0] + EOS_TOKEN)
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == CAPTIONS[0]
    # A plain GPT-2-style tokenizer without '<|EOS|>' gets it added, growing the vocab by one.
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CAPTIONS, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    plain = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    plain.save_pretrained(tmp_path / "plain")
    loaded = load_tokenizer(tmp_path / "plain")
    assert loaded.eos_token == EOS_TOKEN and len(loaded) == len(plain) + 1


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(BiDiffuserError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "nope")


def test_config_json_roundtrip():
    cfg = CaptionDecoderConfig.tiny(vocab_size=300)
    assert CaptionDecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert CaptionDecoderConfig.official().to_dict() == dict(
        vocab_size=50258, n_positions=1024, n_embd=768, n_layer=12, n_head=12, prefix_length=77, hidden_dim=64)
    with pytest.raises(BiDiffuserError, match="n_embed"):
        CaptionDecoderConfig.from_dict({**cfg.to_dict(), "n_embed": 4})


# ------------------------------------------------------------------ official layout

def _official_format_file():
    return Path(__file__).resolve().parent / "fixtures" / "formats" / "caption_decoder.pth.json"


def test_official_keys_and_shapes_match_reference_file():
    spec = json.loads(_official_format_file().read_text())
    with torch.device("meta"):  # real GPT-2 small sizes, no memory
        model = CaptionDecoder(CaptionDecoderConfig.official())
    ours = {k: list(v.shape) for k, v in official_state_dict(model).items()}
    assert ours == spec["keys"]
    # GPT-2 small + one vocabulary row + the prefix projections (lm_head is tied, counted once).
    assert sum(p.numel() for p in model.parameters()) == 124_439_808 + 768 + 2 * 768 * 64 + 64 + 768


def test_official_buffers_are_causal_masks(trained):
    model = trained[0]
    sd = official_state_dict(model)
    n = model.config.n_positions
    mask = sd["module.gpt.transformer.h.1.attn.bias"]
    assert mask.shape == (1, 1, n, n) and torch.equal(mask[0, 0], torch.ones(n, n, dtype=torch.bool).tril())
    assert sd["module.gpt.transformer.h.0.attn.masked_bias"].item() == -1e4
    assert torch.equal(sd["module.gpt.lm_head.weight"], sd["module.gpt.transformer.wte.weight"])


# ------------------------------------------------------------------ loading

def _same_model(a, b):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 77, a.config.n_embd, generator=g)
    tokens = torch.randint(0, a.config.vocab_size, (2, 5), generator=g)
    with torch.no_grad():
        assert torch.equal(a.encode_prefix(feats), b.encode_prefix(feats))
        embeds = torch.cat([a.decode_prefix(a.encode_prefix(feats)), a.gpt.transformer.wte(tokens)], 1)
        assert torch.equal(a.gpt(inputs_embeds=embeds).logits, b.gpt(inputs_embeds=embeds).logits)
    assert b.gpt.lm_head.weight.data_ptr() == b.gpt.transformer.wte.weight.data_ptr()  # still tied


@pytest.mark.parametrize("variant", ["official", "bare", "safetensors"])
def test_load_roundtrip(trained, tok_dir, tmp_path, variant):
    model = trained[0]
    if variant == "safetensors":
        path = tmp_path / "caption_decoder.safetensors"
        save_caption_decoder(model, path)
    else:
        sd = official_state_dict(model)
        if variant == "bare":  # no DDP prefix, no old buffers, no tied lm_head copy
            sd = {k[len("module."):]: v for k, v in sd.items()
                  if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))}
        path = tmp_path / "caption_decoder.pth"
        save_torch(sd, path)
    loaded = load_caption_decoder(path, model.config, tok_dir)
    _same_model(model, loaded)
    assert not loaded.training
    if variant == "official":
        wide = load_caption_decoder(path, model.config, tok_dir, dtype=torch.float64)
        assert wide.gpt.transformer.wte.weight.dtype == torch.float64


@pytest.mark.parametrize("damage, key", [
    ("delete", "module.gpt.transformer.h.1.mlp.c_fc.bias"),
    ("extra", "module.gpt.transformer.h.9.ln_1.weight"),
    ("reshape", "module.decode_prefix.weight"),
])
def test_mismatched_checkpoint_names_the_key(trained, tok_dir, tmp_path, damage, key):
    sd = official_state_dict(trained[0])
    if damage == "delete":
        del sd[key]
    elif damage == "extra":
        sd[key] = torch.zeros(3)
    else:
        sd[key] = sd[key][:, :-1].clone()
    path = tmp_path / "bad.pth"
    save_torch(sd, path)
    with pytest.raises(CheckpointError, match=re.escape(key[len("module."):])) as err:
        load_caption_decoder(path, trained[0].config, tok_dir)
    assert str(path) in str(err.value)


def test_unreadable_checkpoints_name_the_path(trained, tok_dir, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(256))
    for path in (tmp_path / "missing.pth", junk):
        with pytest.raises(CheckpointError) as err:
            load_caption_decoder(path, trained[0].config, tok_dir)
        assert str(path) in str(err.value)


def test_tokenizer_vocab_must_match_config(trained, tok_dir, tmp_path):
    path = tmp_path / "cd.safetensors"
    save_caption_decoder(trained[0], path)
    config = CaptionDecoderConfig.tiny(vocab_size=trained[0].config.vocab_size + 7)
    with pytest.raises(BiDiffuserError, match="tokens but the caption decoder vocabulary"):
        load_caption_decoder(path, config, tok_dir)


# ------------------------------------------------------------------ training and generation

def test_loss_matches_hf_labels_loss(trained):
    model, features, losses = trained
    assert losses[-1] < 0.2 * losses[0]
    tok = model.tokenizer
    batch = tok([c + EOS_TOKEN for c in CAPTIONS[:3]], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(batch.input_ids, features[:3], batch.attention_mask)
        prefix = model.decode_prefix(model.encode_prefix(features[:3]))
        embeds = torch.cat([prefix, model.gpt.transformer.wte(batch.input_ids)], 1)
        labels = torch.cat([torch.full(prefix.shape[:2], -100),
                            batch.input_ids.masked_fill(batch.attention_mask == 0, -100)], 1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), batch.attention_mask], 1)
        reference = model.gpt(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, reference)


def test_overfitted_decoder_recovers_its_captions(trained):
    model, features, _ = trained
    latents = _latents(model, features, n_random=0)
    assert model.generate_captions(latents) == CAPTIONS
    assert model.generate_captions(latents, method="greedy") == CAPTIONS


def test_beam_search_cache_matches_full_recompute(trained):
    model, features, _ = trained
    latents = _latents(model, features)
    cached = model.generate_captions(latents, beam_size=5)
    assert cached == model.generate_captions(latents, beam_size=5, use_cache=False)
    # Batching B inputs into B x beam rows changes nothing either.
    assert cached == [model.generate_captions(z[None], beam_size=5)[0] for z in latents]
    # Finished beams must coexist with live ones: some sequences stop early, some at the limit.
    with torch.inference_mode():
        seqs = model._beam_search(model.decode_prefix(latents), 5, 12, True)
    assert any(s[-1] == model.eos_token_id and len(s) < 12 for s in seqs)
    assert any(len(s) == 12 for s in seqs)


def test_greedy_cache_matches_full_recompute_and_beam_of_one(trained):
    model, features, _ = trained
    latents = _latents(model, features, seed=2)
    greedy = model.generate_captions(latents, method="greedy")
    assert greedy == model.generate_captions(latents, method="greedy", use_cache=False)
    assert greedy == model.generate_captions(latents, beam_size=1)


def test_max_new_tokens_and_bad_inputs(trained):
    model, features, _ = trained
    latents = _latents(model, features, n_random=0)
    short = model.generate_captions(latents, method="greedy", max_new_tokens=2)
    tok = model.tokenizer
    assert short == [tok.decode(tok.encode(c)[:2]).strip() for c in CAPTIONS]
    with pytest.raises(BiDiffuserError, match="text latents must be"):
        model.generate_captions(torch.zeros(1, 77, 5))
    with pytest.raises(BiDiffuserError, match="exceeds the decoder context"):
        model.generate_captions(torch.zeros(1, 77, 8), max_new_tokens=500)
    assert model.training is False
