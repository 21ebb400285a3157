"""EasyGen as an lmms-eval model: ``python -m lmms_eval --model easygen --model_args pretrained=DIR,...``.

Everything goes through the code ``easygen eval`` and ``easygen chat`` run: the one builder
(``runner.load_image_qa``), BiDiffuser features with their store, the prompt of
``EasyGenProcessor`` (the lmms-eval context restyled by ``lmms_prompt.user_text``), and

* ``generate_until``: ``runner.ImageQA``, batched (``batch_size`` requests with the same generation
  settings per ``generate`` call), the reply cut at the task's ``until`` strings;
* ``loglikelihood``: the reply's (loss, is_greedy) on the same prompts, as lmms-eval's llava scores
  a choice (multiple choice ranks the choices by the lowest loss);
* ``generate_until_multi_round`` and, with ``images_out=DIR``, every generation: the chat
  ``Assistant``, so a reply's ``<Img>...</Img>`` is drawn; such replies are the JSON string
  ``{"text": ..., "images": [png paths]}``, as lmms-eval's own image-generating models return them.

Settings: ``lmms_args``. Images from ``doc_to_visual`` are checked with BiDiffuser's image limits.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path

from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from bidiffuser.images import MAX_PIXELS, load_image

from ..constants import IGNORE_INDEX
from ..errors import EasyGenError
from ..features import image_bytes
from . import lmms_args, lmms_compat
from .lmms_prompt import user_text
from .runner import Dist, load_image_qa

LLAVA_IMAGE = "<image>"  # LLaVA's image mark, which some lmms-eval contexts carry
MAX_ROUNDS = 64          # a multi-round task that never says it is done is a bug, not a long chat
HF_KEYS = ("max_new_tokens", "min_new_tokens", "num_beams")

lmms_compat.install()  # (loss, is_greedy) pairs reach multiple choice, fresh or cached


class EasyGen(lmms):
    is_simple = True

    def __init__(self, **model_args):
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise EasyGenError("the easygen lmms-eval model runs in one process (no accelerate/torchrun launch)")
        self.settings = s = lmms_args.resolve(lmms_args.parse(model_args))
        self.batch_size = s.batch_size
        self.qa = load_image_qa(s.pretrained, s.model_base, s.lora, s.projector, s.bidiffuser, s.device, s.dtype,
                                Dist(), s.feature_steps, s.feature_scale, s.feature_seed, s.feature_cache,
                                s.batch_size, {}, s.bidiffuser_dtype, s.quantization)
        self.context = self.qa.context or 2048
        # The Assistant reads images from files: decoded visuals go here, named by content.
        self._uploads = Path(tempfile.mkdtemp(prefix="easygen-lmms-"))
        weakref.finalize(self, shutil.rmtree, self._uploads, True)

    # ------------------------------------------------------------------ inputs
    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    @staticmethod
    def _checked(visual, where: str):
        """A PIL image within BiDiffuser's limits, or an image file's path (checked by loading it)."""
        if isinstance(visual, Image.Image):
            if visual.width * visual.height > MAX_PIXELS or min(visual.size) < 1:
                raise EasyGenError(f"{where}: image of {visual.width}x{visual.height} pixels is outside the limits")
            return visual.convert("RGB")
        if isinstance(visual, (str, os.PathLike)):
            load_image(visual)  # one line naming the file when it is not an image (a video, say)
            return str(visual)  # features keyed by the file's bytes, as `easygen eval` keys them
        raise EasyGenError(f"{where}: EasyGen reads images only, got {type(visual).__name__}")

    def _visuals(self, visuals, where: str) -> list:
        flat = []
        for v in visuals or []:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return [self._checked(v, where) for v in flat]

    def _upload(self, image) -> str:
        """A file holding ``image`` for the Assistant (the PNG bytes the feature key is taken from)."""
        if not isinstance(image, Image.Image):
            return image
        data = image_bytes(image)
        path = self._uploads / f"{hashlib.sha256(data).hexdigest()}.png"
        if not path.exists():
            path.write_bytes(data)
        return str(path)

    def _text(self, context: str) -> str:
        return user_text(context, self.settings.prompt_style)

    # ------------------------------------------------------------------ decoding
    def _decoding(self, gen_kwargs: dict) -> tuple[dict, list[str], float, float]:
        """(HF generate kwargs, stop strings, temperature, top_p) from a task's generation_kwargs.
        Sampling iff temperature > 0 (do_sample=true without one samples at 1)."""
        gen = dict(gen_kwargs or {})
        until = gen.get("until") or []
        stop = [until] if isinstance(until, str) else [u for u in until if u]
        temperature = float(gen.get("temperature") or 0)
        if gen.get("do_sample") and temperature == 0:
            temperature = 1.0
        top_p = float(gen.get("top_p") or 1.0)
        hf = {k: int(gen[k]) for k in HF_KEYS if gen.get(k) is not None}
        hf.setdefault("max_new_tokens", min(512, self.context // 2))
        hf.setdefault("num_beams", 1)
        hf["do_sample"] = temperature > 0
        if temperature > 0:
            hf.update(temperature=temperature, top_p=top_p)
        return hf, stop, temperature, top_p

    def _batches(self, requests):
        """Lists of (index, args) of ``batch_size`` requests sharing task and generation settings."""
        groups: dict[str, list] = {}
        for i, req in enumerate(requests):
            args = req.args
            key = json.dumps([args[4], args[1]], sort_keys=True, default=str) if isinstance(args[1], dict) else str(i)
            groups.setdefault(key, []).append((i, args))
        for items in groups.values():
            for start in range(0, len(items), self.batch_size):
                yield items[start:start + self.batch_size]

    # ------------------------------------------------------------------ lmms-eval's interface
    def generate_until(self, requests) -> list[str]:
        if self.settings.images_out is not None:
            return self._generate_with_pictures(requests)
        import torch

        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="EasyGen answering")
        for batch in self._batches(requests):
            hf, stop, _, _ = self._decoding(batch[0][1][1])
            texts, images, where = [], [], []
            for _, (context, _, doc_to_visual, doc_id, task, split) in batch:
                w = f"{task} doc {doc_id}"
                texts.append(self._text(context))
                images.append(self._visuals(doc_to_visual(self._doc(task, split, doc_id)), w))
                where.append(w)
            if hf["do_sample"] and self.settings.seed is not None:
                torch.manual_seed(self.settings.seed)
            for (i, _), reply in zip(batch, self.qa(texts, images, where, hf, stop)):
                out[i] = reply
            bar.update(len(batch))
        bar.close()
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Per request, lmms-eval's llava convention: (the loss, i.e. the mean negative log-likelihood of
        the continuation's tokens given the image and the context, the template's closing "</s>"
        included; whether greedy decoding gives exactly those tokens). The continuation is scored as
        the assistant's reply, labelled as training labels it."""
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        items = list(enumerate(requests))
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="EasyGen scoring")
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            rows, images = [], []
            for _, req in batch:
                context, continuation, doc_to_visual, doc_id, task, split = req.args
                doc, where = self._doc(task, split, doc_id), f"{task} doc {doc_id}"
                visuals = self._visuals(doc_to_visual(doc) if doc_to_visual else [], where)
                reply = continuation if isinstance(continuation, str) else continuation(doc)
                rows.append(self._labelled(self._text(context), visuals, reply, where))
                images.extend(visuals)
            for (i, _), scored in zip(batch, self._losses(rows, images)):
                out[i] = scored
            bar.update(len(batch))
        bar.close()
        return out

    def _labelled(self, text: str, visuals: list, reply: str, where: str) -> dict:
        """Ids and labels of the user turn and ``reply`` (labels on the reply and its "</s>")."""
        row = self.qa.processor.tokenize_conversation([{"role": "user", "content": text, "num_images": len(visuals)},
                                                       {"role": "assistant", "content": reply.strip()}])
        if all(label == IGNORE_INDEX for label in row["labels"]):
            raise EasyGenError(f"{where}: the continuation {reply!r} is empty")
        if len(row["input_ids"]) > self.context:
            raise EasyGenError(f"{where}: prompt and continuation ({len(row['input_ids'])} tokens) exceed the "
                               f"model's context of {self.context}")
        return row

    def _losses(self, rows: list[dict], images: list) -> list[tuple[float, bool]]:
        """(mean NLL over the labelled tokens, whether each is the argmax) for each row, one forward."""
        import torch

        batch = self.qa.processor.pad_batch([r["input_ids"] for r in rows], side="right",
                                            labels=[r["labels"] for r in rows])
        device = self.qa.model.device
        feats = self.qa.features(images).to(device) if images else None
        with torch.inference_mode():
            logits = self.qa.model(input_ids=batch["input_ids"].to(device), image_features=feats,
                                   attention_mask=batch["attention_mask"].to(device)).logits.float()
        logp = logits[:, :-1].log_softmax(-1)  # position t predicts token t + 1
        target = batch["labels"][:, 1:].to(device)
        scored = target != IGNORE_INDEX
        token_logp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0].masked_fill(~scored, 0)
        loss = -token_logp.sum(1) / scored.sum(1)
        greedy = ((logp.argmax(-1) == target) | ~scored).all(1)
        return [(float(n), bool(g)) for n, g in zip(loss, greedy)]

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """Each request is one conversation with the chat ``Assistant``: round 0 is the context and the
        doc's visuals; then the task's ``doc_to_text(doc, previous_output=, round_idx=,
        previous_round_info=)`` gives (visuals, context, done, outputs, info) until done."""
        out = []
        for req in tqdm(requests, disable=self.rank != 0, desc="EasyGen conversing"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc, where = self._doc(task, split, doc_id), f"{task} doc {doc_id}"
            assistant = self._assistant(gen_kwargs, task, doc_id)
            visuals, answers, info = doc_to_visual(doc), [], None
            for round_idx in range(1, MAX_ROUNDS + 1):
                answers.append(self._send(assistant, context, visuals, where))
                visuals, context, done, returned, info = doc_to_text(
                    doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info)
                answers = list(returned) if returned is not None else answers
                if done:
                    break
            else:
                raise EasyGenError(f"{where}: the task asked for more than {MAX_ROUNDS} rounds")
            out.append(answers)
        return out

    # ------------------------------------------------------------------ the Assistant (pictures, rounds)
    def _assistant(self, gen_kwargs: dict, task: str, doc_id):
        from ..assistant import Assistant, GenerationSettings

        hf, stop, temperature, top_p = self._decoding(gen_kwargs)
        s = self.settings
        settings = GenerationSettings(temperature=temperature, top_p=top_p, max_new_tokens=hf["max_new_tokens"],
                                      num_beams=hf["num_beams"], seed=s.seed, image_steps=s.image_steps,
                                      image_scale=s.image_scale, stop=tuple(stop))
        out_dir = Path(s.images_out or self._uploads / "drawn") / str(task) / str(doc_id)
        return Assistant(self.qa.loaded, settings, out_dir=out_dir, features=self.qa.features)

    def _message(self, context: str, visuals, where: str) -> tuple[str, list[str]]:
        """The Assistant's user turn: the restyled text (LLaVA's image mark dropped) and image files."""
        paths = [self._upload(v) for v in self._visuals(visuals, where)]
        return self._text(context).replace(LLAVA_IMAGE, "").strip() or " ", paths

    def _answer(self, reply) -> str:
        if self.settings.images_out is None:
            return reply.text
        return json.dumps({"text": reply.text, "images": [str(p) for p in reply.image_paths]}, ensure_ascii=False)

    def _send(self, assistant, context: str, visuals, where: str) -> str:
        return self._answer(assistant.send(*self._message(context, visuals, where)))

    def _generate_with_pictures(self, requests) -> list[str]:
        """generate_until with images_out: one Assistant turn per request, rows generated together
        (beam search: one at a time), then each reply's pictures drawn."""
        out: list[str | None] = [None] * len(requests)
        for batch in self._batches(requests):
            turns = []
            for _, (context, gen_kwargs, doc_to_visual, doc_id, task, split) in batch:
                assistant = self._assistant(gen_kwargs, task, doc_id)
                visuals = doc_to_visual(self._doc(task, split, doc_id))
                turns.append((assistant, assistant.prepare(*self._message(context, visuals, f"{task} doc {doc_id}"))))
            g = turns[0][0].settings
            groups = [turns] if g.num_beams == 1 else [[t] for t in turns]
            for group in groups:
                self.qa.loaded.llm.generate([t.row for _, t in group], g.temperature, g.top_p, g.num_beams, g.seed)
            for (i, _), (assistant, turn) in zip(batch, turns):
                out[i] = self._answer(assistant.complete(turn))
        return out
