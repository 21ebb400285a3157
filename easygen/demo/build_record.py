"""What a demo build ran on, recorded as it happens: the command as typed, the code's git commit, library
versions, threads and CPU. ``easygen demo ship`` copies it into the shipped manifest (never a template), and
``easygen demo verify`` compares it with the machine it rebuilds on, since bit-identical weights need the same
code, libraries, thread count and CPU kernels."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What can change a build's bytes on the same code: compared by `easygen demo verify` before it rebuilds.
SAME_BYTES_NEED = ("git_commit", "git_dirty", "versions", "threads", "cpu_capability")
LIBRARIES = ("torch", "transformers", "diffusers", "peft", "tokenizers", "safetensors", "numpy")


def git_state() -> dict:
    """The checkout's commit and whether tracked files differ from it (None outside a git checkout)."""
    def git(*argv: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def environment() -> dict:
    import torch
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {**git_state(), "versions": {name: ver(name) for name in LIBRARIES},
            "python": platform.python_version(), "platform": platform.platform(),
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def command_line(argv: list[str] | None) -> str | None:
    """The command as typed (``easygen demo build ...``), or None when called from Python."""
    import shlex
    return None if argv is None else shlex.join(["easygen", *argv])


def differences(recorded: dict, here: dict) -> list[str]:
    """The build conditions that differ between a recorded build and this machine."""
    return [f"{key}: built with {recorded.get(key)!r}, here {here.get(key)!r}" for key in SAME_BYTES_NEED
            if recorded.get(key) != here.get(key)]
