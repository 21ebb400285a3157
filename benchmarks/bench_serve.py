"""`easygen serve` under load, with each LLM engine side by side: the in-process transformers engine
and vLLM (`--llm-engine vllm`: a vLLM server that the command starts, in vLLM's own environment).
The same server front, the same requests (image questions and drawings mixed), at several
concurrencies: requests/s, completion tokens/s, p50/p95 latency, time to the first streamed piece,
errors, and the peak resident memory of everything serving (the easygen process and, for vLLM,
its server processes); then the easygen process's memory before and after many more requests.

The server is a real `easygen serve` process on 127.0.0.1; the clients are threads using the
official `openai` client, streaming, each sending a question about an image (a data: URL, one of a
few shapes, so image features come from the feature cache after warm-up) or, every `--draw-every`
th request, a drawing request. Client, server and vLLM share this machine, so the figures are for
the whole system on it.

By default the model has the shapes demo's full architecture (U-ViT 128x6, LLM 128x4) but only
a few training steps (the `ci` recipe's step counts): the per-token and per-request costs are the
demo's, and it answers as briefly as the demo does. `--model-path` serves any other model (the
shipped demo: `easygen/demo/model/easygen`). `--max-tokens` caps answers; `--random-llm`
serves the same architecture with an untrained LLM, which never ends its answers early, so every
answer is `--max-tokens` long (long answers: what a real model writes).

    python benchmarks/bench_serve.py                                   # both engines, concurrency 1 4 8 16 32
    python benchmarks/bench_serve.py --random-llm --max-tokens 128 --draw-every 0
    python benchmarks/bench_serve.py --engines transformers --memory-requests 500 --json out.json
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures as futures
import dataclasses
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout; tests.serving starts and stops the server

import openai  # noqa: E402
import psutil  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from common import machine_info, report  # noqa: E402
from tests.serving import easygen_serve  # noqa: E402

QUESTIONS = ("What color is the shape?", "What shape is it?", "Describe the image.")
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (235, 200, 30)}
DRAWINGS = ("Draw a red square.", "Draw a blue circle.", "Draw a green triangle.", "Draw a yellow circle.")


def image_urls() -> list[str]:
    urls = []
    for k, rgb in enumerate(COLOURS.values()):
        im = Image.new("RGB", (64, 64), "white")
        box = (10 + k, 12, 44 + k, 46)
        (ImageDraw.Draw(im).ellipse if k % 2 else ImageDraw.Draw(im).rectangle)(box, fill=rgb)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def bench_model(root: Path, random_llm: bool = False) -> Path:
    from easygen.demo.recipe import RECIPES, build
    recipe = dataclasses.replace(RECIPES["full"], name="bench-full-size", train_images=64, clip_steps=4, vae_steps=4,
                                 decoder_steps=4, unidiffuser_steps=2, easygen_steps=2, uvit_batch=8, stage1_steps=2,
                                 stage2_steps=1 if random_llm else 150, llm_batch=8, stage2_lr=3e-3,
                                 bridge_distill_steps=2, bridge_t2i_steps=2)
    print(f"building a full-size, {'untrained-LLM' if random_llm else 'briefly trained'} demo model in {root} ...",
          flush=True)
    return build(root, recipe, log=lambda line: None).easygen


def messages_for(k: int, urls: list[str], draw_every: int) -> list[dict]:
    if draw_every and k % draw_every == draw_every - 1:
        return [{"role": "user", "content": DRAWINGS[k % len(DRAWINGS)]}]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[k % len(urls)]}},
                                         {"type": "text", "text": QUESTIONS[k % len(QUESTIONS)]}]}]


def one_request(client, k: int, urls: list[str], max_tokens: int, draw_every: int) -> dict:
    start, first = time.perf_counter(), None
    try:
        stream = client.chat.completions.create(model=client.model_name, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True},
                                                messages=messages_for(k, urls, draw_every))
        tokens = 0
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        ok = True
    except openai.OpenAIError as e:
        print(f"  request {k}: {type(e).__name__}: {e}", flush=True)
        ok, tokens = False, 0
    took = time.perf_counter() - start
    return {"seconds": took, "first": took if first is None else first, "ok": ok, "tokens": tokens}


class PeakMemory:
    """The highest resident memory of a process and its children (vLLM's), sampled in a thread."""

    def __init__(self, pid: int):
        self.root, self.peak, self._stop = psutil.Process(pid), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        procs = [self.root] + self.root.children(recursive=True)
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    def _run(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def load(client, n: int, concurrency: int, urls: list[str], max_tokens: int, draw_every: int, pid: int) -> dict:
    with PeakMemory(pid) as memory:
        start = time.perf_counter()
        with futures.ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda k: one_request(client, k, urls, max_tokens, draw_every), range(n)))
        wall = time.perf_counter() - start
    lat = sorted(r["seconds"] for r in results)
    first = sorted(r["first"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"concurrency": concurrency, "requests": n, "errors": sum(not r["ok"] for r in results),
            "completion_tokens": tokens, "seconds": round(wall, 2), "requests_per_s": round(n / wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "p50_s": round(statistics.median(lat), 3),
            "p95_s": round(pct(lat, 0.95), 3), "ttft_p50_s": round(statistics.median(first), 3),
            "peak_memory_mb": round(memory.peak)}


def serve_pid(base: str) -> int:
    port = int(base.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return conn.pid
    raise RuntimeError(f"no process listens on {base}")


def engine_flags(engine: str, vllm_python: str | None, vllm_args: list[str]) -> list[str]:
    if engine == "transformers":
        return []
    python = vllm_python or os.environ.get("EASYGEN_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    return ["--llm-engine", "vllm", "--vllm-python", python]


def run_engine(engine: str, model: Path, tmp: Path, args, urls: list[str]) -> tuple[list[dict], dict]:
    flags = ["--temperature", "0", *(["--max-batch-size", str(args.max_batch_size)] if args.max_batch_size else []),
             "--max-queue", "256",
             "--max-new-tokens", str(args.max_tokens), *engine_flags(engine, args.vllm_python, args.vllm_arg)]
    print(f"{engine}: starting easygen serve {' '.join(flags)}", flush=True)
    with easygen_serve(model, tmp, *flags) as base:
        pid = serve_pid(base)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
        client.model_name = client.models.list().data[0].id
        for k in range(len(urls) * len(QUESTIONS)):  # warm up: every image read once (feature cache)
            one_request(client, k, urls, args.max_tokens, 0)
        rss_before = psutil.Process(pid).memory_info().rss / 2**20
        rows = []
        for c in args.concurrency:
            rows.append(load(client, args.requests, c, urls, args.max_tokens, args.draw_every, pid) | {"engine": engine})
            r = rows[-1]
            print(f"  {engine} concurrency {c}: {r['requests_per_s']} requests/s, {r['tokens_per_s']} tokens/s, "
                  f"{r['errors']} errors", flush=True)
        soak = {}
        if args.memory_requests:
            soak = load(client, args.memory_requests, 8, urls, args.max_tokens, args.draw_every, pid)
        rss_after = psutil.Process(pid).memory_info().rss / 2**20
    return rows, {"engine": engine, "memory_mb_before": round(rss_before), "memory_mb_after": round(rss_after),
                  "soak": soak}


def table(rows: list[dict]) -> str:
    base = {r["engine"]: r["requests_per_s"] for r in rows if r["concurrency"] == 1}
    lines = ["| engine | concurrency | requests | errors | requests/s | vs its c=1 | tokens/s | p50 latency "
             "| p95 latency | first piece p50 | peak memory |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['requests_per_s'] / base[r['engine']]:.1f}x" if r["engine"] in base else "-"
        lines.append(f"| {r['engine']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']} "
                     f"| {ratio} | {r['tokens_per_s']} | {r['p50_s']} s | {r['p95_s']} s | {r['ttft_p50_s']} s "
                     f"| {r['peak_memory_mb']} MiB |")
    by = {(r["engine"], r["concurrency"]): r["requests_per_s"] for r in rows}
    for c in sorted({r["concurrency"] for r in rows}):
        if ("vllm", c) in by and ("transformers", c) in by:
            lines.append(f"\nconcurrency {c}: vllm / transformers = {by['vllm', c] / by['transformers', c]:.2f}x "
                         f"requests/s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", type=Path, help="model to serve (default: a full-size demo built for this run)")
    ap.add_argument("--random-llm", action="store_true",
                    help="the built model's LLM untrained: answers run to --max-tokens (long answers)")
    ap.add_argument("--engines", nargs="+", choices=["transformers", "vllm"], default=["transformers", "vllm"])
    ap.add_argument("--vllm-python", help="vLLM's python (default $EASYGEN_VLLM_PYTHON, else .venv-vllm/bin/python)")
    ap.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                    help="an argument for the vLLM server (repeatable), e.g. --vllm-arg=--stream-interval=4")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level (default 64)")
    ap.add_argument("--draw-every", type=int, default=4,
                    help="every Nth request asks for a drawing (default 4; 0: image questions only)")
    ap.add_argument("--memory-requests", type=int, default=200,
                    help="requests between the two memory readings (default 200; 0: none)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=None,
                    help="transformers: turns per generate call; vllm: turns in flight to vLLM (default: serve's, 8 and 32)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import torch
    start = time.perf_counter()
    info = machine_info(torch.device("cpu"))
    urls = image_urls()
    rows, memory = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model_path or bench_model(tmp / "model", args.random_llm)
        for engine in args.engines:
            engine_rows, engine_memory = run_engine(engine, model, tmp, args, urls)
            rows += engine_rows
            memory.append(engine_memory)
    tokens = [r["completion_tokens"] / max(r["requests"], 1) for r in rows]
    print(f"answers: {min(tokens):.1f} to {max(tokens):.1f} tokens on average; every {args.draw_every}th request "
          f"draws" if args.draw_every else "")
    lines = [table(rows)]
    for m in memory:
        soak = m["soak"]
        lines.append(f"{m['engine']}: easygen process resident memory {m['memory_mb_before']} MiB before, "
                     f"{m['memory_mb_after']} MiB after" + (f" {soak['requests']} more requests at concurrency 8 "
                                                           f"({soak['errors']} errors)" if soak else ""))
    report("\n".join(lines), info, start, args, rows + memory)


if __name__ == "__main__":
    main()
