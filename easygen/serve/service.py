"""The queue in front of the engine, shared by every HTTP front (the OpenAI API, the web page, the
FastChat worker).

With the in-process LLM, one engine thread owns the model. Requests wait in a bounded queue (a full
queue is refused at once, so the front can answer 429); when the thread takes a chat turn it also
takes the turns waiting behind it that sample the same way and answers them in one batched
``generate`` call, each still streaming its own text. A job whose client went away is skipped if it
is still waiting, and stops at its next token (or drawing step) if it is running.

With an LLM engine that batches by itself (vLLM: ``engine.concurrent``), ``max_batch`` threads each
take one turn at a time and hand it to the engine, which batches whatever is in flight (continuous
batching); the work that stays in this process (reading images, projecting them, drawing) runs one
turn at a time under a lock.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from bidiffuser.errors import BiDiffuserError, first_line

from ..assistant import CONVERSATION_FORMAT, CONVERSATION_VERSION, Assistant, Cancelled, GenerationSettings
from ..builder import LoadedModel
from ..features import ImageFeatureExtractor
from ..image_reply import render_image_replies

log = logging.getLogger("easygen.serve")

# emit(kind, payload) from the engine thread: ("text", str), ("progress", (step, total)),
# ("done", Reply | list[Path]), ("error", Exception)
Emit = Callable[[str, object], None]


class LRUMemo(OrderedDict):
    """A dict that keeps the ``size`` most recently used entries (features of recent images)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: {retry_after} s")
        self.retry_after = retry_after


@dataclass
class ChatJob:
    """One chat turn: the history (``Assistant.messages`` form, images by path), the new user turn."""
    history: list[dict]
    text: str
    images: list[str]
    settings: GenerationSettings
    emit: Emit
    system: str = ""
    force_image: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: bool = False  # its last event was sent (set under the service's lock)

    def batch_key(self):
        """Jobs with equal keys can share one generate call (a seeded job runs alone: reproducible)."""
        s = self.settings
        if s.seed is not None or s.num_beams > 1:
            return None
        return (s.temperature, s.top_p)


@dataclass
class DrawJob:
    """Text to image: ``n`` pictures of ``prompt``."""
    prompt: str
    n: int
    emit: Emit
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: bool = False

    def batch_key(self):
        return None


class ChatService:
    def __init__(self, loaded: LoadedModel, features: ImageFeatureExtractor | None, out_dir: str | Path,
                 settings: GenerationSettings, max_queue: int = 64, max_batch: int = 8):
        self.loaded, self.features, self.out_dir = loaded, features, Path(out_dir)
        self.settings = settings           # the server's defaults (steps, scale, max_new_tokens, ...)
        self.max_queue, self.max_batch = max_queue, max_batch
        self._queue: deque = deque()
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False
        self.llm = loaded.llm
        self._local = threading.Lock()     # this process's model work (images, projector, drawing)
        self._seconds_per_job = 1.0        # running average, for Retry-After
        # uploads are files named by their content hash, so a path always means the same image
        self._feature_memo = LRUMemo(256)
        self.stats = {"jobs": 0, "batches": 0, "largest_batch": 0, "cancelled": 0}
        threads = max_batch if self.llm.concurrent else 1
        self._threads = [threading.Thread(target=self._loop, name=f"easygen-engine-{k}", daemon=True)
                         for k in range(threads)]

    # -- the fronts' side ---------------------------------------------------------------------------
    def start(self) -> "ChatService":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop taking jobs, end the engine threads, and close the LLM engine (a vLLM server this
        process started stops with it)."""
        with self._cond:
            self._closed = True
            for job in self._queue:
                job.cancelled.set()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        self.llm.close()

    def submit(self, job: ChatJob | DrawJob) -> None:
        """Queue ``job``; raises QueueFull when ``max_queue`` jobs are already waiting or running."""
        with self._cond:
            if self._closed:
                raise QueueFull(5)
            if len(self._queue) + self._running >= self.max_queue:
                raise QueueFull(max(1, round(self._seconds_per_job * (len(self._queue) + 1) / self.max_batch)))
            self._queue.append(job)
            self._cond.notify()

    def status(self) -> dict:
        with self._cond:
            return {"queue_length": len(self._queue), "running": self._running, "max_queue": self.max_queue,
                    "max_batch": self.max_batch, **self.stats}

    @property
    def model_settings(self) -> GenerationSettings:
        return self.settings

    def assistant(self, settings: GenerationSettings | None = None, system: str = "") -> Assistant:
        """A fresh conversation over the shared model (cheap: the model and feature cache are shared)."""
        return Assistant(self.loaded, settings or self.settings, out_dir=self.out_dir, features=self.features,
                         system_message=system, feature_memo=self._feature_memo)

    # -- the engine thread --------------------------------------------------------------------------
    def _end(self, job, kind: str, payload) -> None:
        """A job's last event (once: a later call for the same job does nothing); it stops counting
        as running first, so /health and the worker's queue length never lag behind an answer the
        client already has."""
        with self._cond:
            if job.ended:
                return
            job.ended = True
            self._running -= 1
        job.emit(kind, payload)

    def _take(self) -> list | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._queue.popleft()
            batch = [first]
            key = None if self.llm.concurrent else first.batch_key()
            if key is not None:
                for job in list(self._queue):
                    if len(batch) >= self.max_batch:
                        break
                    if isinstance(job, ChatJob) and job.batch_key() == key:
                        self._queue.remove(job)
                        batch.append(job)
            live = [j for j in batch if not j.cancelled.is_set()]  # clients that left while waiting
            self.stats["cancelled"] += len(batch) - len(live)
            batch = live
            self._running += len(batch)
            if batch:
                self.stats["jobs"] += len(batch)
                self.stats["batches"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            start = time.perf_counter()
            try:
                if batch and isinstance(batch[0], DrawJob):
                    self._draw(batch[0])
                elif batch:
                    self._chat(batch)
            except Exception as e:  # never let one bad turn stop the engine
                if not isinstance(e, BiDiffuserError):
                    log.exception("engine error")
                for job in batch:
                    self._end(job, "error", e)
            finally:
                if batch:
                    took = (time.perf_counter() - start) / len(batch) * min(len(batch), self.max_batch)
                    self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * took

    def _chat(self, jobs: list[ChatJob]) -> None:
        ready = []  # (job, assistant, turn)
        for job in jobs:
            try:
                a = self.assistant(job.settings, job.system)
                a.from_json({"format": CONVERSATION_FORMAT, "version": CONVERSATION_VERSION,
                             "messages": job.history}, source="messages")
                emit = job.emit
                with self._local:
                    turn = a.prepare(job.text, job.images, on_token=lambda piece, emit=emit: emit("text", piece),
                                     should_stop=job.cancelled.is_set)
                ready.append((job, a, turn))
            except BiDiffuserError as e:
                self._end(job, "error", e)
        if not ready:
            return
        s = ready[0][0].settings
        self.llm.generate([t.row for _, _, t in ready], s.temperature, s.top_p, s.num_beams, s.seed)
        for job, a, turn in ready:
            try:
                with self._local:
                    reply = a.complete(turn, lambda step, total, job=job: job.emit("progress", (step, total)),
                                       force_image=job.force_image)
                self._end(job, "done", reply)
            except Cancelled:
                self._end(job, "error", Cancelled("stopped"))
            except BiDiffuserError as e:
                self._end(job, "error", e)

    def _draw(self, job: DrawJob) -> None:
        if self.loaded.drawer is None:
            self._end(job, "error", BiDiffuserError("this server has nothing that draws (no BiDiffuser, "
                                                    "no --draw-with backend)"))
            return
        s = self.settings

        def progress(step: int, total: int) -> None:
            if job.cancelled.is_set():
                raise Cancelled("stopped")
            job.emit("progress", (step, total))

        try:
            with self._local:
                paths = render_image_replies(self.loaded.drawer, [job.prompt] * job.n, self.out_dir,
                                             s.image_steps, s.image_scale, job.seed, progress)
            self._end(job, "done", paths)
        except Cancelled as e:
            self._end(job, "error", e)
        except BiDiffuserError as e:
            self._end(job, "error", BiDiffuserError(first_line(e)))


def with_overrides(settings: GenerationSettings, **changes) -> GenerationSettings:
    """``settings`` with the non-None ``changes`` applied."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
