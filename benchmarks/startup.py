"""How fast `easygen chat` starts with the shipped demo model (no flags):

  prompt    from launching `easygen chat` on a real pseudo-terminal until its input prompt (USER)
            appears: the wait before a person can type;
  one-shot  the wall time of `easygen chat --image-file blue_circle.png --prompt "What is in the
            picture?"` (the picture from `easygen demo picture blue circle`), answer printed;
  imports   a fresh python importing the chat's modules (the `easygen` command line, the builder,
            the assistant, the BiDiffuser pipeline) and the VAE class that the first picture needs.

Each figure is the median of --runs runs (after one untimed run that warms the file cache), taken
with `common.median_seconds`: runs during which other processes kept more than --max-other-load
cores busy are taken again. Every run is a new process, as a user's command is.

    python benchmarks/startup.py                  # 5 runs per figure
    python benchmarks/startup.py --runs 3 --max-other-load inf --json startup.json
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout; tests.terminal runs a command on a pseudo-terminal

import torch  # noqa: E402

from common import RETRIES, TIMING, machine_info, median_seconds, report  # noqa: E402
from tests.terminal import Terminal, easygen  # noqa: E402

PROMPT = "What is in the picture?"
# The chat's imports, as `easygen chat` makes them; the VAE class is imported where a VAE is built,
# so build one on the meta device (no weights, no memory).
CHAT_IMPORTS = """
from easygen.cli import build_parser
build_parser()
import bidiffuser.images, fastchat_ext.chat_io
from easygen.cli.engine_args import quiet_libraries, resolve_model
import easygen.assistant, easygen.builder, easygen.features, easygen.demo.shipped
import torch
from bidiffuser.autoencoder import AutoencoderConfig, build_autoencoder
with quiet_libraries(), torch.device("meta"):
    build_autoencoder(AutoencoderConfig.tiny())
"""
TARGETS = {"prompt": 5.0, "one-shot": 6.0}  # seconds on 2 CPU cores (issue 27)


def time_to_prompt(cwd: Path) -> None:
    term = Terminal(easygen("chat"), cwd)
    try:
        term.wait_for("USER", timeout=300)
    finally:
        term.close()  # kills it at once: the timed run ends when the prompt shows


def run(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per figure (default 5)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--max-other-load", type=float, default=0.2, metavar="CORES",
                    help=f"time a run again (up to {RETRIES} times per figure) when other processes kept more "
                         "than this many CPU cores busy during it (default 0.2; 'inf': never)")
    args = ap.parse_args()
    TIMING.max_other_load = args.max_other_load

    from easygen.demo.shipped import default_demo
    if not default_demo().is_built():
        raise SystemExit("no demo model to start with: this installation ships none and none is built "
                         "(`easygen demo build`); the benchmark times a start, not a build")
    info, start = machine_info(torch.device("cpu")), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)  # the one-shot saves nothing, but the chat's --out-dir is relative
        picture = cwd / "blue_circle.png"
        run(easygen("demo", "picture", "blue", "circle", str(picture)), cwd)
        figures = {
            "prompt": lambda: time_to_prompt(cwd),
            "one-shot": lambda: run(easygen("chat", "--image-file", str(picture), "--prompt", PROMPT), cwd),
            "imports": lambda: run([sys.executable, "-c", CHAT_IMPORTS], cwd),
        }
        rows = []
        for name, fn in figures.items():
            print(f"{name} ...", flush=True)
            seconds = median_seconds(fn, args.runs)
            rows.append({"figure": name, "median_s": round(seconds, 2), "target_s": TARGETS.get(name),
                         "runs": args.runs, "other_load": round(TIMING.last_other_load, 2)})
    lines = [f"{'figure':<10} {'median s':>9} {'target s':>9} {'other load':>11}"]
    lines += [f"{r['figure']:<10} {r['median_s']:>9.2f} {r['target_s'] or '':>9} {r['other_load']:>11.2f}" for r in rows]
    report("\n".join(lines), info, start, args, rows)


if __name__ == "__main__":
    main()
