"""`easygen serve` under load: requests/s and p50/p95 latency at several concurrencies, errors
counted, and the server's resident memory before and after many requests.

The server is a real `easygen serve` process on 127.0.0.1; the clients are threads using the
official `openai` client, each sending a question about an image (a data: URL, one of a few
shapes, so image features come from the feature cache after the first time, as for a user who
asks several things about one picture). Both share this machine, so the figures are for the
whole system on it.

By default the model has the shapes demo's full architecture (U-ViT 128x6, LLM 128x4) but only
a few training steps (the `ci` recipe's step counts): the per-token and per-request costs are the
demo's, and it answers as briefly as the demo does. `--model-path` serves any other model.

    python benchmarks/bench_serve.py                       # concurrency 1, 4, 8, 16
    python benchmarks/bench_serve.py --requests 64 --memory-requests 500 --json out.json
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures as futures
import dataclasses
import io
import statistics
import sys
import tempfile
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


def bench_model(root: Path) -> Path:
    from easygen.demo.recipe import RECIPES, build
    recipe = dataclasses.replace(RECIPES["full"], name="bench-full-size", train_images=64, clip_steps=4, vae_steps=4,
                                 decoder_steps=4, unidiffuser_steps=2, easygen_steps=2, uvit_batch=8, stage1_steps=2,
                                 stage2_steps=150, llm_batch=8, stage2_lr=3e-3)
    print(f"building a full-size, briefly trained demo model in {root} ...", flush=True)
    return build(root, recipe, log=lambda line: None).easygen


def one_request(client, k: int, urls: list[str], max_tokens: int) -> tuple[float, bool, int]:
    start = time.perf_counter()
    try:
        r = client.chat.completions.create(model=client.model_name, max_tokens=max_tokens, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[k % len(urls)]}},
                                         {"type": "text", "text": QUESTIONS[k % len(QUESTIONS)]}]}])
        ok, tokens = r.choices[0].message.content is not None, r.usage.completion_tokens
    except openai.OpenAIError as e:
        print(f"  request {k}: {type(e).__name__}: {e}", flush=True)
        ok, tokens = False, 0
    return time.perf_counter() - start, ok, tokens


def load(client, n: int, concurrency: int, urls: list[str], max_tokens: int) -> dict:
    start = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda k: one_request(client, k, urls, max_tokens), range(n)))
    wall = time.perf_counter() - start
    lat = sorted(t for t, _, _ in results)
    return {"concurrency": concurrency, "requests": n, "errors": sum(not ok for _, ok, _ in results),
            "completion_tokens": sum(k for _, _, k in results),
            "seconds": round(wall, 2), "requests_per_s": round(n / wall, 2),
            "p50_s": round(statistics.median(lat), 3), "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3)}


def server_rss_mb(base: str) -> float:
    port = int(base.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return psutil.Process(conn.pid).memory_info().rss / 2**20
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", type=Path, help="model to serve (default: a full-size demo built for this run)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level (default 48)")
    ap.add_argument("--memory-requests", type=int, default=500,
                    help="requests between the two memory readings (default 500)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import torch
    start = time.perf_counter()
    info = machine_info(torch.device("cpu"))
    urls = image_urls()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model_path or bench_model(tmp / "model")
        with easygen_serve(model, tmp, "--temperature", "0", "--max-batch-size", str(args.max_batch_size),
                           "--max-queue", "256") as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
            client.model_name = client.models.list().data[0].id
            for k in range(len(urls) * len(QUESTIONS)):  # warm up: every image read once (feature cache)
                one_request(client, k, urls, args.max_tokens)
            rss_before = server_rss_mb(base)
            rows = [load(client, args.requests, c, urls, args.max_tokens) for c in args.concurrency]
            for row in rows:
                print(f"  concurrency {row['concurrency']}: {row['requests_per_s']} requests/s", flush=True)
            soak = load(client, args.memory_requests, 8, urls, args.max_tokens)
            rss_after = server_rss_mb(base)
    base_rps = next((r["requests_per_s"] for r in rows if r["concurrency"] == 1), None)
    tokens = [r["completion_tokens"] / max(r["requests"], 1) for r in rows]
    print(f"answers: {min(tokens):.1f} to {max(tokens):.1f} tokens on average")
    lines = ["| concurrency | requests | errors | requests/s | vs 1 | p50 latency | p95 latency |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['requests_per_s'] / base_rps:.1f}x" if base_rps else "-"
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']} | {ratio} | "
                     f"{r['p50_s']} s | {r['p95_s']} s |")
    lines.append(f"\nserver resident memory: {rss_before:.0f} MiB before, {rss_after:.0f} MiB after "
                 f"{soak['requests']} more requests at concurrency 8 ({soak['errors']} errors, "
                 f"{soak['requests_per_s']} requests/s)")
    report("\n".join(lines), info, start, args, rows + [{"memory_mb_before": rss_before, "memory_mb_after": rss_after,
                                                       "soak": soak}])


if __name__ == "__main__":
    main()
