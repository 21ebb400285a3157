"""``easygen worker``: EasyGen as a FastChat model worker. It registers with a running
``python -m fastchat.serve.controller`` (with heartbeats), and FastChat's own
``python -m fastchat.serve.openai_api_server`` then serves it, images in and pictures out. The
protocol side is ``fastchat_ext.model_worker``; the engine is the same chat service as
``easygen serve``'s."""
from __future__ import annotations

import argparse
import signal
import tempfile
from pathlib import Path

from bidiffuser.cliutil import positive_int

from .engine_args import add_engine_args, add_llm_engine_args, quiet_libraries, resolve_model
from .serve import add_server_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("worker", help="run EasyGen as a FastChat model worker",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, max_new_tokens_help="default longest reply in tokens")
    add_server_args(p, default_port=21002, http_api=False)
    add_llm_engine_args(p)
    g = p.add_argument_group("FastChat")
    g.add_argument("--controller-address", default="http://127.0.0.1:21001", help="the FastChat controller")
    g.add_argument("--worker-address", default=None,
                   help="the address the controller and API server reach this worker at (default http://HOST:PORT)")
    g.add_argument("--limit-worker-concurrency", type=positive_int, default=None, metavar="N",
                   help="requests handed to the engine at once; more wait in the worker and count in the queue "
                        "length the controller balances by (default: --max-queue, so only the engine's queue limits)")
    g.add_argument("--no-register", dest="register", action="store_false",
                   help="do not register with the controller (to call the worker routes directly)")
    return p


def run(args) -> int:
    import uvicorn

    from fastchat_ext.model_worker import EasyGenWorker, create_app

    from ..serve.fastchat_engine import ServiceEngine
    from ..serve.images import ImageInbox
    from .serve import build_service, exit_on_sigterm, image_limits, model_name

    resolve_model(args)
    with tempfile.TemporaryDirectory(prefix="easygen-worker-") as tmp, quiet_libraries():
        service = build_service(args, Path(tmp) / "images").start()
        engine = ServiceEngine(service, ImageInbox(Path(tmp) / "uploads", image_limits(args)))
        address = args.worker_address or f"http://{args.host}:{args.port}"
        name = model_name(args)
        worker = EasyGenWorker(engine, args.controller_address, address, str(args.model_path), name,
                               limit_worker_concurrency=args.limit_worker_concurrency or args.max_queue,
                               register=args.register)
        print(f"easygen worker: {name} at {address}"
              f"{f', registered with {args.controller_address}' if args.register else ''}", flush=True)
        signal.signal(signal.SIGTERM, exit_on_sigterm)
        try:
            uvicorn.run(create_app(worker), host=args.host, port=args.port, log_level="warning",
                        timeout_graceful_shutdown=5)
        finally:
            service.stop()
    return 0
