"""EasyGen's LLM on vLLM: the prompts go to a vLLM OpenAI-compatible server as prompt embeddings.

EasyGen's process keeps what is EasyGen's own: the processor's token layout, the image features
and the projector (``EasyGenForCausalLM.embed_inputs``), and drawing. Each prompt becomes the same
input embeddings the in-process engine feeds ``generate`` (token embeddings, each image's 77
projected vectors at its sentinel positions) and goes to vLLM's Completions API as a base64
``torch.save`` tensor (``--enable-prompt-embeds``); the tokens come back as ids
(``return_token_ids``) and pass through ``generation.RowStreamer``, like the in-process engine's.
vLLM's Completions API takes a prompt either as ids or as embeddings, not both mixed, so the text
travels as its embeddings too; they are rows of the same table vLLM would read.

Each row is its own streamed request, so vLLM batches whatever is in flight (continuous batching)
and a row that stops early (a stop string, a client that left) closes its stream, which aborts it
in vLLM. Failures become ``LLMEngineError``: 503 when vLLM cannot be reached or does not answer
in time, 502 when it fails in the middle of an answer, 400 when it refuses the request.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from .errors import EasyGenError, LLMEngineError
from .generation import Row, RowStreamer, eos_ids, reset_rows

log = logging.getLogger("easygen.vllm")


def encode_embeds(embeds: torch.Tensor) -> str:
    """How vLLM's Completions API takes prompt embeddings: ``torch.save`` of a (tokens x hidden)
    tensor, base64."""
    buf = io.BytesIO()
    torch.save(embeds.contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class VLLMEngine:
    """Answers rows through the vLLM server at ``url`` (see the module docstring)."""
    name = "vllm"
    concurrent = True  # vLLM batches the requests in flight; the chat service sends them side by side

    def __init__(self, model, processor, url: str, model_name: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0, server=None):
        self.model, self.processor = model, processor
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.server = server  # a VLLMServer this engine started, stopped by close()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers,
                                   timeout=httpx.Timeout(timeout, connect=10.0),
                                   limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        self._model_name = model_name
        self._eos = eos_ids(model)
        self._name_lock = threading.Lock()

    def describe(self) -> str:
        return f"vllm at {self.url}" + (" (started by easygen)" if self.server is not None else "")

    # -- talking to the server ----------------------------------------------------------------------
    def model_name(self) -> str:
        """The model the server serves (its first, unless given): asked once, when first needed, so
        a server that is down at start-up is found when it comes back."""
        with self._name_lock:
            if self._model_name is None:
                r = self._call(lambda: self.client.get("/v1/models", timeout=10.0))
                if r.status_code != 200:
                    raise LLMEngineError(502, f"the LLM engine (vLLM at {self.url}) answered /v1/models with "
                                              f"HTTP {r.status_code}")
                data = r.json().get("data") or []
                if not data:
                    raise LLMEngineError(502, f"the LLM engine (vLLM at {self.url}) serves no model")
                self._model_name = data[0]["id"]
            return self._model_name

    def _call(self, request):
        try:
            return request()
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise LLMEngineError(503, f"the LLM engine (vLLM at {self.url}) is not reachable: {e}") from None
        except httpx.TimeoutException:
            raise LLMEngineError(503, f"the LLM engine (vLLM at {self.url}) did not answer within "
                                      f"{self.timeout:g} s") from None
        except httpx.HTTPError as e:
            raise LLMEngineError(502, f"the LLM engine (vLLM at {self.url}) failed: {type(e).__name__}: {e}") from None

    def embeds(self, row: Row) -> torch.Tensor:
        """The row's prompt as input embeddings, exactly as the in-process engine builds them."""
        with torch.inference_mode():
            ids = torch.tensor([row.ids], device=self.model.device)
            return self.model.embed_inputs(ids, row.features)[0].cpu()

    # -- the engine interface -----------------------------------------------------------------------
    def generate(self, rows: list[Row], temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1,
                 seed: int | None = None) -> list[Row]:
        if num_beams > 1:
            raise EasyGenError("beam search is not available with the vLLM engine (use --llm-engine transformers)")
        reset_rows(rows)
        if len(rows) == 1:
            self._generate_one(rows[0], temperature, top_p, seed)
            return rows
        with ThreadPoolExecutor(len(rows)) as pool:  # side by side: vLLM batches them
            for f in [pool.submit(self._generate_one, r, temperature, top_p, seed) for r in rows]:
                f.result()
        return rows

    def _generate_one(self, row: Row, temperature: float, top_p: float, seed: int | None) -> None:
        body = {"model": self.model_name(), "prompt_embeds": encode_embeds(self.embeds(row)),
                "max_tokens": row.max_new_tokens, "temperature": temperature, "top_p": top_p,
                "stream": True, "return_token_ids": True, "skip_special_tokens": False}
        if seed is not None:
            body["seed"] = seed
        streamer = RowStreamer([row], self.processor.tokenizer, self._eos)
        streamer.prompt_seen = True  # (tokens arrive one by one: no prompt to skip)
        self._call(lambda: self._stream(body, row, streamer))
        streamer.end()

    def _stream(self, body: dict, row: Row, streamer: RowStreamer) -> None:
        with self.client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                raise self._refused(r)
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:  # vLLM reports a failure inside the stream this way
                    message = (chunk["error"] or {}).get("message", "unknown error")
                    raise LLMEngineError(502, f"the LLM engine (vLLM at {self.url}) failed mid-answer: {message}")
                for choice in chunk.get("choices", []):
                    for token in choice.get("token_ids") or []:
                        streamer.put(torch.tensor([token]))
                if row.finish_reason is not None:
                    return  # a stop string, the length, or the client left: closing the stream aborts it
        if row.finish_reason is None:  # the stream ended without [DONE]: the server went away
            raise LLMEngineError(502, f"the LLM engine (vLLM at {self.url}) closed the answer before it ended")

    def _refused(self, r: httpx.Response) -> LLMEngineError:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:300]
        status = 400 if 400 <= r.status_code < 500 else 502
        return LLMEngineError(status, f"the LLM engine (vLLM) refused the request (HTTP {r.status_code}): {message}")

    def close(self) -> None:
        self.client.close()
        if self.server is not None:
            self.server.stop()
