"""EasyGen's chat service as the engine of FastChat's model worker (``fastchat_ext.model_worker``):
FastChat's turns and image URLs become a ``ChatJob`` (images, and pictures the model drew that come
back as data URLs, checked by the same ``ImageInbox``; answers rendered by the same code as the
OpenAI routes), and events go back in the worker's terms."""
from __future__ import annotations

from fastchat.constants import ErrorCode

from bidiffuser.errors import BiDiffuserError, first_line
from fastchat_ext.conversation import IMAGE_PLACEHOLDER
from fastchat_ext.model_worker import Busy, Emit

from ..assistant import Cancelled
from ..errors import LLMEngineError
from ..image_reply import ImageTagStream
from .errors import APIError
from .images import ImageInbox
from .openai_chat import png_data_url, reply_content
from .service import ChatJob, ChatService, QueueFull, with_overrides


class ServiceEngine:
    def __init__(self, service: ChatService, inbox: ImageInbox):
        self.service, self.inbox = service, inbox
        config = service.loaded.model.config
        self.context_length = config.max_position_embeddings
        self.image_positions = config.num_image_tokens

    def queue_length(self) -> int:
        status = self.service.status()
        return status["queue_length"] + status["running"]

    def count_tokens(self, prompt: str) -> int:
        from fastchat.conversation import IMAGE_PLACEHOLDER_STR
        n = prompt.count(IMAGE_PLACEHOLDER_STR)
        text = prompt.replace(IMAGE_PLACEHOLDER_STR, "")
        return len(self.service.loaded.processor.tokenize_prompt(text)) + n * self.image_positions

    def submit(self, turns: list[dict], image_urls: list[str], params: dict, emit: Emit):
        try:
            if image_urls and self.service.features is None:
                raise APIError(400, "this worker has no BiDiffuser model: it cannot read images")
            if len(image_urls) + sum(len(t.get("drawn", ())) for t in turns) > self.inbox.limits.max_images:
                raise APIError(400, f"too many images: at most {self.inbox.limits.max_images} per request")
            paths = [self.inbox.save(u, f"images[{k}]") for k, u in enumerate(image_urls)]
            messages, k = [], 0
            for i, t in enumerate(turns):
                content = t["content"]  # (the worker already turned markdown pictures back into tags)
                if t["role"] == "user" and IMAGE_PLACEHOLDER in content:
                    raise APIError(400, f"a message contains {IMAGE_PLACEHOLDER}, which marks image slots")
                if t["role"] == "assistant":  # the pictures it drew, shown in the next turn as easygen serve does
                    drawn = [self.inbox.save(u, f"the picture in assistant turn {i // 2 + 1}") for u in t["drawn"]]
                    messages.append({"role": "assistant", "content": content, "images": [], "generated": drawn})
                    continue
                messages.append({"role": t["role"], "content": content, "images": paths[k:k + t["num_images"]]})
                k += t["num_images"]
            stop = params.get("stop")
            settings = with_overrides(self.service.settings, temperature=params.get("temperature"),
                                      top_p=params.get("top_p"), max_new_tokens=params.get("max_new_tokens"),
                                      stop=tuple([stop] if isinstance(stop, str) else stop or ()) or None,
                                      seed=params.get("seed"))
            last = messages[-1]
            job = ChatJob(messages[:-1], last["content"], last["images"], settings, _translate(emit),
                          system=params.get("system", ""))
            self.service.submit(job)
            return job.cancelled.set
        except APIError as e:
            emit("error", (ErrorCode.VALIDATION_TYPE_ERROR, e.message))
        except QueueFull as e:
            raise Busy(f"the worker is busy: retry in {e.retry_after} s") from None
        return lambda: None


def _translate(emit: Emit):
    """The service's events -> the worker's: tags hidden while streaming, pictures as data-URL markdown."""
    tags = ImageTagStream()

    def on_event(kind: str, payload) -> None:
        if kind == "text":
            piece = tags.feed(payload)
            if piece:
                emit("text", piece)
        elif kind == "progress":
            emit("progress", payload)
        elif kind == "done":
            content, _ = reply_content(payload, png_data_url)
            emit("done", {"text": content, "finish_reason": payload.finish_reason,
                          "prompt_tokens": payload.prompt_tokens, "completion_tokens": payload.completion_tokens})
        elif isinstance(payload, Cancelled):
            emit("error", (ErrorCode.INTERNAL_ERROR, "cancelled"))
        elif isinstance(payload, LLMEngineError) and payload.status >= 500:  # vLLM down or failing
            emit("error", (ErrorCode.INTERNAL_ERROR, first_line(payload)))
        elif isinstance(payload, BiDiffuserError):
            code = ErrorCode.CONTEXT_OVERFLOW if "too long" in str(payload) else ErrorCode.VALIDATION_TYPE_ERROR
            emit("error", (code, first_line(payload)))
        else:
            emit("error", (ErrorCode.INTERNAL_ERROR, "the engine failed on this request (see the worker's log)"))

    return on_event
