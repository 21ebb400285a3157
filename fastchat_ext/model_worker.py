"""A FastChat model worker whose model is EasyGen: it registers with the stock FastChat controller
(registration and heartbeats are FastChat's own ``BaseModelWorker``), and the stock
``openai_api_server`` drives it with images in and drawn pictures out.

The protocol, as FastChat's workers speak it:

- ``/worker_generate_stream``: JSON frames, each followed by a NUL byte, each carrying the
  cumulative ``text`` and ``error_code`` (0, or one of ``fastchat.constants.ErrorCode`` with the
  message in ``text``); the last also ``finish_reason`` and ``usage``. While a picture is drawn
  (longer than FastChat's stream timeout on a CPU) the current text is re-sent on every drawing
  step, which keeps the stream alive. Pictures arrive as markdown images in the text, since the
  protocol has no image field.
- ``/worker_generate`` (the same, whole), ``/worker_get_status``, ``/count_token``,
  ``/worker_get_conv_template`` (the "easygen" template), ``/model_details`` (context length).

The prompt arrives built by the API server with our template, each image a ``$$<image>$$`` mark
before its user turn's text and its URL in ``params["images"]``. The worker turns it back into
turns (``parse_prompt``) and hands them to an injected ``Engine``: this package knows the FastChat
side only, and the engine (EasyGen's chat service, given by ``easygen worker``) does the rest.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from typing import Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastchat.constants import ErrorCode
from fastchat.conversation import IMAGE_PLACEHOLDER_STR
from fastchat.serve.base_model_worker import BaseModelWorker

from .conversation import TEMPLATE_NAME, new_conversation

# emit(kind, payload), from any thread: ("text", a piece of the answer as the user reads it: image
# tags already hidden), ("progress", (step, total)) while drawing, ("done", {"text": the whole
# answer with pictures as markdown, "finish_reason", "prompt_tokens", "completion_tokens"}),
# ("error", (ErrorCode, message)).
Emit = Callable[[str, object], None]


class Engine(Protocol):
    context_length: int

    def submit(self, turns: list[dict], image_urls: list[str], params: dict, emit: Emit) -> Callable[[], None]:
        """Start answering; returns a function that cancels. ``turns``: [{"role": "user" |
        "assistant", "content": str, "num_images": int}], ending with the user's; their images are
        ``image_urls`` in order. Bad input is reported through ``emit("error", ...)``; a full queue
        may raise ``Busy``."""

    def count_tokens(self, prompt: str) -> int:
        """Prompt length in model positions (image marks count as their image positions)."""

    def queue_length(self) -> int: ...


class Busy(Exception):
    """The engine's queue is full."""


class PromptError(ValueError):
    pass


def parse_prompt(prompt: str) -> tuple[str, list[dict]]:
    """(system message, turns) of a prompt that FastChat built with the "easygen" template and that
    ends with the assistant's empty turn ("... ASSISTANT:")."""
    conv = new_conversation()
    user, assistant = (f"{r}: " for r in conv.roles)
    ask = f"{conv.sep}{conv.roles[1]}:"            # " ASSISTANT:" closes a user turn
    start = prompt.find(user)
    if start < 0 or not prompt.endswith(ask):
        raise PromptError(f"not an {TEMPLATE_NAME} prompt (expected '{user}...{ask}')")
    system = prompt[:start].removesuffix(conv.sep)
    turns, rest = [], prompt[start:]
    while rest:
        if not rest.startswith(user):
            raise PromptError(f"expected '{user}' at: {rest[:40]!r}")
        content, found, rest = rest[len(user):].partition(ask)
        if not found:
            raise PromptError("a user turn is not followed by the assistant's")
        n = content.count(IMAGE_PLACEHOLDER_STR)
        turns.append({"role": "user", "content": content.replace(IMAGE_PLACEHOLDER_STR, "").strip(), "num_images": n})
        if not rest:
            break
        answer, found, rest = rest.removeprefix(conv.sep).partition(conv.sep2)
        if not found:
            raise PromptError("an assistant turn does not end with " + conv.sep2)
        turns.append({"role": "assistant", "content": answer.strip(), "num_images": 0})
    return system, turns


class EasyGenWorker(BaseModelWorker):
    def __init__(self, engine: Engine, controller_addr: str, worker_addr: str, model_path: str, model_name: str,
                 limit_worker_concurrency: int = 8, register: bool = True):
        super().__init__(controller_addr, worker_addr, uuid.uuid4().hex[:8], model_path, [model_name],
                         limit_worker_concurrency, conv_template=TEMPLATE_NAME, multimodal=True)
        self.engine = engine
        self.context_len = engine.context_length  # (the engine's own queue bounds concurrency)
        if register:
            self.init_heart_beat()

    def get_queue_length(self) -> int:
        return self.engine.queue_length()

    def count_token(self, params: dict) -> dict:
        return {"count": self.engine.count_tokens(params.get("prompt", "")), "error_code": 0}

    def submit(self, params: dict, emit: Emit) -> Callable[[], None]:
        """Hand one request to the engine; problems come back as an "error" event."""
        try:
            system, turns = parse_prompt(params.get("prompt", ""))
            images = params.get("images") or []
            if sum(t["num_images"] for t in turns) != len(images):
                raise PromptError(f"the prompt marks {sum(t['num_images'] for t in turns)} images but "
                                  f"{len(images)} were sent")
            return self.engine.submit(turns, list(images), {**params, "system": system}, emit)
        except PromptError as e:
            emit("error", (ErrorCode.VALIDATION_TYPE_ERROR, str(e)))
        except Busy as e:
            emit("error", (ErrorCode.ENGINE_OVERLOADED, str(e) or "the worker is busy"))
        return lambda: None


def frame(text: str, error_code: int = 0, **extra) -> bytes:
    return json.dumps({"text": text, "error_code": int(error_code), **extra}).encode() + b"\0"


def create_app(worker: EasyGenWorker) -> FastAPI:
    app = FastAPI(title="EasyGen FastChat worker", docs_url=None, redoc_url=None, openapi_url=None)

    def channel():
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        return queue, (lambda kind, payload: loop.call_soon_threadsafe(queue.put_nowait, (kind, payload)))

    async def events(params: dict):
        """(kind, payload) events of one request, until "done" or "error"; cancelled if abandoned."""
        queue, emit = channel()
        cancel = worker.submit(params, emit)
        try:
            while True:
                kind, payload = await queue.get()
                yield kind, payload
                if kind in ("done", "error"):
                    return
        finally:
            cancel()  # finished, or the API server went away: the engine stops working on it

    def final(payload: dict) -> dict:
        usage = {"prompt_tokens": payload["prompt_tokens"], "completion_tokens": payload["completion_tokens"],
                 "total_tokens": payload["prompt_tokens"] + payload["completion_tokens"]}
        return {"finish_reason": payload["finish_reason"], "usage": usage}

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request):
        params = await request.json()

        async def stream():
            text = ""
            async for kind, payload in events(params):
                if kind == "text":
                    text += payload
                    yield frame(text)
                elif kind == "progress":
                    yield frame(text)  # keep-alive: the API server waits at most its timeout per chunk
                elif kind == "done":
                    yield frame(payload["text"], **final(payload))
                else:
                    code, message = payload
                    yield frame(message, code)

        return StreamingResponse(stream())

    @app.post("/worker_generate")
    async def generate(request: Request):
        params = await request.json()
        async for kind, payload in events(params):
            if kind == "done":
                return {"text": payload["text"], "error_code": 0, **final(payload)}
            if kind == "error":
                code, message = payload
                return {"text": message, "error_code": int(code)}

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
