"""``Assistant``: one conversation with EasyGen. The CLI, the evaluation and any server are thin
layers over it.

A turn: the user's text and images -> the prompt (FastChat template, image slots) -> BiDiffuser
features for every image in the kept history -> streamed generation -> any ``<Img>...</Img>`` in
the answer drawn by BiDiffuser and saved as PNG.

A conversation saves to JSON (``save`` / ``load``, or ``to_json`` / ``from_json``) with its images
by absolute path: user uploads under ``images``, pictures the assistant drew under ``generated``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, MutableMapping, NoReturn

import torch

from bidiffuser.checkpoint import atomic_path, read_json
from bidiffuser.errors import BiDiffuserError
from bidiffuser.images import load_image
from drawing import draw_in_batches
from fastchat_ext.conversation import LLAVA_IMAGE_TOKEN

from .builder import LoadedModel
from .constants import IMAGE_PLACEHOLDER, IMG_CLOSE, IMG_OPEN
from .errors import EasyGenError
from .features import ImageFeatureExtractor
from .generation import Row
from .image_reply import find_image_requests, has_stray_tags, render_image_replies

CONVERSATION_FORMAT, CONVERSATION_VERSION = "easygen-conversation", 1


@dataclass
class GenerationSettings:
    temperature: float = 0.2     # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    num_beams: int = 1
    seed: int | None = None      # set for reproducible sampling
    image_steps: int | None = None    # steps for image replies (None: the drawing backend's default)
    image_scale: float | None = None  # guidance scale for image replies (None: the backend's default)
    stop: tuple[str, ...] = ()   # the answer ends before the first of these strings


@dataclass
class Reply:
    text: str
    image_paths: list[Path] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # e.g. "dropped 1 old turn to fit the context"
    image_descriptions: list[str] = field(default_factory=list)  # what each picture shows, in order
    finish_reason: str = "stop"  # "stop" (end of answer or a stop string) or "length" (max_new_tokens)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Cancelled(EasyGenError):
    """The turn was stopped by its ``should_stop`` check (the client went away)."""


@dataclass
class Turn:
    """A user turn made ready for generation: the history that fits, the prompt ids, the images'
    features. ``Assistant.prepare`` makes it, the LLM engine (``loaded.llm``) answers it (alone or
    batched with others), ``Assistant.complete`` draws the pictures and commits it."""
    kept: list[dict]
    ids: list[int]
    features: torch.Tensor | None
    notices: list[str]
    row: Row


# Forcing a picture: the answer is continued after this, and the description ends at IMG_CLOSE.
FORCED_DESCRIPTION_TOKENS = 64


class Assistant:
    def __init__(self, loaded: LoadedModel, settings: GenerationSettings | None = None,
                 out_dir: str | os.PathLike = "easygen-images", features: ImageFeatureExtractor | None = None,
                 feature_cache: str | os.PathLike | None = None, system_message: str = "",
                 feature_memo: MutableMapping[str, torch.Tensor] | None = None):
        self.model, self.processor, self.pipe = loaded.model, loaded.processor, loaded.bidiffuser
        self.drawer = loaded.drawer
        self.llm = loaded.llm  # what answers the prompts (easygen.generation.TransformersEngine or vLLM)
        self.settings = settings or GenerationSettings()
        self.out_dir = Path(out_dir)
        if features is None and self.pipe is not None:
            features = ImageFeatureExtractor(self.pipe, cache_dir=feature_cache)
        self.features = features
        self.system_message = system_message  # EasyGen is trained with none; servers may pass one
        # {"role": "user"|"assistant", "content": str, "images": [path]}; assistant turns also have
        # "generated": [png path] (their "images" stay empty; the model sees the generated pictures
        # in the next user turn, see _shown_images)
        self.messages: list[dict] = []
        # image path -> features; a server shares one (bounded) memo between its conversations
        self._feature_memo = {} if feature_memo is None else feature_memo
        self.profiler = None  # an easygen.profiling.Profiler times each phase of a turn when set

    def _phase(self, name: str):
        return contextlib.nullcontext() if self.profiler is None else self.profiler.phase(name)

    def reset(self) -> None:
        self.messages.clear()

    @property
    def max_new_tokens(self) -> int:
        """The answer's budget: as asked, but never more than half the model's context, so a
        small-context model still leaves room for the conversation."""
        return min(self.settings.max_new_tokens, self.model.config.max_position_embeddings // 2)

    @property
    def context_limit(self) -> int:
        """Prompt tokens allowed: the model's context minus room for the answer."""
        return self.model.config.max_position_embeddings - self.max_new_tokens

    @staticmethod
    def _shown_images(messages: list[dict], show_drawn: bool = True) -> list[list[str]]:
        """The images each message shows the model. A picture the assistant drew is shown at the
        start of the next user turn, before that turn's uploads, so the user can ask about it like
        about an upload; when trimming drops the exchange that drew it, it goes with it.
        ``show_drawn`` False: a model without an image reader (no BiDiffuser) is not shown them."""
        if not show_drawn:
            return [list(m["images"]) if m["role"] == "user" else [] for m in messages]
        shown, drawn = [], []
        for m in messages:
            if m["role"] == "user":
                shown.append(drawn + m["images"])
                drawn = []
            else:
                shown.append([])
                drawn = list(m.get("generated", []))
        return shown

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        msgs = [{"role": m["role"], "content": m["content"], "num_images": len(images)} if m["role"] == "user"
                else {"role": m["role"], "content": m["content"]}
                for m, images in zip(messages, self._shown_images(messages, self.features is not None))]
        return self.processor.tokenize_prompt(self.processor.build_prompt(msgs, system=self.system_message))

    def _fit_context(self, messages: list[dict]) -> tuple[list[dict], list[int], list[str]]:
        """The messages that fit (oldest exchanges dropped first), their prompt ids, and notices.
        The new (last) message alone must fit. ``messages`` itself is not changed."""
        dropped = 0
        ids = self._prompt_ids(messages)
        while len(ids) > self.context_limit and len(messages) > 1:
            messages = messages[2:]  # one user turn and its answer
            dropped += 1
            ids = self._prompt_ids(messages)
        if len(ids) > self.context_limit:
            raise EasyGenError(f"message too long: the prompt is {len(ids)} tokens but the context allows "
                               f"{self.context_limit} (context {self.model.config.max_position_embeddings} "
                               f"minus max_new_tokens {self.max_new_tokens})")
        notices = [f"dropped the {dropped} oldest exchange{'s' * (dropped > 1)} to fit the context"] if dropped else []
        return messages, ids, notices

    def _image_features(self, messages: list[dict]) -> torch.Tensor | None:
        paths = [p for images in self._shown_images(messages, self.features is not None) for p in images]
        if not paths:
            return None
        missing = [p for p in dict.fromkeys(paths) if p not in self._feature_memo]
        if missing:
            self._feature_memo.update(zip(missing, self.features(missing)))
        return torch.stack([self._feature_memo[p] for p in paths])

    def send(self, text: str, images: list[str | os.PathLike] = (), on_token: Callable[[str], None] | None = None,
             on_image_progress: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None, force_image: bool = False) -> Reply:
        """Add a user turn (text and/or images), generate the answer (streamed to ``on_token``),
        draw any requested images. On any error the conversation is left as it was.

        ``should_stop`` is polled while the answer is written and drawn (True raises ``Cancelled``);
        ``force_image`` makes the answer end in a picture when the model did not ask for one."""
        turn = self.prepare(text, images, on_token=on_token, should_stop=should_stop)
        s = self.settings
        with self._phase("generate"):
            self.llm.generate([turn.row], s.temperature, s.top_p, s.num_beams, s.seed)
        return self.complete(turn, on_image_progress, force_image=force_image)

    def prepare(self, text: str, images: list[str | os.PathLike] = (), on_token: Callable[[str], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> Turn:
        """Check the new user turn, fit the history to the context and read the images (BiDiffuser)."""
        text = text.strip()
        if not text and not images:
            raise EasyGenError("empty message")
        reserved = [m for m in (IMAGE_PLACEHOLDER, LLAVA_IMAGE_TOKEN) if m in text]
        if reserved:  # in a prompt these mark image slots; typed text must not create slots
            raise EasyGenError(f"the message contains {reserved[0]}, which marks image slots; attach images "
                               f"as files instead")
        if images and self.features is None:
            raise EasyGenError("images need a BiDiffuser model directory (--bidiffuser)")
        paths = []
        for p in images:
            path = str(Path(p).resolve())
            if path not in self._feature_memo:  # (an image already read needs no second check)
                load_image(p)  # a bad file fails now, with its name, before anything changes
            paths.append(path)
        user = {"role": "user", "content": text, "images": paths}
        # Work on a new list: an error or Ctrl-C leaves the session as it was before this turn.
        kept, ids, notices = self._fit_context(self.messages + [user])
        with self._phase("features"):
            features = self._image_features(kept)
        row = Row(ids, features, self.max_new_tokens, tuple(self.settings.stop), on_token, should_stop)
        return Turn(kept, ids, features, notices, row)

    def complete(self, turn: Turn, on_image_progress: Callable[[int, int], None] | None = None,
                 force_image: bool = False) -> Reply:
        """The reply to a generated turn: pictures drawn, the turn added to the conversation."""
        row = turn.row
        if row.finish_reason == "cancelled":
            raise Cancelled("stopped")
        answer = row.text.strip()
        requests = find_image_requests(answer)
        if force_image and not requests and self.drawer is not None:
            with self._phase("generate the picture's description"):
                answer = self._force_image(turn, answer)
            requests = find_image_requests(answer)
        reply = Reply(answer, notices=list(turn.notices), finish_reason=row.finish_reason or "stop",
                      prompt_tokens=len(turn.ids), completion_tokens=len(row.tokens))
        if has_stray_tags(answer):
            reply.notices.append("the answer has an unfinished picture tag; its words are shown as text, "
                                 "no picture was drawn for them")
        if requests:
            if self.drawer is None:
                reply.notices.append("the answer asks for an image but nothing that draws is loaded "
                                     "(no BiDiffuser, no --draw-with backend)")
            else:
                s = self.settings

                def progress(step: int, total: int) -> None:
                    if row.should_stop is not None and row.should_stop():
                        raise Cancelled("stopped")
                    if on_image_progress is not None:
                        on_image_progress(step, total)

                with self._phase("draw"):
                    reply.image_paths = render_image_replies(self.drawer, requests, self.out_dir, s.image_steps,
                                                             s.image_scale, s.seed, progress)
                reply.image_descriptions = list(requests)
        # Committed last: Ctrl-C while the picture is drawn drops the whole turn, as during generation.
        self.messages = turn.kept + [{"role": "assistant", "content": answer, "images": [],
                                      "generated": [str(Path(p).resolve()) for p in reply.image_paths]}]
        return reply

    def draw(self, descriptions: list[str], seeds: list[int | None]) -> list:
        """One picture (PIL) per description, as an image reply draws it (this model's drawing backend;
        the settings' steps and scale), with its own seed; batched as the backend allows."""
        s = self.settings
        if self.drawer is None:
            raise EasyGenError("drawing needs a BiDiffuser model directory (--bidiffuser) or a --draw-with backend")
        return draw_in_batches(self.drawer, descriptions, seeds, steps=s.image_steps, guidance=s.image_scale)

    def _force_image(self, turn: Turn, answer: str) -> str:
        """Continue ``answer`` with IMG_OPEN and let the model write the description, up to IMG_CLOSE."""
        head = (answer + " " if answer else "") + IMG_OPEN
        # A fresh stretch of text starts with the word-start marker: the space after "ASSISTANT:".
        ids = turn.ids + self.processor.tokenizer(head, add_special_tokens=False).input_ids
        if turn.row.on_text is not None:
            turn.row.on_text((" " if answer else "") + IMG_OPEN)
        row = Row(ids, turn.features, FORCED_DESCRIPTION_TOKENS, (IMG_CLOSE,), turn.row.on_text, turn.row.should_stop)
        s = self.settings
        self.llm.generate([row], s.temperature, s.top_p, 1, s.seed)
        if row.finish_reason == "cancelled":
            raise Cancelled("stopped")
        turn.row.tokens += row.tokens
        description = row.text.replace(IMG_OPEN, " ").strip() or "a picture"
        if turn.row.on_text is not None:
            turn.row.on_text(IMG_CLOSE)
        return f"{head}{description}{IMG_CLOSE}"

    # -- saving and loading -------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The conversation as JSON-ready data; ``from_json`` reads it back."""
        return {"format": CONVERSATION_FORMAT, "version": CONVERSATION_VERSION,
                "messages": copy.deepcopy(self.messages)}

    def from_json(self, data, source: str = "conversation", base_dir: str | os.PathLike | None = None) -> None:
        """Replace the conversation with ``data`` (as ``to_json`` writes it). Everything is checked
        first (roles alternate from user to assistant, user images are readable image files, relative
        paths taken from ``base_dir``); a problem raises ``EasyGenError("source: problem")`` and
        leaves the conversation as it was."""
        self.messages = _parse_conversation(data, source, Path(base_dir or "."))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the conversation as JSON, atomically (a crash never leaves half a file)."""
        path = Path(path)
        if path.is_dir():
            raise EasyGenError(f"{path}: is a directory (give a file name)")
        try:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            raise EasyGenError(f"{path}: cannot write: {e.strerror or e}") from None
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Replace the conversation with the one saved in ``path`` (see ``from_json``)."""
        path = Path(path)
        data = read_json(path, "conversation file")
        self.from_json(data, source=str(path), base_dir=path.parent)


def _parse_conversation(data, source: str, base_dir: Path) -> list[dict]:
    """Checked messages in ``Assistant.messages`` form, or a one-line EasyGenError naming ``source``."""
    def fail(problem: str) -> NoReturn:
        raise EasyGenError(f"{source}: {problem}")

    if not isinstance(data, dict) or data.get("format") != CONVERSATION_FORMAT:
        fail(f'not an EasyGen conversation (expected "format": "{CONVERSATION_FORMAT}")')
    if data.get("version") != CONVERSATION_VERSION:
        fail(f"unsupported version {data.get('version')!r} (this EasyGen reads version {CONVERSATION_VERSION})")
    raw = data.get("messages")
    if not isinstance(raw, list):
        fail('"messages" must be a list')
    if len(raw) % 2:
        fail(f"{len(raw)} messages: a conversation holds user/assistant pairs")
    messages = []
    for i, m in enumerate(raw):
        where, role = f"message {i + 1}", ("user", "assistant")[i % 2]
        if not isinstance(m, dict) or m.get("role") != role:
            fail(f"{where}: expected an object with \"role\": \"{role}\" (roles alternate, user first)")
        content, images, generated = m.get("content"), m.get("images", []), m.get("generated", [])
        if not isinstance(content, str):
            fail(f'{where}: "content" must be a string')
        for key, value in (("images", images), ("generated", generated)):
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                fail(f'{where}: "{key}" must be a list of paths')
        if role == "assistant" and images:
            fail(f'{where}: an assistant turn has no input images (its pictures go under "generated")')
        if role == "user" and not content.strip() and not images:
            fail(f"{where}: empty message")
        paths = []
        # Drawn pictures are shown to the model in the next turn: both kinds must be readable now,
        # or every later turn would fail.
        for p in images or generated:
            path = (base_dir / Path(p).expanduser()).resolve()
            try:
                load_image(path)
            except BiDiffuserError as e:
                fail(f"{where}: {e}")
            paths.append(str(path))
        if role == "assistant":
            messages.append({"role": role, "content": content, "images": [], "generated": paths})
            continue
        messages.append({"role": role, "content": content, "images": paths})
    return messages
