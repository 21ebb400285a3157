"""Start a real server process for a test: on 127.0.0.1, on a free port, stopped by the test."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0, log: Path | None = None) -> None:
    """Until ``url`` answers (any HTTP status); fails early if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout} s: {log.read_text()[-3000:] if log else ''}")


@contextlib.contextmanager
def running(argv: list[str], ready_url: str, log: Path, env: dict | None = None, timeout: float = 120.0,
            cwd: Path | None = None):
    """Run ``argv`` (a server) in ``cwd`` until the block ends; its output goes to ``log``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True, cwd=cwd)
    try:
        wait_http(ready_url, proc, timeout, log)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def easygen_serve(model_dir: Path, tmp_path: Path, *flags: str, env: dict | None = None):
    """``easygen serve`` on a free port; yields its base URL (http://127.0.0.1:PORT)."""
    port = free_port()
    argv = [sys.executable, "-m", "easygen.cli", "serve", "--model-path", str(model_dir), "--port", str(port),
            "--feature-cache", str(tmp_path / "feature-cache"), *flags]
    base = f"http://127.0.0.1:{port}"
    with running(argv, f"{base}/health", tmp_path / f"serve-{port}.log", env):
        yield base
