"""EasyGenForCausalLM: image splicing, labels, generation with and without images."""
import pytest
import torch
import torch.nn.functional as F

from easygen.constants import IGNORE_INDEX, IMAGE_TOKEN_ID


@pytest.fixture(scope="module")
def lm(tiny_loaded):
    return tiny_loaded


def _features(lm, n, seed=0):
    cfg = lm.model.config
    return torch.randn(n, cfg.num_image_tokens, cfg.mm_hidden_size, generator=torch.Generator().manual_seed(seed))


def _conversation_ids(lm):
    """Two user turns, each with an image, and one answer in between."""
    messages = [{"role": "user", "content": "what colour is it?", "num_images": 1},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "and this one?", "num_images": 1}]
    return lm.processor.tokenize_prompt(lm.processor.build_prompt(messages))


def test_image_positions_hold_projected_features_and_text_positions_token_embeddings(lm):
    model, ids = lm.model, torch.tensor([_conversation_ids(lm)])
    feats = _features(lm, 2)
    captured = {}
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, image_features=feats)
    finally:
        hook.remove()
    embeds = captured["inputs_embeds"][0]

    # the projector MLP, computed from its weights without the module
    p = model.projector
    expected_img = F.linear(F.gelu(F.linear(feats, p.fc1.weight, p.fc1.bias)), p.fc2.weight, p.fc2.bias)
    runs = [i for i, t in enumerate(ids[0].tolist()) if t == IMAGE_TOKEN_ID]
    n = model.config.num_image_tokens
    assert len(runs) == 2 * n
    starts = [runs[0], runs[n]]
    for k, s in enumerate(starts):
        assert runs[k * n: (k + 1) * n] == list(range(s, s + n))  # contiguous runs
        torch.testing.assert_close(embeds[s: s + n], expected_img[k])
    text = [i for i, t in enumerate(ids[0].tolist()) if t != IMAGE_TOKEN_ID]
    torch.testing.assert_close(embeds[text], model.model.embed_tokens.weight[ids[0, text]])


def test_labels_at_image_positions_never_count(lm):
    model = lm.model
    ids = torch.tensor([_conversation_ids(lm)])
    feats = _features(lm, 2)
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN_ID] = 5  # garbage a careless caller might pass
    clean = ids.masked_fill(ids == IMAGE_TOKEN_ID, IGNORE_INDEX)
    with torch.no_grad():
        a = model(input_ids=ids, image_features=feats, labels=labels).loss
        b = model(input_ids=ids, image_features=feats, labels=clean).loss
    assert torch.isfinite(a) and torch.equal(a, b)


def test_image_count_mismatch_is_an_error(lm):
    ids = torch.tensor([_conversation_ids(lm)])
    with pytest.raises(ValueError, match="154 image positions"):
        lm.model(input_ids=ids, image_features=_features(lm, 1))
    with pytest.raises(ValueError, match="no image_features"):
        lm.model(input_ids=ids)


def _generate(lm, prompts_ids, feats, **kw):
    batch = lm.processor.pad_batch(prompts_ids, side="left")
    return lm.model.generate(batch["input_ids"], image_features=feats, attention_mask=batch["attention_mask"],
                             max_new_tokens=8, pad_token_id=lm.processor.pad_token_id, **kw)


def test_cached_generation_equals_uncached(lm):
    ids, feats = [_conversation_ids(lm)], _features(lm, 2)
    cached = _generate(lm, ids, feats, do_sample=False, use_cache=True)
    uncached = _generate(lm, ids, feats, do_sample=False, use_cache=False)
    assert cached.shape == (1, 8) and torch.equal(cached, uncached)


def test_batch_mixing_images_and_text_only_matches_one_by_one(lm):
    with_img = _conversation_ids(lm)
    text_only = lm.processor.tokenize_prompt(lm.processor.build_prompt([{"role": "user", "content": "hello there"}]))
    feats = _features(lm, 2)
    batch = _generate(lm, [text_only, with_img], feats, do_sample=False)
    alone = [_generate(lm, [text_only], None, do_sample=False), _generate(lm, [with_img], feats, do_sample=False)]
    eos = lm.model.config.eos_token_id

    def until_eos(row):  # a finished row is padded in a batch, and stops early alone
        row = row.tolist()
        return row[: row.index(eos) + 1] if eos in row else row
    assert until_eos(batch[0]) == until_eos(alone[0][0]) and until_eos(batch[1]) == until_eos(alone[1][0])


def test_beam_search_and_seeded_sampling(lm):
    ids, feats = [_conversation_ids(lm)], _features(lm, 2)
    beams = _generate(lm, ids, feats, do_sample=False, num_beams=3)
    assert beams.shape[0] == 1 and beams.shape[1] <= 8
    torch.manual_seed(0)
    a = _generate(lm, ids, feats, do_sample=True, temperature=1.0, top_p=0.9)
    torch.manual_seed(0)
    b = _generate(lm, ids, feats, do_sample=True, temperature=1.0, top_p=0.9)
    assert torch.equal(a, b)


def test_left_padded_batch_gives_the_same_next_token_logits(lm):
    with_img = _conversation_ids(lm)
    text_only = lm.processor.tokenize_prompt(lm.processor.build_prompt([{"role": "user", "content": "hello there"}]))
    feats = _features(lm, 2)
    batch = lm.processor.pad_batch([text_only, with_img], side="left")
    with torch.no_grad():
        both = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        image_features=feats).logits[:, -1]
        a = lm.model(input_ids=torch.tensor([text_only])).logits[0, -1]
        b = lm.model(input_ids=torch.tensor([with_img]), image_features=feats).logits[0, -1]
    torch.testing.assert_close(both[0], a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[1], b, atol=1e-5, rtol=1e-4)
