"""Greedy tokens of the vLLM engine against the in-process transformers engine on the shipped demo:
image questions, draw requests and the turns of multi-picture conversations (the cases of
``easygen.demo.engine_parity``), each prompt answered by both engines.

    python benchmarks/vllm_parity.py --vllm-python .venv-vllm/bin/python     # starts vLLM itself
    python benchmarks/vllm_parity.py --vllm-url http://127.0.0.1:8001         # a running vLLM of the demo's LLM
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-url", default=None)
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--questions", type=int, default=80)
    ap.add_argument("--draws", type=int, default=40)
    ap.add_argument("--turns", type=int, default=80)
    ap.add_argument("--json", type=Path, help="also write every case here")
    args = ap.parse_args()

    from easygen.builder import load_pretrained
    from easygen.demo.engine_parity import engine_parity, parity_table
    from easygen.demo.shipped import default_demo
    from easygen.vllm_server import use_vllm

    demo = default_demo()
    reference = load_pretrained(demo.easygen, device="cpu")
    other = load_pretrained(demo.easygen, device="cpu", load_bidiffuser=False)
    engine = use_vllm(other, url=args.vllm_url, python=args.vllm_python, log=print)
    try:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            records = engine_parity(reference, demo.recipe(), engine, tmp, args.questions, args.draws, args.turns)
        print(f"shipped demo ({demo.root}), {engine.describe()}, {time.perf_counter() - start:.0f} s")
        print(parity_table(records))
        for r in records:
            if not r["equal"]:
                print(f"  differs: {r['kind']} {r['text']!r}: {r['tokens']} vs {r['other_tokens']}")
        if args.json:
            args.json.write_text(json.dumps(records, indent=1))
    finally:
        engine.close()


if __name__ == "__main__":
    main()
