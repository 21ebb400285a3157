"""EasyGen as a FastChat model worker: the stock FastChat controller and OpenAI API server (three
real processes on free local ports) serve the CI demo model with images in and pictures out; the
worker's own routes follow FastChat's worker contract."""
from __future__ import annotations

import base64
import io
import json
import sys
import time
import urllib.request

import openai
import pytest
from PIL import Image, ImageDraw

from fastchat_ext.model_worker import PromptError, parse_prompt

from .serving import free_port, running

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]


def image_url(rgb=(40, 80, 220)) -> str:
    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill=rgb)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


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

    raw = post(f"{worker}/worker_generate_stream", {"prompt": " USER: Draw a red circle. ASSISTANT:", "temperature": 0})
    texts = [json.loads(f)["text"] for f in raw.split(b"\0") if f]
    assert any(a == b for a, b in zip(texts, texts[1:]))  # the text is re-sent while the picture is drawn
    assert "![" in texts[-1] and not any("<Img" in t for t in texts)

    deadline = time.monotonic() + 10  # the engine marks itself idle just after its last frame
    while (status := json.loads(post(f"{worker}/worker_get_status", {})))["queue_length"] and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert status["model_names"] == ["easygen-demo"] and status["queue_length"] == 0
    assert json.loads(post(f"{worker}/model_details", {}))["context_length"] == 256
    count = json.loads(post(f"{worker}/count_token", {"prompt": prompt}))["count"]
    assert count > 16  # the image mark counts as its 16 positions
    conv = json.loads(post(f"{worker}/worker_get_conv_template", {}))["conv"]
    assert conv["name"] == "easygen" and conv["roles"] == ["USER", "ASSISTANT"] and conv["sep2"] == "</s>"


def test_prompts_are_read_back_into_turns():
    system, turns = parse_prompt(" USER: $$<image>$$What is this? ASSISTANT: A red circle.</s>"
                                 "USER: $$<image>$$$$<image>$$And these? ASSISTANT:")
    assert system == ""
    assert turns == [{"role": "user", "content": "What is this?", "num_images": 1},
                     {"role": "assistant", "content": "A red circle.", "num_images": 0},
                     {"role": "user", "content": "And these?", "num_images": 2}]
    assert parse_prompt("Be brief. USER: hi ASSISTANT:")[0] == "Be brief."
    with pytest.raises(PromptError):
        parse_prompt("### Human: hi ### Assistant:")
