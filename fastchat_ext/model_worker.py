"""A FastChat model worker whose model is EasyGen: it registers with the stock FastChat controller
(registration and heartbeats are FastChat's own ``BaseModelWorker``), and the stock
``openai_api_server`` drives it with images in and drawn pictures out.

The protocol, as FastChat's workers speak it:

- ``/worker_generate_stream``: JSON frames, each followed by a NUL byte, each carrying the
  cumulative ``text`` and ``error_code`` (0, or one of ``fastchat.constants.ErrorCode`` with the
  message in ``text``); the last also ``finish_reason`` and ``usage``. While a picture is drawn
  (longer than FastChat's stream timeout on a CPU) the current text is re-sent on every drawing
  step, which keeps the stream alive. Pictures arrive as markdown images in the text, since the
  protocol has no image field; a raw ``<Img>`` tag never appears in a frame.
- ``/worker_generate`` (the same, whole), ``/worker_get_status``, ``/count_token``,
  ``/worker_get_conv_template`` (the "easygen" template), ``/model_details`` (context length).

The prompt arrives built by the API server with our template, each image a ``$$<image>$$`` mark
before its user turn's text and its URL in ``params["images"]``. The worker turns it back into
turns (``parse_prompt``; a picture the model drew earlier, which went out as a markdown image, is
its ``<Img>description</Img>`` again, and its data URL is handed on, so the model sees the picture
in the next turn as ``easygen serve`` shows it) and hands them to an injected ``Engine``: this
package knows the FastChat side only, and the engine (EasyGen's chat service, given by ``easygen
worker``) does the rest. A client that goes away cancels its request.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import uuid
from contextlib import aclosing
from typing import Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastchat.constants import ErrorCode
from fastchat.conversation import IMAGE_PLACEHOLDER_STR
from fastchat.serve.base_model_worker import BaseModelWorker

from .conversation import TEMPLATE_NAME, new_conversation, read_back_pictures

log = logging.getLogger("fastchat_ext.model_worker")

# emit(kind, payload), from any thread: ("text", a piece of the answer as the user reads it: image
# tags already hidden), ("progress", (step, total)) while drawing, ("done", {"text": the whole
# answer with pictures as markdown, "finish_reason", "prompt_tokens", "completion_tokens"}),
# ("error", (ErrorCode, message)). The "text" pieces joined (leading whitespace aside) begin the
# "done" text: the API server streams the difference between successive cumulative texts.
Emit = Callable[[str, object], None]

_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


class Engine(Protocol):
    context_length: int

    def submit(self, turns: list[dict], image_urls: list[str], params: dict, emit: Emit) -> Callable[[], None]:
        """Start answering; returns a function that cancels. ``turns``: [{"role": "user" |
        "assistant", "content": str, "num_images": int}], ending with the user's; earlier pictures
        in assistant turns are ``<Img>description</Img>`` and their data URLs (what this worker
        sent, back from the client, unchecked) are the turn's ``"drawn"`` list; the user turns'
        images are ``image_urls`` in order (data: or http(s) URLs, as the client sent them). ``params``:
        FastChat's generation parameters (temperature, top_p, max_new_tokens, stop, ...) and
        "system", the system message. Bad input is reported through ``emit("error", ...)``; a full
        queue may raise ``Busy``."""

    def count_tokens(self, prompt: str) -> int:
        """Prompt length in model positions (image marks count as their image positions)."""

    def queue_length(self) -> int:
        """Requests waiting or running in the engine."""


class Busy(Exception):
    """The engine's queue is full."""


class PromptError(ValueError):
    pass


def parse_prompt(prompt: str) -> tuple[str, list[dict]]:
    """(system message, turns) of a prompt that FastChat built with the "easygen" template and that
    ends with the assistant's empty turn ("... ASSISTANT:"). Markdown images in assistant turns
    become ``<Img>description</Img>`` again, their data URLs the turn's ``"drawn"`` pictures.

    The template has no escaping, so the exchanges are split where "USER: " follows "</s>" (or an
    empty answer's bare "ASSISTANT:"), and the last user turn is everything up to the final
    " ASSISTANT:": the question being asked is read exactly even if it quotes the role names."""
    conv = new_conversation()
    user = f"{conv.roles[0]}: "
    ask = f"{conv.sep}{conv.roles[1]}:"            # " ASSISTANT:" closes a user turn
    start = prompt.find(user)
    if start < 0 or not prompt.endswith(ask):
        raise PromptError(f"the worker answers chat prompts only (/v1/chat/completions): not an {TEMPLATE_NAME} "
                          f"prompt (expected '{user}...{ask}')")
    system = prompt[:start].removesuffix(conv.sep)
    boundary = f"(?:(?<={re.escape(conv.sep2)})|(?<={re.escape(ask)}))(?={re.escape(user)})"
    exchanges = re.split(boundary, prompt[start:])
    turns = []

    def add_user(content: str) -> None:
        n = content.count(IMAGE_PLACEHOLDER_STR)
        turns.append({"role": "user", "content": content.replace(IMAGE_PLACEHOLDER_STR, "").strip(), "num_images": n})

    for k, chunk in enumerate(exchanges):
        body = chunk[len(user):]
        if k == len(exchanges) - 1 or chunk.endswith(ask):  # the question, or one with an empty answer
            if not chunk.endswith(ask):
                raise PromptError("a user turn is not followed by the assistant's")
            add_user(body[:-len(ask)])
            answer = None if k == len(exchanges) - 1 else ""
        else:
            content, found, answer = body.removesuffix(conv.sep2).partition(f"{ask}{conv.sep}")
            if not found:
                raise PromptError(f"a user turn is not followed by the assistant's: {chunk[:60]!r}")
            add_user(content)
        if answer is not None:
            content, drawn = read_back_pictures(answer.strip())
            turns.append({"role": "assistant", "content": content, "num_images": 0, "drawn": drawn})
    return system, turns


def build_prompt(system: str, turns: list[dict]) -> str:
    """The prompt FastChat writes for these turns (``parse_prompt``'s inverse, pictures as tags)."""
    conv = new_conversation()
    conv.set_system_message(system)
    for t in turns:
        if t["role"] == "user":
            conv.append_message(conv.roles[0], (t["content"], [None] * t["num_images"]))
        else:
            conv.append_message(conv.roles[1], t["content"])
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def image_url(ref) -> str:
    """An image as FastChat passes it, as a URL: fschat 0.2.36 passes the client's URL as is
    (data: or http(s)); later FastChat versions pass the bare base64 of a data URL."""
    if not isinstance(ref, str) or not ref:
        raise PromptError("each image must be a non-empty string (a data: URL or base64)")
    if ref.startswith(("data:", "http://", "https://")) or not _BASE64.fullmatch(ref):
        return ref  # (anything else is the engine's to refuse, with its own message)
    return "data:image/png;base64," + ref  # the label does not matter: the bytes say what they are


class EasyGenWorker(BaseModelWorker):
    """FastChat's worker with an EasyGen engine. ``limit_worker_concurrency`` requests are handed
    to the engine at once (the engine queues and batches them); more wait here, as in FastChat's
    workers, and count in the queue length the controller balances by."""

    def __init__(self, engine: Engine, controller_addr: str, worker_addr: str, model_path: str, model_name: str,
                 limit_worker_concurrency: int = 64, register: bool = True):
        super().__init__(controller_addr, worker_addr, uuid.uuid4().hex[:8], model_path, [model_name],
                         limit_worker_concurrency, conv_template=TEMPLATE_NAME, multimodal=True)
        self.engine = engine
        self.context_len = engine.context_length
        self.semaphore = asyncio.Semaphore(limit_worker_concurrency)
        self.waiting = 0  # requests waiting for the semaphore
        if register:
            self.init_heart_beat()

    def get_queue_length(self) -> int:
        return self.engine.queue_length() + self.waiting

    def count_token(self, params: dict) -> dict:
        prompt = params.get("prompt", "")
        try:  # a picture drawn earlier counts as its description plus, in the next user turn, its image
            system, turns = parse_prompt(prompt)
            drawn = 0
            for t in turns:
                if t["role"] == "user":
                    t["num_images"], drawn = t["num_images"] + drawn, 0
                else:
                    drawn = len(t["drawn"])
            prompt = build_prompt(system, turns)
        except PromptError:
            pass
        return {"count": self.engine.count_tokens(prompt), "error_code": 0}

    def submit(self, params: dict, emit: Emit) -> Callable[[], None]:
        """Hand one request to the engine; problems come back as an "error" event."""
        try:
            system, turns = parse_prompt(params.get("prompt", ""))
            images = params.get("images") or []
            if not isinstance(images, list):
                raise PromptError("images must be a list")
            if sum(t["num_images"] for t in turns) != len(images):
                raise PromptError(f"the prompt marks {sum(t['num_images'] for t in turns)} images but "
                                  f"{len(images)} were sent")
            return self.engine.submit(turns, [image_url(i) for i in images], {**params, "system": system}, emit)
        except PromptError as e:
            emit("error", (ErrorCode.VALIDATION_TYPE_ERROR, str(e)))
        except Busy as e:
            emit("error", (ErrorCode.ENGINE_OVERLOADED, str(e) or "the worker is busy"))
        except Exception:
            log.exception("submit failed")
            emit("error", (ErrorCode.INTERNAL_ERROR, "the worker failed on this request (see its log)"))
        return lambda: None


def frame(text: str, error_code: int = 0, **extra) -> bytes:
    return json.dumps({"text": text, "error_code": int(error_code), **extra}).encode() + b"\0"


def create_app(worker: EasyGenWorker) -> FastAPI:
    app = FastAPI(title="EasyGen FastChat worker", docs_url=None, redoc_url=None, openapi_url=None)

    async def events(params: dict, request: Request | None = None):
        """(kind, payload) events of one request, until "done" or "error". Abandoned (the stream's
        client went away, or ``request`` reports a disconnect), the engine stops working on it."""
        worker.waiting += 1
        try:
            await worker.semaphore.acquire()
        finally:
            worker.waiting -= 1
        try:
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            watch = None if request is None else asyncio.create_task(watch_disconnect(request, queue))
            cancel = worker.submit(params, lambda kind, payload: loop.call_soon_threadsafe(
                queue.put_nowait, (kind, payload)))
            try:
                while True:
                    kind, payload = await queue.get()
                    if kind == "gone":
                        return
                    yield kind, payload
                    if kind in ("done", "error"):
                        return
            finally:
                cancel()  # finished, or abandoned
                if watch is not None:
                    watch.cancel()
        finally:
            worker.semaphore.release()

    async def watch_disconnect(request: Request, queue: asyncio.Queue) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        queue.put_nowait(("gone", None))

    def final(payload: dict) -> dict:
        usage = {"prompt_tokens": payload["prompt_tokens"], "completion_tokens": payload["completion_tokens"],
                 "total_tokens": payload["prompt_tokens"] + payload["completion_tokens"]}
        return {"finish_reason": payload["finish_reason"], "usage": usage}

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request):
        params = await request.json()

        async def stream():
            text = ""
            async with aclosing(events(params)) as replies:
                async for kind, payload in replies:
                    if kind == "text":
                        text = (text + payload).lstrip()  # (the final answer is stripped)
                        yield frame(text)
                    elif kind == "progress":
                        yield frame(text)  # keep-alive: the API server waits at most its timeout per chunk
                    elif kind == "done":
                        if not payload["text"].startswith(text):
                            log.warning("the final answer does not continue the streamed text")
                        yield frame(payload["text"], **final(payload))
                    else:
                        code, message = payload
                        yield frame(message, code)

        return StreamingResponse(stream())

    @app.post("/worker_generate")
    async def generate(request: Request):
        params = await request.json()
        async with aclosing(events(params, request)) as replies:
            async for kind, payload in replies:
                if kind == "done":
                    return {"text": payload["text"], "error_code": 0, **final(payload)}
                if kind == "error":
                    code, message = payload
                    return {"text": message, "error_code": int(code)}
        return {"text": "the client went away", "error_code": int(ErrorCode.INTERNAL_ERROR)}

    @app.post("/worker_get_status")
    async def status():
        return worker.get_status()

    @app.post("/count_token")
    async def count_token(request: Request):
        return worker.count_token(await request.json())

    @app.post("/worker_get_conv_template")
    async def conv_template():
        return JSONResponse({"conv": dataclasses.asdict(worker.conv)})  # every field the API server reads

    @app.post("/model_details")
    async def model_details():
        return {"context_length": worker.context_len}

    return app
