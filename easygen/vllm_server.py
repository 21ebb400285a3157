"""A vLLM OpenAI-compatible server that EasyGen starts and stops itself (``--llm-engine vllm``
without ``--vllm-url``), and ``use_vllm``, which puts a loaded model's LLM on vLLM.

vLLM lives in its own Python environment (it pins its own torch and dependencies; see the
docs/serving.md, "Serve at scale with vLLM"): the server runs as ``VLLM_PYTHON -m
vllm.entrypoints.openai.api_server`` over the LLM exported by ``easygen.llm_export``, on
127.0.0.1 and a free port, with its output in a log file whose tail is shown when it fails.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import EasyGenError

VLLM_PYTHON_ENV = "EASYGEN_VLLM_PYTHON"
VLLM_API_KEY_ENV = "EASYGEN_VLLM_API_KEY"  # a vLLM server started with --api-key
SERVED_NAME = "easygen-llm"
# vLLM on CPU reserves most of the RAM for its KV cache unless told a size (GiB).
DEFAULT_KV_CACHE_GIB = "2"


def find_vllm_python(explicit: str | None = None) -> str:
    """The Python that runs vLLM: ``explicit``, else $EASYGEN_VLLM_PYTHON, else this one when it
    can import vllm."""
    candidate = explicit or os.environ.get(VLLM_PYTHON_ENV)
    if candidate:
        path = shutil.which(candidate) or candidate
        if not Path(path).is_file():
            raise EasyGenError(f"--vllm-python {candidate}: no such program")
        return path
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise EasyGenError(f"vLLM is not installed here: give its environment's python with --vllm-python (or "
                       f"${VLLM_PYTHON_ENV}), e.g. after `bash scripts/setup_vllm_env.sh`, or a running "
                       f"server with --vllm-url")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` over ``model_dir``, started by ``start``."""

    def __init__(self, model_dir: Path, python: str, dtype: str, max_model_len: int, extra_args=(),
                 log_path: Path | None = None, workdir: Path | None = None):
        self.model_dir, self.python, self.dtype, self.max_model_len = model_dir, python, dtype, max_model_len
        self.extra_args = list(extra_args)
        self.workdir = workdir  # removed by stop() (the export lives there)
        self.log_path = log_path or model_dir.parent / "vllm-server.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--served-model-name", SERVED_NAME, "--enable-prompt-embeds", "--dtype", self.dtype,
                "--max-model-len", str(self.max_model_len), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-uvicorn-access-log", *self.extra_args]  # (a log line per request costs a core here)

    def start(self, timeout: float = 600.0, log=None) -> "VLLMServer":
        env = {**os.environ}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_CACHE_GIB)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        atexit.register(self.stop)  # never left running after this process, whatever path it exits by
        if log:
            log(f"starting vLLM ({self.python}) on {self.url}; its log: {self.log_path}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise EasyGenError(f"vLLM exited with status {self.proc.returncode} while starting: {tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise EasyGenError(f"vLLM did not start within {timeout:g} s: {tail}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        errors = [t for t in text if "Error" in t or "error" in t]
        return " | ".join((errors or text)[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def drop_llm_layers(loaded) -> bool:
    """Free the LLM's decoder layers and head when nothing in this process runs them any more: with
    vLLM answering, EasyGen's process needs only the token embeddings and the projector to build
    prompts, unless image replies are drawn through the bridge, which reads the LLM's hidden states
    (then the LLM stays whole). True when they were dropped."""
    import torch

    if loaded.bidiffuser is not None and loaded.bidiffuser.has_bridge:
        return False
    model = loaded.model
    model.model.layers = torch.nn.ModuleList()
    model.model.norm = torch.nn.Identity()
    model.lm_head = torch.nn.Identity()
    return True


def use_vllm(loaded, url: str | None = None, model_name: str | None = None, python: str | None = None,
             extra_args=(), timeout: float = 120.0, start_timeout: float = 600.0, api_key: str | None = None,
             log=None, keep_llm: bool = False):
    """Answer ``loaded``'s prompts with vLLM from now on (``loaded.llm``), and return the engine.

    With ``url``: the vLLM server there (started by you, anywhere). Without: export the LLM to a
    temporary directory and start a vLLM server on it with ``python`` (``find_vllm_python``);
    ``engine.close()`` stops it and removes the export. Unless ``keep_llm``, the LLM layers this
    process no longer runs are freed before vLLM starts (``drop_llm_layers``), so the LLM is held
    once, by vLLM. ``api_key``: the vLLM server's (default $EASYGEN_VLLM_API_KEY).
    """
    api_key = api_key or os.environ.get(VLLM_API_KEY_ENV) or None
    from .llm_export import export_llm, vllm_head_dim
    from .vllm_engine import VLLMEngine

    server = None
    if url is None:
        python = find_vllm_python(python)
        workdir = Path(tempfile.mkdtemp(prefix="easygen-vllm-"))
        try:
            config = loaded.model.config
            model_dir = export_llm(loaded, workdir / "llm", source="easygen (managed vLLM server)",
                                   head_dim=vllm_head_dim(config.head_dim))
            dtype = str(loaded.model.dtype).removeprefix("torch.")
            server = VLLMServer(model_dir, python, dtype, config.max_position_embeddings, extra_args,
                                log_path=workdir / "vllm-server.log", workdir=workdir)
            if not keep_llm:
                drop_llm_layers(loaded)
            server.start(start_timeout, log)
        except BaseException:
            if server is not None:
                server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        url, model_name = server.url, SERVED_NAME
    elif not keep_llm:
        drop_llm_layers(loaded)
    engine = VLLMEngine(loaded.model, loaded.processor, url, model_name=model_name, api_key=api_key,
                        timeout=timeout, server=server)
    loaded.llm = engine
    return engine
