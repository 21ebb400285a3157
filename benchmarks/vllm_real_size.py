"""The memory plan of EasyGen's LLM on vLLM at real size: a Vicuna-7B-shaped LLM with random weights
in EasyGen's released layout (benchmarks/real_size.py writes it), put on vLLM the way
`easygen serve --llm-engine vllm` does it (exported, the front's copy of the decoder freed, a
vLLM server started), then a few greedy tokens through both engines.

Prints, per phase, the resident memory of EasyGen's process and of vLLM's processes (API server,
engine core, worker), the weights each holds, and seconds per new token through each engine. The
BiDiffuser half (loaded on first use, in EasyGen's process only) is measured by real_size.py.

    python benchmarks/vllm_real_size.py --workdir /data/easygen-dry-run            # ~13 GB + 13 GB of disk
    python benchmarks/vllm_real_size.py --size reduced --workdir /tmp/dry-run       # seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from real_size import GIB, SIZES, write_llm  # noqa: E402


def rss_gib(pids) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / GIB


def weights_gib(module: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / GIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="real")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--vllm-python", default=None, help="default $EASYGEN_VLLM_PYTHON, else .venv-vllm/bin/python")
    ap.add_argument("--tokens", type=int, default=4, help="greedy tokens per engine (default 4)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from easygen.builder import load_pretrained
    from easygen.generation import Row
    from easygen.vllm_server import use_vllm

    size = SIZES[args.size]
    llm_dir = args.workdir / "diffllama"
    t = time.perf_counter()
    write_llm(llm_dir, size)
    print(f"Vicuna-shaped LLM ({args.size}) in {llm_dir} ({time.perf_counter() - t:.0f} s)", flush=True)
    me = os.getpid()
    rows = []

    def phase(name: str, front_holds: str, front_weights: float, vllm_pids=(), vllm_weights: float = 0.0, **extra):
        rows.append({"phase": name, "front_gib": round(rss_gib([me]), 2), "front_holds": front_holds,
                     "front_weights_gib": round(front_weights, 2), "vllm_gib": round(rss_gib(vllm_pids), 2),
                     "vllm_weights_gib": round(vllm_weights, 2), **extra})
        print(rows[-1], flush=True)

    t = time.perf_counter()
    loaded = load_pretrained(llm_dir, dtype=args.dtype, load_bidiffuser=False)
    full = weights_gib(loaded.model)
    phase("load (transformers engine)", "the whole LLM", full, seconds=round(time.perf_counter() - t, 1))
    p = loaded.processor
    ids = p.tokenize_prompt(p.build_prompt([{"role": "user", "content": "Describe a red circle on white."}]))
    t = time.perf_counter()
    ours = Row(ids, None, args.tokens)
    loaded.llm.generate([ours])
    per_token_ours = (time.perf_counter() - t) / max(len(ours.tokens), 1)
    phase("generate (transformers engine)", "the whole LLM", full, s_per_token=round(per_token_ours, 3))

    python = args.vllm_python or os.environ.get("EASYGEN_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    t = time.perf_counter()
    engine = use_vllm(loaded, python=python, start_timeout=1800, extra_args=["--enforce-eager"], log=print)
    try:
        server = psutil.Process(engine.server.proc.pid)
        pids = [server.pid] + [c.pid for c in server.children(recursive=True)]
        export = sum(f.stat().st_size for f in (engine.server.model_dir).glob("*.safetensors")) / GIB
        phase("vLLM started (export, front's decoder freed)", "embeddings + projector", weights_gib(loaded.model),
              pids, export, seconds=round(time.perf_counter() - t, 1))
        t = time.perf_counter()
        theirs = Row(ids, None, args.tokens)
        engine.generate([theirs])
        per_token = (time.perf_counter() - t) / max(len(theirs.tokens), 1)
        phase("generate (vLLM engine)", "embeddings + projector", weights_gib(loaded.model), pids, export,
              s_per_token=round(per_token, 3), same_tokens=theirs.tokens == ours.tokens)
    finally:
        engine.close()
    lines = ["| phase | EasyGen process GiB | it holds | its weights GiB | vLLM processes GiB | vLLM weights GiB "
             "| s per token |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['front_gib']} | {r['front_holds']} | {r['front_weights_gib']} | "
                     f"{r['vllm_gib']} | {r['vllm_weights_gib']} | {r.get('s_per_token', '')} |")
    print("\n".join(lines))
    print(f"greedy tokens equal: {rows[-1].get('same_tokens')} ({args.tokens} tokens, {args.dtype}, "
          f"VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE', '2 (easygen default)')} GiB)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
