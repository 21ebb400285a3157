"""EasyGen as a FastChat model worker: the stock FastChat controller and OpenAI API server (three
real processes on free local ports) serve the CI demo model with images in and pictures out; the
worker's own routes follow FastChat's worker contract."""
from __future__ import annotations

import base64
import http.client
import io
import json
import sys
import threading
import time
import urllib.request

import openai
import pytest
from PIL import Image, ImageDraw

from easygen.demo.recipe import RECIPES
from fastchat_ext.model_worker import PromptError, build_prompt, image_url as worker_image, parse_prompt

from .serving import free_port, running

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]


def image_url(rgb=(40, 80, 220), fmt="PNG") -> str:
    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill=rgb)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def post(url: str, body: dict) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


@pytest.fixture(scope="module")
def stack(ci_demo, tmp_path_factory):
    """controller + our worker + an OpenAI API server (the stock one, and the stock one with the
    streaming fix): yields (worker URL, stock API URL, fixed API URL)."""
    tmp = tmp_path_factory.mktemp("fastchat")
    ctl, wk, api, api_fixed = (free_port() for _ in range(4))
    controller = f"http://127.0.0.1:{ctl}"
    py = sys.executable
    with running([py, "-m", "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(ctl)],
                 f"{controller}/test_connection", tmp / "controller.log", cwd=tmp), \
         running([py, "-m", "easygen.cli", "worker", "--model-path", str(ci_demo.easygen), "--port", str(wk),
                  "--controller-address", controller, "--temperature", "0", "--steps", "2",
                  "--feature-cache", str(tmp / "features")], f"http://127.0.0.1:{wk}/", tmp / "worker.log", cwd=tmp), \
         running([py, "-m", "fastchat.serve.openai_api_server", "--host", "127.0.0.1", "--port", str(api),
                  "--controller-address", controller], f"http://127.0.0.1:{api}/v1/models", tmp / "api.log", cwd=tmp), \
         running([py, "-m", "fastchat_ext.openai_api_server", "--host", "127.0.0.1", "--port", str(api_fixed),
                  "--controller-address", controller], f"http://127.0.0.1:{api_fixed}/v1/models",
                 tmp / "api-fixed.log", cwd=tmp):
        yield f"http://127.0.0.1:{wk}", f"http://127.0.0.1:{api}/v1", f"http://127.0.0.1:{api_fixed}/v1"


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=60)


def test_the_stock_api_server_serves_text_images_and_drawings(stack):
    _, api, _ = stack
    c = client(api)
    assert [m.id for m in c.models.list().data] == ["easygen-demo"]  # registered with the controller
    text = c.chat.completions.create(model="easygen-demo", temperature=0,
                                     messages=[{"role": "user", "content": "What shape is it?"}])
    one = c.chat.completions.create(model="easygen-demo", temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url()}}, {"type": "text", "text": "What is in the picture?"}]}])
    two = c.chat.completions.create(model="easygen-demo", temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url()}},
        {"type": "image_url", "image_url": {"url": image_url((220, 40, 40))}},
        {"type": "text", "text": "What is in the picture?"}]}])
    positions = 16  # the CI demo's image positions
    assert one.usage.prompt_tokens - text.usage.prompt_tokens >= positions
    assert two.usage.prompt_tokens - one.usage.prompt_tokens >= positions  # (and its <Img> marks)
    assert one.choices[0].message.content and two.choices[0].message.content

    drawn = c.chat.completions.create(model="easygen-demo", temperature=0,
                                      messages=[{"role": "user", "content": "Draw a red circle."}])
    content = drawn.choices[0].message.content
    assert "<Img>" not in content and "</Img>" not in content
    url = content.split("](", 1)[1].split(")", 1)[0]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (64, 64)

    # a later turn: the picture (kilobytes of data URL) comes back in the history; the worker reads
    # it as the model's <Img>description</Img> again, for the length check too
    later = c.chat.completions.create(model="easygen-demo", temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url()}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": content},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url((220, 40, 40))}},
                                     {"type": "image_url", "image_url": {"url": image_url((40, 220, 40))}},
                                     {"type": "text", "text": "And these?"}]}])
    assert later.choices[0].message.content and 3 * positions < later.usage.prompt_tokens < 256


def test_streaming_breaks_in_the_stock_server_and_works_with_the_fix(stack):
    _, api, fixed = stack
    request = dict(model="easygen-demo", temperature=0, stream=True,
                   messages=[{"role": "user", "content": "Draw a blue square."}])
    with pytest.raises(openai.APIConnectionError):  # fschat 0.2.36 under pydantic 2: see fastchat_ext/openai_api_server.py
        list(client(api).chat.completions.create(**request))
    chunks = list(client(fixed).chat.completions.create(**request))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    whole = client(fixed).chat.completions.create(**{**request, "stream": False}).choices[0].message.content
    assert "<Img>" not in text and text.split("](data:")[0] == whole.split("](data:")[0]
    assert "](data:image/png;base64," in text and len(chunks) > 3


def test_worker_routes_follow_the_fastchat_contract(stack):
    worker, _, _ = stack
    prompt = " USER: $$<image>$$What is in the picture? ASSISTANT:"
    raw = post(f"{worker}/worker_generate_stream", {"prompt": prompt, "images": [image_url()], "temperature": 0,
                                                    "max_new_tokens": 16})
    assert raw.endswith(b"\0")
    frames = [json.loads(f) for f in raw.split(b"\0") if f]
    texts = [f["text"] for f in frames]
    assert all(f["error_code"] == 0 for f in frames) and texts[-1]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
    assert frames[-1]["finish_reason"] in ("stop", "length") and frames[-1]["usage"]["prompt_tokens"] > 16

    whole = json.loads(post(f"{worker}/worker_generate", {"prompt": prompt, "images": [image_url()],
                                                           "temperature": 0, "max_new_tokens": 16}))
    assert whole["error_code"] == 0 and whole["text"] == texts[-1]
    bad = json.loads(post(f"{worker}/worker_generate", {"prompt": prompt, "images": []}))
    assert bad["error_code"] == 40001 and "marks 1 images but 0" in bad["text"]
    junk = json.loads(post(f"{worker}/worker_generate", {"prompt": prompt, "images": ["data:image/png;base64,AAAA"]}))
    assert junk["error_code"] == 40001 and "could not be read" in junk["text"]
    bare = image_url(fmt="JPEG").split(",", 1)[1]  # newer FastChat sends the base64 alone ("/9j/..." for a JPEG)
    ok = json.loads(post(f"{worker}/worker_generate", {"prompt": prompt, "images": [bare], "temperature": 0,
                                                        "max_new_tokens": 4}))
    assert ok["error_code"] == 0 and ok["text"]

    raw = post(f"{worker}/worker_generate_stream", {"prompt": " USER: Draw a red circle. ASSISTANT:", "temperature": 0})
    texts = [json.loads(f)["text"] for f in raw.split(b"\0") if f]
    assert any(a == b for a, b in zip(texts, texts[1:]))  # the text is re-sent while the picture is drawn
    assert "![" in texts[-1] and not any("<Img" in t for t in texts)

    deadline = time.monotonic() + 10  # the engine marks itself idle just after its last frame
    while (status := json.loads(post(f"{worker}/worker_get_status", {})))["queue_length"] and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert status["model_names"] == ["easygen-demo"] and status["queue_length"] == 0
    assert json.loads(post(f"{worker}/model_details", {}))["context_length"] == RECIPES["ci"].llm_context
    count = json.loads(post(f"{worker}/count_token", {"prompt": prompt}))["count"]
    assert count > 16  # the image mark counts as its 16 positions
    conv = json.loads(post(f"{worker}/worker_get_conv_template", {}))["conv"]
    assert conv["name"] == "easygen" and conv["roles"] == ["USER", "ASSISTANT"] and conv["sep2"] == "</s>"


def test_prompts_are_read_back_into_turns():
    system, turns = parse_prompt(" USER: $$<image>$$What is this? ASSISTANT: A red circle.</s>"
                                 "USER: $$<image>$$$$<image>$$And these? ASSISTANT:")
    assert system == ""
    assert turns == [{"role": "user", "content": "What is this?", "num_images": 1},
                     {"role": "assistant", "content": "A red circle.", "num_images": 0, "drawn": []},
                     {"role": "user", "content": "And these?", "num_images": 2}]
    assert parse_prompt("Be brief. USER: hi ASSISTANT:")[0] == "Be brief."
    with pytest.raises(PromptError):
        parse_prompt("### Human: hi ### Assistant:")
    # an empty assistant message (FastChat writes "ASSISTANT:" alone); a drawn picture, back as its tag
    assert parse_prompt(" USER: hi ASSISTANT:USER: again ASSISTANT:")[1][1] == \
        {"role": "assistant", "content": "", "num_images": 0, "drawn": []}
    drawn = parse_prompt(" USER: Draw. ASSISTANT: Here: ![a red circle](data:image/png;base64,iVBO+/=) and "
                         "![a link](https://example.com/a.png)</s>USER: Thanks. ASSISTANT:")[1][1]
    assert drawn["content"] == "Here: <Img>a red circle</Img> and <Img>a link</Img>"
    assert drawn["drawn"] == ["data:image/png;base64,iVBO+/="]  # the picture it drew; a link is never fetched
    prompt = (" USER: $$<image>$$What is this? ASSISTANT: A red circle.</s>"
              "USER: $$<image>$$$$<image>$$And these? ASSISTANT:")
    assert build_prompt(*parse_prompt(prompt)) == prompt
    # the question is read exactly, even when it quotes the role names
    assert parse_prompt(" USER: Say ASSISTANT: hi. USER: ok? ASSISTANT:")[1] == \
        [{"role": "user", "content": "Say ASSISTANT: hi. USER: ok?", "num_images": 0}]
    assert parse_prompt(" USER: a ASSISTANT: b</s>USER: c ASSISTANT: d</s>USER: e ASSISTANT:")[1][3]["content"] == "d"
    for broken in ("USER: hi", " USER: a ASSISTANT: b</s>", " USER: a</s>USER: b ASSISTANT:"):
        with pytest.raises(PromptError):
            parse_prompt(broken)


def test_images_are_passed_on_as_urls():
    url = image_url(fmt="JPEG")
    assert worker_image(url) == url
    assert worker_image(url.split(",", 1)[1]) == "data:image/png;base64," + url.split(",", 1)[1]
    assert worker_image("https://example.com/a.png") == "https://example.com/a.png"
    assert worker_image("file:///etc/passwd") == "file:///etc/passwd"  # (refused by the engine)
    with pytest.raises(PromptError):
        worker_image(None)


class SlowEngine:
    """Answers " Hello" and then draws until cancelled."""
    context_length = 64

    def __init__(self):
        self.cancels = []

    def submit(self, turns, image_urls, params, emit):
        cancelled = threading.Event()
        self.cancels.append(cancelled)

        def run():
            emit("text", " Hello")
            step = 0
            while not cancelled.wait(0.05):
                emit("progress", (step, 1000))
                step += 1

        threading.Thread(target=run, daemon=True).start()
        return cancelled.set

    def count_tokens(self, prompt):
        return len(prompt)

    def queue_length(self):
        return sum(not c.is_set() for c in self.cancels)


@pytest.fixture
def slow_worker(monkeypatch):
    """The worker app on an engine that never finishes, served in this process."""
    import logging

    import uvicorn
    from fastchat.serve import base_model_worker

    from fastchat_ext.model_worker import EasyGenWorker, create_app

    # (FastChat's first worker would otherwise send this process's stdout and stderr to its log file)
    monkeypatch.setattr(base_model_worker, "logger", logging.getLogger("test_fastchat_worker"))
    monkeypatch.setattr(base_model_worker, "worker", None)
    engine = SlowEngine()
    worker = EasyGenWorker(engine, "http://127.0.0.1:1", "http://127.0.0.1:2", "m", "m",
                           limit_worker_concurrency=1, register=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(worker), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield port, engine
    server.should_exit = True
    thread.join(10)


def open_stream(port: int, body: dict) -> http.client.HTTPResponse:
    """A streaming request; closing the response closes the connection (nothing else holds it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/worker_generate_stream", json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def test_a_client_that_goes_away_cancels_its_request(slow_worker):
    port, engine = slow_worker
    body = {"prompt": " USER: hi ASSISTANT:"}
    first = open_stream(port, body)
    frames = first.read(200).split(b"\0")
    assert json.loads(frames[0]) == {"text": "Hello", "error_code": 0}  # (the answer's leading space dropped)
    assert json.loads(frames[1])["text"] == "Hello"                      # re-sent while drawing

    # limit_worker_concurrency=1: a second request waits in the worker and counts in the queue length
    second = []
    threading.Thread(target=lambda: second.append(open_stream(port, body)), daemon=True).start()
    deadline = time.monotonic() + 5
    while json.loads(post(f"http://127.0.0.1:{port}/worker_get_status", {}))["queue_length"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(engine.cancels) == 1

    first.close()  # the client goes away
    assert engine.cancels[0].wait(5)
    while not second:  # the waiting request gets its turn
        assert time.monotonic() < deadline + 5
        time.sleep(0.05)
    assert json.loads(second[0].read(100).split(b"\0")[0])["text"] == "Hello"
    second[0].close()
    assert engine.cancels[1].wait(5)

    # the non-streaming route notices a client that gave up waiting
    with pytest.raises(OSError):  # (socket.timeout)
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/worker_generate",
                                                      data=json.dumps(body).encode()), timeout=0.3)
    assert len(engine.cancels) == 3 and engine.cancels[2].wait(5)
