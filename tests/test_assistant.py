"""easygen.Assistant: a conversation with images in, streamed text out, image replies as PNG."""
import pytest
from PIL import Image

from bidiffuser.errors import BiDiffuserError
from easygen.assistant import Assistant, GenerationSettings
from easygen.builder import load_pretrained
from easygen.errors import EasyGenError
from easygen.features import ImageFeatureExtractor

from .conftest import make_image, overfit

FAST = dict(temperature=0.0, max_new_tokens=12, image_steps=2)


def _assistant(loaded, tmp_path, **settings):
    features = ImageFeatureExtractor(loaded.bidiffuser, steps=2, cache_dir=tmp_path / "cache")
    return Assistant(loaded, GenerationSettings(**{**FAST, **settings}), out_dir=tmp_path / "images",
                     features=features)


def test_image_reply_produces_a_png(tiny_easygen_dir, tmp_path):
    loaded = load_pretrained(tiny_easygen_dir)  # a private copy: this test trains it
    loss = overfit(loaded, [{"role": "user", "content": "draw a red circle"},
                             {"role": "assistant", "content": "<Img>a red circle</Img>"}])
    assert loss < 0.1
    streamed = []
    reply = _assistant(loaded, tmp_path).send("draw a red circle", on_token=streamed.append)
    assert reply.text == "<Img>a red circle</Img>"
    assert "".join(streamed).strip() == reply.text
    assert len(reply.image_paths) == 1 and reply.image_paths[0].suffix == ".png"
    assert Image.open(reply.image_paths[0]).size == (32, 32)


def test_images_at_several_turns_and_streaming(tiny_loaded, tmp_path):
    a = _assistant(tiny_loaded, tmp_path)
    red, blue = make_image(tmp_path / "r.png"), make_image(tmp_path / "b.png", color=(40, 80, 220))
    pieces = []
    first = a.send("what is this?", images=[red], on_token=pieces.append)
    assert "".join(pieces).strip() == first.text
    a.send("and these?", images=[blue, red])
    assert [len(m["images"]) for m in a.messages] == [1, 0, 2, 0]
    # red was encoded once: its features are reused on later turns and from the cache
    assert a.features.misses == 2
    assert a._image_features(a.messages).shape[0] == 3


def test_bad_input_leaves_the_conversation_unchanged(tiny_loaded, tmp_path):
    a = _assistant(tiny_loaded, tmp_path)
    a.send("hello")
    before = [dict(m) for m in a.messages]
    with pytest.raises(EasyGenError, match="empty message"):
        a.send("   ")
    with pytest.raises(BiDiffuserError, match="image not found"):
        a.send("look", images=[tmp_path / "missing.png"])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(BiDiffuserError, match="junk.jpg"):
        a.send("look", images=[junk])
    assert a.messages == before


def test_context_overflow_drops_oldest_turns_and_rejects_a_message_that_cannot_fit(tiny_loaded, tmp_path):
    a = _assistant(tiny_loaded, tmp_path, max_new_tokens=8)
    limit = a.context_limit

    def prompt_len(text):
        return len(a.processor.tokenize_prompt(a.processor.build_prompt([{"role": "user", "content": text}])))
    words = 1
    while prompt_len("one " * (words + 1)) < 0.6 * limit:  # a message filling ~60% of the context
        words += 1
    a.send("one " * words)
    reply = a.send("one " * words + "again")  # both cannot fit: the first exchange goes
    assert any("dropped the 1 oldest exchange" in n for n in reply.notices)
    assert len(a.messages) == 2 and a.messages[0]["content"].endswith("again")
    kept = [dict(m) for m in a.messages]
    with pytest.raises(EasyGenError, match="message too long"):
        a.send("word " * (limit + 10))
    assert a.messages == kept


def test_text_only_assistant_without_bidiffuser(tiny_easygen_dir, tmp_path):
    loaded = load_pretrained(tiny_easygen_dir, load_bidiffuser=False)
    a = Assistant(loaded, GenerationSettings(**FAST), out_dir=tmp_path)
    assert isinstance(a.send("hi").text, str)
    with pytest.raises(EasyGenError, match="need a BiDiffuser"):
        a.send("look", images=[make_image(tmp_path / "x.png")])


def test_typed_image_markers_are_refused_not_spliced(tiny_loaded, tmp_path):
    a = _assistant(tiny_loaded, tmp_path)
    for text in ("what does <image> mean?", "say <ImageHere>"):
        with pytest.raises(EasyGenError, match="marks image slots"):
            a.send(text)
    assert a.messages == []


def test_a_drawn_picture_is_shown_to_the_model_in_the_next_turn(tiny_easygen_dir, tmp_path):
    """What the assistant drew is part of the conversation like an upload: the next user turn shows
    it first (before that turn's uploads); when trimming drops the exchange that drew it, it goes too."""
    from easygen.constants import IMAGE_TOKEN_ID

    loaded = load_pretrained(tiny_easygen_dir)
    overfit(loaded, [{"role": "user", "content": "draw a red circle"},
                     {"role": "assistant", "content": "<Img>a red circle</Img>"}])
    a = _assistant(loaded, tmp_path)
    drawn = a.send("draw a red circle").image_paths[0]
    upload = make_image(tmp_path / "b.png", color=(40, 80, 220))
    turn = a.prepare("what color did you make it? and this one?", images=[upload])
    per_image = loaded.model.config.num_image_tokens
    assert turn.ids.count(IMAGE_TOKEN_ID) == 2 * per_image and turn.features.shape[0] == 2
    assert a._shown_images(turn.kept)[-1] == [str(drawn.resolve()), str(upload.resolve())]
    # the drawn picture's features are the ones an upload of the same file gets
    assert a._feature_memo[str(drawn.resolve())].equal(turn.features[0])
    # a saved conversation keeps it, and a missing drawn picture is refused at load
    a.messages = turn.kept[:-1]
    saved = a.to_json()
    b = _assistant(loaded, tmp_path)
    b.from_json(saved)
    assert b._shown_images(b.messages + [{"role": "user", "content": "?", "images": []}])[-1] == [str(drawn.resolve())]
    drawn.unlink()
    with pytest.raises(EasyGenError, match="message 2"):
        b.from_json(saved)
    # trimming drops the drawing exchange and its picture together
    assert a._shown_images(a.messages[2:] + [{"role": "user", "content": "?", "images": []}]) == [[]]
