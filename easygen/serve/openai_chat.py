"""OpenAI chat completions <-> EasyGen turns.

In: a request body is checked field by field (anything EasyGen cannot honour is a 400 naming the
field), the messages become the engine's history (images saved by ``ImageInbox``) plus the new
user turn. Markdown images in earlier assistant messages (``![description](url)``, how this server
returns pictures) become ``<Img>description</Img>`` again, which is what the model wrote; a picture
sent back as a ``data:`` URL (the default) is the assistant's drawing again and is shown to the
model in the next user turn, as in ``easygen chat`` (links and other URLs are kept as text only).

Out: the answer's ``<Img>description</Img>`` becomes ``![description](url)`` where the tag stood,
and the message also carries ``images: [{"type": "image_url", "image_url": {"url": ...}}]`` (the
field OpenRouter and LiteLLM return); ``url`` is a ``data:image/png;base64`` URL or a link served
by this server.
"""
from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastchat_ext.conversation import IMAGE_PLACEHOLDER, LLAVA_IMAGE_TOKEN, read_back_pictures

from ..assistant import Reply
from ..image_reply import replace_image_tags
from .errors import bad_request
from .images import ImageInbox

SUPPORTED = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop",
             "stream", "stream_options", "n", "modalities", "user"}
# Accepted only at the value that asks for nothing (what clients send by default).
NEUTRAL = {"logprobs": (False, None), "presence_penalty": (0, None), "frequency_penalty": (0, None),
           "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
           "parallel_tool_calls": (None, True, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
           "response_format": (None, {"type": "text"}), "store": (None, False), "metadata": (None, {})}
MAX_STOP = 4


@dataclass
class ChatRequest:
    model: str
    history: list[dict]            # Assistant.messages form: user/assistant pairs, images by path
    text: str                      # the new user turn
    images: list[str]
    system: str = ""
    stream: bool = False
    include_usage: bool = False
    force_image: bool = False
    overrides: dict = field(default_factory=dict)  # GenerationSettings fields the client set


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        raise bad_request(f"{name} must be {'an integer' if integer else 'a number'} from {lo} to {hi}, got {value!r}",
                          name, "invalid_value")
    return value


def parse_chat_request(body, inbox: ImageInbox, max_tokens_limit: int) -> ChatRequest:
    """The checked request; an APIError (400) names the first problem."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name, value in body.items():
        if name in SUPPORTED:
            continue
        if name in NEUTRAL:
            if value not in NEUTRAL[name]:
                raise bad_request(f"{name} is not supported by EasyGen", name, "unsupported_parameter")
            continue
        raise bad_request(f"Unrecognized request argument supplied: {name}", name, "unsupported_parameter")
    if not isinstance(body.get("model"), str):
        raise bad_request("model is required (a string; GET /v1/models lists it)", "model")
    if body.get("n") not in (None, 1):
        raise bad_request("n must be 1: EasyGen writes one answer per request", "n", "unsupported_parameter")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad_request("stream_options may only hold include_usage", "stream_options")
    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or not modalities or set(modalities) - {"text", "image"}:
        raise bad_request('modalities must be ["text"], ["text", "image"] or ["image"]', "modalities")

    overrides = dict(temperature=_number(body, "temperature", 0, 2), top_p=_number(body, "top_p", 1e-9, 1),
                     seed=_number(body, "seed", -2**63, 2**63 - 1, integer=True))
    for name in ("max_completion_tokens", "max_tokens"):
        limit = _number(body, name, 1, max_tokens_limit, integer=True)
        if limit is not None:
            overrides["max_new_tokens"] = limit
            break
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP}", "stop")
        overrides["stop"] = tuple(stop)

    system, history, last = _messages(body.get("messages"), inbox)
    return ChatRequest(model=body["model"], history=history, text=last["content"], images=last["images"],
                       system=system, stream=stream, include_usage=bool(options.get("include_usage")),
                       force_image="image" in modalities,
                       overrides={k: v for k, v in overrides.items() if v is not None})


def _messages(messages, inbox: ImageInbox) -> tuple[str, list[dict], dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    system, turns = [], []  # turns: merged consecutive same-role messages
    images_seen = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", where)
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text_only(m.get("content"), where))
            continue
        if role not in ("user", "assistant"):
            raise bad_request(f"{where}: role {role!r} is not supported (system, user, assistant)", f"{where}.role")
        if role == "user":
            text, urls = _user_content(m.get("content"), where)
            sources = [(f"{where}.content[{k}]", url) for k, url in urls]
        else:
            text, drawn = read_back_pictures(_text_only(m.get("content"), where, allow_none=True))
            sources = [(f"{where}.content", url) for url in drawn]
        images_seen += len(sources)
        if images_seen > inbox.limits.max_images:
            raise bad_request(f"too many images: at most {inbox.limits.max_images} per request", where,
                              "too_many_images")
        paths = [inbox.save(url, param) for param, url in sources]
        if not turns or turns[-1]["role"] != role:  # two in a row make one turn, as the template needs
            turns.append({"role": role, "content": "", "images": []}
                         | ({"generated": []} if role == "assistant" else {}))
        turn = turns[-1]
        turn["content"] = "\n".join(t for t in (turn["content"], text) if t)
        turn["images" if role == "user" else "generated"] += paths  # an assistant's pictures: what it drew
    if not turns or turns[0]["role"] != "user":
        raise bad_request("the conversation must start with a user message (after any system message)", "messages")
    if turns[-1]["role"] != "user":
        raise bad_request("the last message must be the user's", "messages")
    for t in turns:
        if t["role"] == "user" and not t["content"].strip() and not t["images"]:
            raise bad_request("a user message is empty", "messages")
    return "\n".join(system), turns[:-1], turns[-1]


def _text_only(content, where: str, allow_none: bool = False) -> str:
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("text", "refusal")
                                         for p in content):
        return "\n".join(str(p.get("text") or p.get("refusal") or "") for p in content)
    raise bad_request(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _user_content(content, where: str) -> tuple[str, list[tuple[int, str]]]:
    """(text, [(part index, image URL)])."""
    if isinstance(content, str):
        texts, urls = [content], []
    elif isinstance(content, list):
        texts, urls = [], []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str):
                    raise bad_request(f"{where}.content[{k}].image_url.url must be a string",
                                      f"{where}.content[{k}]")
                urls.append((k, url))
            else:
                raise bad_request(f"{where}.content[{k}]: only text and image_url parts are supported",
                                  f"{where}.content[{k}]", "unsupported_content")
    else:
        raise bad_request(f"{where}.content must be a string or a list of parts", f"{where}.content")
    text = "\n".join(t for t in texts if t)
    for mark in (IMAGE_PLACEHOLDER, LLAVA_IMAGE_TOKEN):
        if mark in text:
            raise bad_request(f"{where}: the text contains {mark}, which marks image slots; send images as "
                              "image_url parts", f"{where}.content")
    return text, urls


# -- out ----------------------------------------------------------------------------------------------
def png_data_url(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


ImageURL = Callable[[Path], str]  # a drawn PNG -> the URL the client gets


def reply_content(reply: Reply, image_url: ImageURL) -> tuple[str, list[dict]]:
    """The message content (markdown images where the tags stood) and its ``images`` parts."""
    urls = [image_url(p) for p in reply.image_paths]
    content = replace_image_tags(reply.text, lambda d, k: f"![{alt_text(d)}]({urls[k]})" if k < len(urls) else d)
    return content, [{"type": "image_url", "image_url": {"url": u}} for u in urls]


def alt_text(description: str) -> str:
    return description.replace("[", "(").replace("]", ")").replace("\n", " ")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(cid: str, model: str, reply: Reply, image_url: ImageURL) -> dict:
    content, images = reply_content(reply, image_url)
    message = {"role": "assistant", "content": content}
    if images:
        message["images"] = images
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}],
            "usage": usage(reply)}


def usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def chunk(cid: str, model: str, delta: dict | None, finish_reason: str | None = None, **extra) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **extra}

