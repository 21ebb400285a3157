"""Shared command-line plumbing: user errors become one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from .errors import BiDiffuserError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
PRECISION_NAMES = ("auto",) + DTYPE_NAMES  # BiDiffuser precision policies (bidiffuser.precision)


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="weights and activations dtype")


def torch_dtype(name: str):
    import torch
    return getattr(torch, name)


def resolve_device(name: str | None):
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BiDiffuserError(f"--device: unknown device '{name}' (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BiDiffuserError("--device cuda requested but no CUDA device is available")
    return dev


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def progress_bar(desc: str, disable: bool = False, unit: str = "step") -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A (callback, close) pair driving a tqdm bar on stderr: callback(step, total)."""
    from tqdm import tqdm
    bar: dict = {}

    def update(step: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, leave=False)
        bar["bar"].n = step
        bar["bar"].refresh()

    def close() -> None:
        if "bar" in bar:
            bar.pop("bar").close()

    return update, close


def quiet_libraries() -> None:
    """Keep transformers'/diffusers' own progress bars and advisory warnings out of our output
    (ours say what is happening). Environment variables, so they act before those libraries load;
    a user who sets them keeps their choice."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # DeepSpeed (pulled in by transformers) prints "Setting accelerator to CPU" on *stdout* at import,
    # which would corrupt piped output; a filter on its logger, added before it exists, drops it.
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator" not in record.getMessage())
    # bitsandbytes (imported by peft) reports at import that an optional CPU kernel package is absent.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage())


def run_main(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; a BiDiffuserError (every user-facing error derives from it) becomes
    ``prog: error: <message>`` and exit code 2, never a traceback. Ctrl-C exits with 130."""
    quiet_libraries()
    try:
        return main(argv) or 0
    except BiDiffuserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
