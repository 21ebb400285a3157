"""The HTTP routes of ``easygen serve``: OpenAI's ``/v1/models``, ``/v1/chat/completions`` (JSON or
server-sent events) and ``/v1/images/generations``, drawn pictures under unguessable links, and the
web chat page at ``/``.

Every failure is an OpenAI-style JSON error with its status: 400 bad request (the message names the
field), 401 missing or wrong API key, 404 unknown model or path, 413 body too large, 429 queue full
(with Retry-After), 500 an engine failure (logged here; the client sees no traceback). The server
keeps serving after each.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from bidiffuser.errors import BiDiffuserError, first_line

from ..assistant import Cancelled
from ..errors import LLMEngineError
from ..image_reply import ImageTagStream
from .errors import APIError, bad_request
from .images import ImageInbox
from .openai_chat import (ChatRequest, alt_text, chunk, completion, completion_id, parse_chat_request, png_data_url,
                          reply_content, usage)
from .service import ChatJob, ChatService, DrawJob, QueueFull, with_overrides

log = logging.getLogger("easygen.serve")
IMAGE_NAME = re.compile(r"easygen-[0-9a-f]{32}\.png")
MAX_DRAWINGS = 4            # n of /v1/images/generations
DRAIN_BYTES = 16 * 2**20    # an oversized body is read up to this much before the 413 (see read_json)
MAX_IMAGE_PROMPT = 1000     # characters
KEEP_ALIVE_SECONDS = 10     # an SSE comment at least this often while the engine works
INLINE_PARSE_BYTES = 64 * 1024  # smaller requests are checked on the event loop (a thread hop costs more)


@dataclass
class ServeConfig:
    model_name: str
    inbox: ImageInbox
    api_key: str | None = None
    max_body_bytes: int = 32 * 2**20
    image_links: bool = False          # chat replies link to /images/... instead of inlining data URLs
    page: bool = True                  # the web chat page at /
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(service: ChatService, config: ServeConfig) -> FastAPI:
    app = FastAPI(title="EasyGen", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.config = service, config
    max_tokens_limit = service.loaded.model.config.max_position_embeddings // 2

    # -- errors: always OpenAI's shape, never a traceback --------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        message = "not found" if e.status_code == 404 else str(e.detail)
        return APIError(e.status_code, f"{message}: {request.method} {request.url.path}").response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return bad_request(f"invalid request: {first_line(e)}").response()

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return APIError(500, "internal server error (the server log has the details)").response()

    # -- helpers ------------------------------------------------------------------------------------
    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send Authorization: Bearer <key>", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            # Read (and drop) a moderately oversized body before answering: a client that sends it in
            # one go then gets the 413 instead of a broken pipe. Beyond DRAIN_BYTES the connection ends.
            drained = 0
            async for piece in request.stream():
                drained += len(piece)
                if drained > DRAIN_BYTES:
                    break
            raise APIError(413, f"request body too large: more than {config.max_body_bytes} bytes",
                           "request_too_large")
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > config.max_body_bytes:
                raise APIError(413, f"request body too large: more than {config.max_body_bytes} bytes",
                               "request_too_large")
        request.state.body_size = len(data)
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        return body

    def check_model(name) -> None:
        if name is not None and name != config.model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{config.model_name}`)",
                           "model_not_found", "model")

    def submit(job) -> None:
        try:
            service.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({service.max_queue} requests queued); retry in "
                                f"{e.retry_after} s", "queue_full", headers={"Retry-After": str(e.retry_after)})

    def image_url_for(request: Request, links: bool):
        base = str(request.base_url).rstrip("/")
        return (lambda p: f"{base}/images/{Path(p).name}") if links else png_data_url

    def engine_error(e: BaseException) -> APIError:
        if isinstance(e, LLMEngineError):  # vLLM down (503), failing mid-answer (502), refusing (400)
            return APIError(e.status, first_line(e), "llm_engine_unavailable" if e.status >= 500 else None)
        if isinstance(e, BiDiffuserError):
            code = "context_length_exceeded" if "too long" in str(e) else None
            return bad_request(first_line(e), "messages", code)
        log.error("engine failure: %r", e)
        return APIError(500, "the engine failed on this request (the server log has the details)")

    def channel():
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        return queue, (lambda kind, payload: loop.call_soon_threadsafe(queue.put_nowait, (kind, payload)))

    async def wait_done(request: Request, queue: asyncio.Queue, job):
        """The job's result; the job is cancelled when the client goes away first."""
        while True:
            try:
                kind, payload = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return None
                continue
            if kind == "done":
                return payload
            if kind == "error":
                raise engine_error(payload)

    # -- routes -------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        if not config.page:
            raise APIError(404, "the web page is off (--no-web-page)")
        html = resources.files("easygen.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", config.model_name)
                            .replace("{{NEEDS_KEY}}", "true" if config.api_key else "false"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, **service.status()}

    @app.get("/images/{name}")
    async def image(name: str):
        path = service.out_dir / name
        if not IMAGE_NAME.fullmatch(name) or not path.is_file():
            raise APIError(404, "no such image")
        return FileResponse(path, media_type="image/png")

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": config.created, "owned_by": "easygen"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        body = await read_json(request)
        if request.state.body_size > INLINE_PARSE_BYTES:  # decoding large images must not stall the event loop
            req: ChatRequest = await run_in_threadpool(parse_chat_request, body, config.inbox, max_tokens_limit)
        else:
            req = parse_chat_request(body, config.inbox, max_tokens_limit)
        check_model(req.model)
        if req.images or any(m["images"] for m in req.history):
            if service.features is None:
                raise bad_request("this server has no BiDiffuser model: it cannot read images", "messages")
        settings = with_overrides(service.settings, **req.overrides)
        queue, emit = channel()
        job = ChatJob(req.history, req.text, req.images, settings, emit, req.system, req.force_image)
        submit(job)
        cid, to_url = completion_id(), image_url_for(request, config.image_links)
        if not req.stream:
            reply = await wait_done(request, queue, job)
            if reply is None:  # the client left; nobody reads an answer
                return JSONResponse({}, status_code=499)
            return JSONResponse(completion(cid, config.model_name, reply, to_url))  # (no re-encoding by FastAPI)
        return StreamingResponse(_stream(job, queue, cid, req, to_url), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(job: ChatJob, queue: asyncio.Queue, cid: str, req: ChatRequest, to_url):
        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        name, tags = config.model_name, ImageTagStream()
        try:
            yield event(chunk(cid, name, {"role": "assistant", "content": ""}))
            while True:
                try:
                    kind, payload = await asyncio.wait_for(queue.get(), timeout=KEEP_ALIVE_SECONDS)
                except asyncio.TimeoutError:
                    yield ": waiting\n\n"  # a comment: keeps proxies and clients from timing out
                    continue
                if kind == "text":
                    piece = tags.feed(payload)
                    if piece:
                        yield event(chunk(cid, name, {"content": piece}))
                elif kind == "progress":
                    step, total = payload
                    yield f": drawing {step}/{total}\n\n"
                elif kind == "error":
                    if not isinstance(payload, Cancelled):
                        yield event(engine_error(payload).body())
                    return
                elif kind == "done":
                    reply = payload
                    _, images = reply_content(reply, to_url)
                    urls = [p["image_url"]["url"] for p in images]
                    rest = tags.finish(lambda d, k: f"![{alt_text(d)}]({urls[k]})" if k < len(urls) else d, reply.text)
                    delta = {"content": rest} if rest else {}
                    if images:
                        delta["images"] = images
                    if delta:
                        yield event(chunk(cid, name, delta))
                    yield event(chunk(cid, name, {}, reply.finish_reason))
                    if req.include_usage:
                        yield event(chunk(cid, name, None, usage=usage(reply)))
                    yield "data: [DONE]\n\n"
                    return
        finally:  # normal end, or the client went away (the generator is closed): free the slot now
            job.cancelled.set()

    @app.post("/v1/images/generations")
    async def images(request: Request):
        authorize(request)
        body = await read_json(request)
        allowed = {"prompt", "model", "n", "size", "response_format", "seed", "user", "quality", "style"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0],
                              "unsupported_parameter")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_IMAGE_PROMPT:
            raise bad_request(f"prompt must be a non-empty string of at most {MAX_IMAGE_PROMPT} characters",
                              "prompt")
        check_model(body.get("model"))
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DRAWINGS:
            raise bad_request(f"n must be an integer from 1 to {MAX_DRAWINGS}", "n")
        drawer = service.loaded.drawer
        if drawer is None:
            raise bad_request("this server has nothing that draws (no BiDiffuser, no --draw-with backend)", "model")
        size = f"{drawer.defaults.width}x{drawer.defaults.height}"
        if body.get("size") not in (None, "auto", size):
            raise bad_request(f"size must be {size} (what this server draws) or auto", "size")
        fmt = body.get("response_format") or "b64_json"
        if fmt not in ("b64_json", "url"):
            raise bad_request("response_format must be b64_json or url", "response_format")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise bad_request("seed must be an integer", "seed")
        queue, emit = channel()
        job = DrawJob(prompt.strip(), n, emit, seed)
        submit(job)
        paths = await wait_done(request, queue, job)
        if paths is None:
            return JSONResponse({}, status_code=499)
        to_url = image_url_for(request, links=True)
        data = [{"b64_json": base64.b64encode(Path(p).read_bytes()).decode()} if fmt == "b64_json"
                else {"url": to_url(p)} for p in paths]
        return {"created": int(time.time()), "data": [{**d, "revised_prompt": prompt.strip()} for d in data]}

    return app
