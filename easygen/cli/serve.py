"""``easygen serve``: EasyGen behind an OpenAI-compatible HTTP API, with a web chat page at ``/``.

One process: the model loads once through the one builder, one engine thread answers the queue
(batching waiting turns), uvicorn serves the routes of ``easygen.serve.app``. It listens on
127.0.0.1 unless ``--host`` says otherwise.
"""
from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from bidiffuser.cliutil import positive_int

from .engine_args import add_engine_args, add_llm_engine_args, load_engine, quiet_libraries, resolve_model

API_KEY_ENV = "EASYGEN_API_KEY"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible API and a web chat page",
        description="Serve EasyGen over HTTP: GET /v1/models, POST /v1/chat/completions (streaming too; images in\n"
                    "as image_url parts, pictures out as markdown plus an `images` list), POST\n"
                    "/v1/images/generations, and a web chat page at /.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, max_new_tokens_help="default longest reply in tokens, when a request gives no max_tokens")
    add_server_args(p)
    add_llm_engine_args(p)
    g = p.add_argument_group("replies")
    g.add_argument("--out-dir", type=Path, default=None, metavar="DIR",
                   help="where drawn pictures are kept (default: a temporary folder removed at exit)")
    g.add_argument("--image-links", action="store_true",
                   help="chat replies link to pictures served under /images/<unguessable name>.png instead of "
                        "carrying them inline as data: URLs")
    g.add_argument("--no-web-page", dest="web_page", action="store_false", help="do not serve the chat page at /")
    return p


def add_server_args(p: argparse.ArgumentParser, default_port: int = 8000, http_api: bool = True) -> None:
    """Listening, limits and (for the HTTP API) access: shared with ``easygen worker``."""
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    g.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port})")
    g.add_argument("--model-name", default=None,
                   help="the model id clients ask for (default: easygen-demo for the demo, else the directory name)")
    if http_api:
        g.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 routes "
                       f"(default: ${API_KEY_ENV} if set, else none)")
        g.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    g.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting or running before new ones are refused (default 64)")
    g.add_argument("--max-batch-size", type=positive_int, default=None,
                   help="chat turns answered together in one generate call (default 8); with --llm-engine vllm, "
                        "turns in flight to vLLM at once, which batches them itself (default 32)")
    g.add_argument("--max-image-mb", type=float, default=10.0, help="largest image in MiB (default 10)")
    g.add_argument("--max-image-pixels", type=positive_int, default=4096 * 4096,
                   help="largest image in pixels, checked before decoding (default 16777216 = 4096x4096)")
    g.add_argument("--max-images", type=positive_int, default=8, help="images per request (default 8)")
    g.add_argument("--allow-remote-images", action="store_true",
                   help="also accept http(s) image URLs, downloaded within the size limit and a 10 s timeout")


def model_name(args) -> str:
    from ..demo.recipe import recipe_of
    if args.model_name:
        return args.model_name
    return "easygen-demo" if recipe_of(args.model_path) is not None else Path(args.model_path).resolve().name


def build_service(args, out_dir: Path):
    """The engine and its queue, from the parsed flags."""
    from ..serve.service import ChatService

    loaded, features, settings = load_engine(args)
    in_flight = args.max_batch_size or (32 if loaded.llm.concurrent else 8)
    return ChatService(loaded, features, out_dir, settings, max_queue=args.max_queue, max_batch=in_flight)


def image_limits(args):
    from ..serve.images import ImageLimits
    return ImageLimits(max_bytes=int(args.max_image_mb * 2**20), max_pixels=args.max_image_pixels,
                       max_images=args.max_images, allow_remote=args.allow_remote_images)


def run(args) -> int:
    import tempfile

    import uvicorn

    from ..serve.app import ServeConfig, create_app
    from ..serve.images import ImageInbox

    resolve_model(args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    with tempfile.TemporaryDirectory(prefix="easygen-serve-") as tmp, quiet_libraries():
        out_dir = (args.out_dir or Path(tmp) / "images").resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        service = build_service(args, out_dir).start()
        config = ServeConfig(model_name=model_name(args), inbox=ImageInbox(Path(tmp) / "uploads", image_limits(args)),
                             api_key=api_key, max_body_bytes=int(args.max_body_mb * 2**20),
                             image_links=args.image_links, page=args.web_page)
        app = create_app(service, config)
        print(f"easygen serve: {config.model_name} ({args.model_path}) on http://{args.host}:{args.port}"
              f"{'' if api_key is None else ' (API key required)'}", flush=True)
        # uvicorn re-raises the SIGTERM it caught once it has shut down; turned into SystemExit, it
        # still ends the process with status 0, after the engine stops and the temporary folder goes.
        signal.signal(signal.SIGTERM, exit_on_sigterm)
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
        finally:
            service.stop()
    return 0


def exit_on_sigterm(signum, frame):
    raise SystemExit(0)
