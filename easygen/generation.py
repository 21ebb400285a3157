"""Text generation for one or several prompts in one ``generate`` call (left-padded rows).

Each row streams its own text, stops on its own (end of sequence, a stop string, its own
``max_new_tokens``, or a cancel request) and reports why it stopped, so a server can batch the
requests that are waiting while each client still sees its own answer arrive token by token. A
single conversation (``Assistant.send``) is simply a batch of one.

An LLM engine answers rows: ``TransformersEngine`` (here, the default) runs the model in this
process; ``easygen.vllm_engine.VLLMEngine`` sends each row to vLLM. Both feed the tokens they get
through the same ``RowStreamer``, so stop strings, length limits, cancellation and the streamed
pieces are decided by the same code whatever engine runs the LLM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


@dataclass
class Row:
    """One prompt to continue. ``features``: its images' features (N x T x D) in prompt order."""
    ids: list[int]
    features: torch.Tensor | None = None
    max_new_tokens: int = 512
    stop: Sequence[str] = ()
    on_text: Callable[[str], None] | None = None       # streamed pieces of the answer
    should_stop: Callable[[], bool] | None = None       # e.g. the client went away
    # filled in by generate_rows
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None                    # "stop", "length" or "cancelled"
    _emitted: int = 0


class RowStreamer(BaseStreamer):
    """Receives each step's new token of every row: decodes, streams, checks stop conditions."""

    def __init__(self, rows: list[Row], tokenizer, eos_ids: set[int]):
        self.rows, self.tokenizer, self.eos_ids = rows, tokenizer, eos_ids
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt ids (none: we pass embeddings)
            self.prompt_seen = True
            if value.dim() > 1:
                return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            if row.finish_reason is not None:
                continue
            if token in self.eos_ids:
                self.finish(row, "stop")
                continue
            row.tokens.append(token)
            self._update(row)

    def _update(self, row: Row) -> None:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        for s in row.stop:
            at = text.find(s)
            if s and at >= 0:
                row.text = text[:at]
                self.finish(row, "stop")
                return
        row.text = text
        if len(row.tokens) >= row.max_new_tokens:
            self.finish(row, "length")
        elif row.should_stop is not None and row.should_stop():
            self.finish(row, "cancelled")
        else:
            self._emit(row, hold_back=max((len(s) - 1 for s in row.stop), default=0))

    def finish(self, row: Row, reason: str) -> None:
        row.finish_reason = reason
        self._emit(row, hold_back=0)

    def _emit(self, row: Row, hold_back: int) -> None:
        """Stream what is certain: whole words (a word's later tokens can change how its first ones
        decode, e.g. a character split over byte tokens), never the start of a stop string."""
        end = len(row.text) - hold_back
        if row.finish_reason is None:
            end = min(end, max(row.text.rfind(" "), row.text.rfind("\n")) + 1)
        if end > row._emitted:
            piece = row.text[row._emitted:end]
            row._emitted = end
            if row.on_text is not None:
                row.on_text(piece)

    def end(self) -> None:
        for row in self.rows:
            if row.finish_reason is None:  # generate stopped at its own length limit
                self.finish(row, "length")


class _RowsDone(StoppingCriteria):
    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([r.finish_reason is not None for r in self.rows], device=input_ids.device)


def eos_ids(model) -> set[int]:
    """The ids that end an answer (the generation config's, one or several)."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def reset_rows(rows: list[Row]) -> None:
    for row in rows:
        row.tokens, row.text, row.finish_reason, row._emitted = [], "", None, 0


def generate_rows(model, processor, rows: list[Row], temperature: float = 0.0, top_p: float = 1.0,
                  num_beams: int = 1, seed: int | None = None) -> list[Row]:
    """Continue every row's prompt; fills each row's ``text``, ``tokens`` and ``finish_reason``.

    Rows share the sampling settings; each has its own length limit, stop strings and cancel check.
    Beam search takes one row and cannot stream (its text arrives whole at the end).
    """
    if not rows:
        return rows
    if num_beams > 1 and len(rows) > 1:
        raise ValueError("beam search generates one row at a time")
    reset_rows(rows)
    batch = processor.pad_batch([r.ids for r in rows], side="left")
    device = model.device
    features = [r.features for r in rows if r.features is not None]
    kwargs = dict(max_new_tokens=max(r.max_new_tokens for r in rows), num_beams=num_beams,
                  pad_token_id=processor.pad_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False)
    streamer = RowStreamer(rows, processor.tokenizer, eos_ids(model))
    if num_beams == 1:
        kwargs.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]))
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         image_features=torch.cat(features) if features else None, **kwargs)
    if num_beams > 1:  # no streamer ran: read the finished sequence the same way
        streamer.prompt_seen = True
        for token in out[0].tolist():
            if rows[0].finish_reason is not None:
                break
            streamer.put(torch.tensor([token]))
    streamer.end()
    return rows


class TransformersEngine:
    """The LLM in this process: one ``generate`` call answers a batch of rows (``generate_rows``)."""
    name = "transformers"
    concurrent = False  # one call at a time: the chat service batches waiting rows into it

    def __init__(self, model, processor):
        self.model, self.processor = model, processor

    def generate(self, rows: list[Row], temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1,
                 seed: int | None = None) -> list[Row]:
        return generate_rows(self.model, self.processor, rows, temperature, top_p, num_beams, seed)

    def describe(self) -> str:
        return "transformers (in process)"

    def close(self) -> None:
        pass
