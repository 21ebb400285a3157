"""`easygen serve` end to end: a real server process on the CI demo model, driven by the official
`openai` client (and raw HTTP where the client hides what is checked): text, images in, pictures
out, streaming, batching, every error class with its status, auth, queue limits, disconnects."""
from __future__ import annotations

import base64
import concurrent.futures as futures
import io
import json
import struct
import subprocess
import sys
import time
import urllib.request
import zlib

import openai
import pytest
from PIL import Image, ImageDraw

from .serving import easygen_serve

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]
KEY = "none"  # the module's server wants no key; the queue test's server does


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def shape_image(colour: str, kind: str, size: int) -> Image.Image:
    """A filled shape on white, drawn here (not by the demo's own world code)."""
    im = Image.new("RGB", (size, size), "white")
    rgb = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}[colour]
    d, box = ImageDraw.Draw(im), (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    {"circle": d.ellipse, "square": d.rectangle}.get(kind, d.rectangle)(box, fill=rgb)
    return im


@pytest.fixture(scope="module")
def server(ci_demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    with easygen_serve(ci_demo.easygen, tmp, "--temperature", "0", "--steps", "2",
                       "--max-images", "3", "--max-body-mb", "1", "--max-image-pixels", "1000000") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, content, **kw):
    return client.chat.completions.create(model="easygen-demo", messages=[{"role": "user", "content": content}], **kw)


def post(url: str, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def png_of(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


# -- what works ---------------------------------------------------------------------------------------
def test_models_and_a_text_answer(client):
    assert [m.id for m in client.models.list().data] == ["easygen-demo"]
    r = ask(client, "What color is the shape?", max_tokens=8)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_an_image_in_is_read(client):
    parts = [{"type": "text", "text": "What is in the picture?"},
             {"type": "image_url", "image_url": {"url": data_url(shape_image("red", "circle", 96))}}]
    r = ask(client, parts)
    text = r.choices[0].message.content
    assert text and "<Img>" not in text
    assert r.usage.prompt_tokens > 16  # the image's positions are in the prompt


def test_several_images_at_several_turns(client):
    red, blue = data_url(shape_image("red", "square", 64)), data_url(shape_image("blue", "circle", 80), "JPEG")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": red}},
                                             {"type": "text", "text": "What is in the picture?"}]},
                {"role": "assistant", "content": "a red square"},
                {"role": "user", "content": [{"type": "text", "text": "And these?"},
                                             {"type": "image_url", "image_url": {"url": blue}},
                                             {"type": "image_url", "image_url": {"url": red}}]}]
    r = client.chat.completions.create(model="easygen-demo", messages=messages)
    assert r.choices[0].message.content is not None
    one = ask(client, [{"type": "image_url", "image_url": {"url": red}}, {"type": "text", "text": "And these?"}])
    assert r.usage.prompt_tokens > one.usage.prompt_tokens  # three images' positions, not one


def test_a_drawing_comes_back_as_markdown_and_images(client):
    r = ask(client, "Draw a red circle.")
    msg = r.choices[0].message
    images = msg.model_extra["images"]
    assert len(images) == 1 and images[0]["type"] == "image_url"
    url = images[0]["image_url"]["url"]
    assert png_of(url).size == (64, 64)
    assert f"]({url})" in msg.content and msg.content.count("![") == 1
    assert "<Img>" not in msg.content and "</Img>" not in msg.content
    # the drawing in the history goes back to the model as its own tag, and the picture (its data URL)
    # is shown to the model in the next turn, as `easygen chat` shows it: 16 image positions more than
    # the same history with the picture as a link, which stays text only
    def follow_up(content):
        return client.chat.completions.create(model="easygen-demo", messages=[
            {"role": "user", "content": "Draw a red circle."}, {"role": "assistant", "content": content},
            {"role": "user", "content": "What color did you make it?"}])

    with_picture = follow_up(msg.content)
    as_link = follow_up(msg.content.replace(url, "https://example.com/circle.png"))
    assert with_picture.usage.prompt_tokens < 200  # the data URL was not tokenized
    assert with_picture.usage.prompt_tokens - as_link.usage.prompt_tokens >= 16


def test_streaming_equals_the_whole_answer(client):
    for question in ("What shape is it?", "Draw a blue square."):
        whole = ask(client, question).choices[0].message
        pieces, images, reasons, usage = [], [], [], None
        for c in ask(client, question, stream=True, stream_options={"include_usage": True}):
            if c.usage:
                usage = c.usage
            for choice in c.choices:
                pieces.append(choice.delta.content or "")
                images += (choice.delta.model_extra or {}).get("images") or []
                reasons.append(choice.finish_reason)
        text = "".join(pieces)
        assert "<Img" not in text and reasons[-1] in ("stop", "length") and usage.completion_tokens > 0
        # pictures are drawn again (sampling noise differs), so compare around the data URLs
        strip = lambda s: s.split("](data:")[0]  # noqa: E731
        assert strip(text) == strip(whole.content)
        assert len(images) == len(whole.model_extra.get("images") or [])


def test_an_image_reply_can_be_forced(client):
    r = ask(client, "What shape is it?", extra_body={"modalities": ["text", "image"]})
    msg = r.choices[0].message
    assert len(msg.model_extra["images"]) == 1 and "![" in msg.content and "<Img>" not in msg.content


def test_images_api_draws_pngs(client):
    r = client.images.generate(model="easygen-demo", prompt="a green triangle", n=2, response_format="b64_json")
    assert len(r.data) == 2
    for d in r.data:
        assert Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size == (64, 64)


def test_concurrent_requests_are_batched_and_all_answered(client, server):
    questions = ["What color is the shape?"] * 6 + ["What shape is it?", "Describe the image."]
    serial = {q: ask(client, q).choices[0].message.content for q in set(questions)}
    with futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda q: ask(client, q).choices[0].message.content, questions))
    assert answers[:6] == [serial[questions[0]]] * 6  # same prompt, same greedy answer, batched or not
    assert all(a is not None for a in answers)
    assert wait_idle(server)["largest_batch"] > 1


def wait_idle(base: str, seconds: float = 10) -> dict:
    """/health once nothing runs (the engine marks itself idle just after sending its last answer)."""
    deadline = time.monotonic() + seconds
    while True:
        with urllib.request.urlopen(f"{base}/health") as r:
            health = json.loads(r.read())
        if health["running"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


# -- what is refused, and how ------------------------------------------------------------------------
def _tiny_png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (a decompression bomb's signature)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), "white").save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + raw[24:29]
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(raw)


@pytest.mark.parametrize("body, status, param, words", [
    ({"n": 2}, 400, "n", "n must be 1"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "not supported"),
    ({"logprobs": True}, 400, "logprobs", "not supported"),
    ({"frobnicate": 1}, 400, "frobnicate", "Unrecognized request argument"),
    ({"temperature": 9}, 400, "temperature", "from 0 to 2"),
    ({"max_tokens": 10**6}, 400, "max_tokens", "max_tokens must be"),
    ({"model": "gpt-4o"}, 404, "model", "does not exist"),
    ({"messages": []}, 400, "messages", "non-empty"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", "start with a user message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]}, 400, "messages",
     "last message"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "not supported"),
    ({"messages": [{"role": "user", "content": "<ImageHere> hi"}]}, 400, "messages[0].content", "image slots"),
])
def test_bad_requests_get_openai_errors(server, body, status, param, words):
    request = {"model": "easygen-demo", "messages": [{"role": "user", "content": "hi"}], **body}
    code, _, err = post(f"{server}/v1/chat/completions", request)
    assert code == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and words in err["error"]["message"]


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,not base64!!", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"\x89PNG garbage").decode(), "could not be read"),
    ("data:text/plain;base64,aGk=", "data:image/png;base64"),
    ("file:///etc/passwd", "local paths"),
    ("/etc/passwd", "local paths"),
    ("https://example.com/cat.png", "--allow-remote-images"),
    ("data:image/png;base64," + base64.b64encode(_tiny_png_claiming(20000, 20000)).decode(), "image too large"),
    ("data:image/png;base64," + base64.b64encode(b"\0" * 900_000).decode(), "image too large"),
])
def test_bad_images_are_refused_before_decoding(server, url, words):
    request = {"model": "easygen-demo", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    code, _, err = post(f"{server}/v1/chat/completions", request)
    if words == "image too large" and code == 413:  # the base64 of the second one may exceed the body limit
        return
    assert code == 400 and words in err["error"]["message"], err
    assert err["error"]["param"] == "messages[0].content[1]"


def test_too_many_images_and_too_large_a_body(server):
    image = {"type": "image_url", "image_url": {"url": data_url(shape_image("red", "circle", 32))}}
    code, _, err = post(f"{server}/v1/chat/completions", {"model": "easygen-demo", "messages": [
        {"role": "user", "content": [image, image, {"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [image, image]}]})
    assert code == 400 and err["error"]["code"] == "too_many_images"
    code, _, err = post(f"{server}/v1/chat/completions", None, raw=b"{" + b" " * (2 * 2**20) + b"}")
    assert code == 413 and err["error"]["code"] == "request_too_large"
    code, _, err = post(f"{server}/v1/chat/completions", None, raw=b"{not json")
    assert code == 400 and "not valid JSON" in err["error"]["message"]


def test_unknown_paths_are_openai_errors_and_the_server_keeps_serving(server, client):
    with pytest.raises(openai.NotFoundError):  # an unknown path: a 404 in the same error format
        openai.OpenAI(base_url=f"{server}/v2", api_key=KEY, max_retries=0).models.list()
    assert ask(client, "What color is the shape?").choices[0].message.content is not None


def test_the_readme_examples_run(server, tmp_path):
    from .test_readme import REPO, readme_block
    port = server.rsplit(":", 1)[1]
    curl = " ".join(line.rstrip("\\") for line in readme_block("readme:serve-curl")).replace("8000", port)
    r = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "data:image/png;base64," in json.loads(r.stdout)["choices"][0]["message"]["content"]
    script = "\n".join(readme_block("readme:serve-python")).replace("8000", port)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "[picture] data:image/png;base64," in r.stdout


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot(ci_demo, tmp_path):
    out = tmp_path / "drawn"
    with easygen_serve(ci_demo.easygen, tmp_path, "--temperature", "0", "--steps", "400", "--max-queue", "1",
                       "--out-dir", str(out), env={"EASYGEN_API_KEY": "env-key"}) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="env-key", max_retries=0, timeout=120)
        for key in (None, "wrong"):  # the key came from the environment
            code, headers, err = post(f"{base}/v1/chat/completions", {"model": "easygen-demo", "messages": []}, key)
            assert code == 401 and err["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()

        stream = ask(client, "Draw a green square.", stream=True)
        next(iter(stream))  # the turn is running: the queue (1) is full
        code, headers, err = post(f"{base}/v1/chat/completions",
                                  {"model": "easygen-demo", "messages": [{"role": "user", "content": "hi"}]},
                                  key="env-key")
        assert code == 429 and int(headers["retry-after"]) >= 1 and err["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            ask(client, "hi")
        stream.close()  # the client goes away while the picture is being drawn (400 steps)
        assert wait_idle(base)["running"] == 0, "the slot was not freed"
        assert not list(out.glob("*.png"))  # the drawing stopped: nothing was saved
        assert ask(client, "What color is the shape?").choices[0].message.content is not None
