"""FastChat's own OpenAI API server (``fastchat.serve.openai_api_server``, same flags), with one
compatibility fix and nothing else changed.

fschat 0.2.36 writes each streamed chunk with pydantic 1's ``chunk.json(exclude_unset=True,
ensure_ascii=False)``. Under pydantic 2 (which the FastAPI it runs on requires) that call raises
``TypeError: `dumps_kwargs` keyword arguments are no longer supported``, so every
``"stream": true`` request ends with a broken connection; non-streaming requests work. This module
gives ``BaseModel.json`` those arguments back, then runs the stock server:

    python -m fastchat_ext.openai_api_server --host 127.0.0.1 --port 8000 --controller-address http://127.0.0.1:21001
"""
from __future__ import annotations

import json
import runpy

import pydantic


def _json(self, *, exclude_unset: bool = False, ensure_ascii: bool = True, **kwargs) -> str:
    return json.dumps(self.model_dump(mode="json", exclude_unset=exclude_unset, **kwargs), ensure_ascii=ensure_ascii)


if __name__ == "__main__":
    pydantic.BaseModel.json = _json
    runpy.run_module("fastchat.serve.openai_api_server", run_name="__main__", alter_sys=True)
