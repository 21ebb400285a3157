"""What the benchmark scripts share: load-aware timing, machine facts, test images.

Timing on a shared 2-core machine is noisy: a run slows down far more than proportionally when
another process wants a core. ``median_seconds`` therefore measures how many cores *other*
processes used during each timed run and retakes runs taken while the machine was busy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

RETRIES, RETRY_PAUSE_S = 3, 10  # per figure, for timed runs taken while other processes were busy
LOAD_WINDOW_S = 1.0  # /proc/stat counts 10 ms ticks: judge the load over at least this long


class OtherLoad:
    """CPU cores that *other* processes (and hypervisor steal) kept busy since the last ``take()``
    (Linux /proc/stat minus this process's own CPU time).

    Two-thread CPU runs slow down far more than proportionally when another process wants a core,
    so every figure is printed next to this number; near 0 means the run had the machine alone."""

    def __init__(self):
        self._mark = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        try:
            ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def seconds(self) -> float:
        return time.perf_counter() - self._mark[0]

    def take(self) -> float:
        (w0, b0, o0), (w1, b1, o1) = self._mark, self._now()
        self._mark = (w1, b1, o1)
        return max(0.0, (b1 - b0) - (o1 - o0)) / max(w1 - w0, 1e-9)


@dataclass
class Timing:
    max_other_load: float = 0.2  # --max-other-load
    last_other_load: float = 0.0  # the highest other load during a kept run of the last figure


TIMING = Timing()


def median_seconds(fn, repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` untimed runs.

    Runs are judged in windows of at least LOAD_WINDOW_S (one run when runs are long): runs
    during which other processes kept more than ``TIMING.max_other_load`` cores busy are thrown
    away and taken again after a pause (at most RETRIES times per figure)."""
    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times, window, loads, retries = [], [], [], RETRIES
    sync()
    load = OtherLoad()
    while len(times) < repeat:
        start = time.perf_counter()
        fn()
        sync()
        window.append(time.perf_counter() - start)
        if load.seconds() < LOAD_WINDOW_S and len(times) + len(window) < repeat:
            continue
        other = load.take()
        if other > TIMING.max_other_load and retries:
            retries -= 1
            print(f"  (other processes used {other:.2f} cores: timing {len(window)} run(s) again in "
                  f"{RETRY_PAUSE_S} s)", flush=True)
            time.sleep(RETRY_PAUSE_S)
        else:
            times += window
            loads.append(other)
        window = []
        load.take()
    TIMING.last_other_load = max(loads)
    return statistics.median(times)


def n_params(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def machine_info(device) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "nproc": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device), "python": platform.python_version(),
            "loadavg_1min": round(os.getloadavg()[0], 2)}  # other processes on the machine skew timings
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_images(directory: Path, n: int, side: int) -> list[Path]:
    """``n`` PNG files of smooth colour gradients, a different one per file."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        corners = torch.rand(3, 2, 2, generator=g)[None]
        rgb = torch.nn.functional.interpolate(corners, size=(side, side), mode="bilinear", align_corners=True)[0]
        paths.append(directory / f"image{i}.png")
        Image.fromarray((rgb.permute(1, 2, 0) * 255).byte().numpy()).save(paths[-1])
    return paths


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options every benchmark takes."""
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--max-other-load", type=float, default=0.2, metavar="CORES",
                    help=f"time a run again (up to {RETRIES} times per figure) when other processes kept more "
                         "than this many CPU cores busy during it (default 0.2; 'inf': never)")


def apply_common_args(args) -> torch.device:
    """Apply --max-other-load and --threads; returns the --device."""
    TIMING.max_other_load = args.max_other_load
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    return device


def report(table: str, info: dict, start: float, args, rows: list[dict]) -> None:
    """Print the results table and run totals; with --json, also write machine, argv and rows there."""
    info.setdefault("loadavg_1min_end", round(os.getloadavg()[0], 2))
    print(f"\n{table}\n\ntotal {time.perf_counter() - start:.0f} s, "
          f"1-min load average {info['loadavg_1min']} at start, {info['loadavg_1min_end']} at end")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "argv": sys.argv, "results": rows}, indent=2) + "\n")
