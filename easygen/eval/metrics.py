"""Scores: COCO caption metrics through pycocoevalcap, and the official VQA accuracy.

Captioning follows the COCO caption evaluation exactly (what LAVIS and every paper table use): the
Stanford PTB tokenizer (Java) lower-cases, tokenizes and drops punctuation from references and
predictions alike, then BLEU-1..4, METEOR (Java), ROUGE-L and CIDEr(-D) score them, each called as
``compute_score(gts, res)``. Scores are reported x100. Without Java the PTB tokenizer and METEOR
cannot run: a simple regex tokenizer stands in, METEOR is left out, and the result is labelled
non-comparable (numbers close to, but not equal to, published ones).

VQA accuracy follows the official evaluation (github.com/GT-Vision-Lab/VQA, ``vqaEval.py``),
quirks included, because published numbers are computed with them:

- the prediction is normalised: newlines/tabs to spaces, strip, punctuation, then lower-case,
  number words to digits, articles dropped, contractions restored;
- the human answers get only the punctuation step, and only when they disagree (VQAv2's answer
  files are already normalised, so this is what keeps the comparison fair);
- accuracy = the mean over the 10 leave-one-out sets of 9 human answers of
  min(#humans in the set that gave the prediction / 3, 1).
"""
from __future__ import annotations

import re
import shutil
from typing import Mapping, Sequence

from bidiffuser.errors import first_line
from easygen.errors import EasyGenError

# =============================================================================== captioning
PTB = "ptb"
SIMPLE = "simple"
TOKENIZER_LABELS = {PTB: "PTB (Stanford CoreNLP, Java): comparable",
                    SIMPLE: "simple regex, no METEOR (no Java): NON-COMPARABLE"}
_WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """Fallback for the PTB tokenizer: lower-case words and punctuation marks, with the same
    punctuation dropped as pycocoevalcap drops after PTB tokenization."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    return " ".join(t for t in _WORD.findall(text.lower()) if t not in PUNCTUATIONS)


def _tokenize(captions: dict[str, list[str]], tokenizer: str) -> dict[str, list[str]]:
    """id -> tokenized captions, in the same order."""
    if tokenizer == SIMPLE:
        return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    try:
        out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    except OSError as e:  # java vanished, or pycocoevalcap's folder is read-only (it writes a temp file there)
        raise EasyGenError(f"the PTB tokenizer (Java) could not run: {e}") from None
    # The wrapper pairs output lines with captions by position and silently drops what is missing
    # when Java fails; a short answer must not turn into quietly wrong scores.
    if any(len(out.get(k, ())) != len(v) for k, v in captions.items()):
        raise EasyGenError("the PTB tokenizer (Java) returned fewer lines than captions; "
                           "check that `java -version` works")
    return out


def caption_scores(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str],
                   tokenizer: str | None = None, spice: bool = False) -> dict:
    """COCO caption metrics (x100) of one prediction per id against that id's references.

    ``tokenizer``: "ptb" (needs Java), "simple" (the labelled fallback), or None: PTB when Java is
    on the PATH. Returns ``{"metrics": {...}, "tokenizer": ..., "comparable": bool, "notes": [...]}``.
    """
    missing = [k for k in references if k not in predictions]
    if missing:
        raise EasyGenError(f"{len(missing)} images have no prediction (first: {missing[0]})")
    if not references:
        raise EasyGenError("nothing to score")
    notes = []
    if tokenizer is None:
        tokenizer = PTB if java_available() else SIMPLE
        if tokenizer == SIMPLE:
            notes.append("Java not found on the PATH")
    elif tokenizer == PTB and not java_available():
        raise EasyGenError("the PTB tokenizer needs Java (`java` is not on the PATH)")
    if tokenizer == SIMPLE:
        notes.append("scored without Java: a simple tokenizer instead of PTB, no METEOR or SPICE; "
                     "the numbers are NOT comparable with published COCO results")

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = _tokenize({k: list(v) for k, v in references.items()}, tokenizer)
    res = _tokenize({k: [predictions[k]] for k in references}, tokenizer)
    metrics: dict[str, float | None] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics.update({f"BLEU-{n}": 100 * float(b) for n, b in enumerate(bleu, 1)})
    if tokenizer == PTB:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()  # a Java subprocess, ended when the object goes
        metrics["METEOR"] = 100 * float(meteor.compute_score(gts, res)[0])
        del meteor
    metrics["ROUGE-L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
    if spice:
        metrics["SPICE"], note = _spice(gts, res, tokenizer)
        notes += [note] if note else []
    return {"metrics": metrics, "tokenizer": TOKENIZER_LABELS[tokenizer], "comparable": tokenizer == PTB,
            "notes": notes}


def _spice(gts, res, tokenizer: str) -> tuple[float | None, str | None]:
    """SPICE x100, or (None, why): it needs Java and a Stanford CoreNLP download on first use, and
    a failure there must not throw away the other metrics of a long run."""
    if tokenizer != PTB:
        return None, "SPICE skipped: it needs Java"
    try:
        from pycocoevalcap.spice.spice import Spice

        return 100 * float(Spice().compute_score(gts, res)[0]), None
    except Exception as e:  # network (CoreNLP download), Java memory, ...
        return None, f"SPICE failed ({first_line(e)}); it downloads Stanford CoreNLP on first use"


# =============================================================================== VQA
# Punctuation the official evaluation removes (or turns into spaces); "." and "'" are handled apart.
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
              ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official pattern "(?!<=\d)(\.)(?!\d)" opens with a mistyped look-behind that is really a
# look-ahead for "<=", never true in front of a "."; what it does is: a period not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
# The official code passes re.UNICODE (= 32) where re.sub expects `count`: at most 32 periods go.
_PERIOD_COUNT = int(re.UNICODE)
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
# Contractions as the official table restores them: each form is reached from its spellings with one
# apostrophe missing ("dont" -> "don't"; "couldnt've" and "couldn'tve" -> "couldn't've").
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've
hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am
mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't
she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've
someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's
they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't
would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
_CONTRACTIONS = {form[:i] + form[i + 1:]: form for form in _CONTRACTED for i, c in enumerate(form) if c == "'"}
_CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: the official table has this one entry reversed


def vqa_punctuation(text: str) -> str:
    """The official punctuation step: a mark touching a space (or any text with a 1,000-style
    number) is deleted, any other is replaced by a space; then periods not before a digit go."""
    out = text
    drop_all = _COMMA_IN_NUMBER.search(text) is not None
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if drop_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def vqa_digits_articles(text: str) -> str:
    """The official word step: lower-case, number words to digits, articles out, contractions in."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    return vqa_digits_articles(vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official accuracy (0..1) of one prediction against the human answers."""
    pred = normalize_answer(prediction)
    humans = [vqa_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    agree = [h == pred for h in humans]
    # Leave each human out in turn; the other 9 vote, 3 agreeing votes give full credit.
    return sum(min(1.0, (sum(agree) - agree[i]) / 3) for i in range(len(humans))) / len(humans)


def vqa_scores(samples: Sequence, predictions: Mapping[str, str]) -> dict:
    """Accuracy x100 over ``samples`` (VQASample-like: id, answers, answer_type, question_type),
    overall and per answer type and question type, plus the per-question values (0..1)."""
    missing = [s.id for s in samples if s.id not in predictions]
    if missing:
        raise EasyGenError(f"{len(missing)} questions have no prediction (first: {missing[0]})")
    if not samples:
        raise EasyGenError("nothing to score")
    per_question = {s.id: vqa_accuracy(predictions[s.id], s.answers) for s in samples}

    def mean_by(attr: str) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for s in samples:
            groups.setdefault(getattr(s, attr) or "(none)", []).append(per_question[s.id])
        return {k: 100 * sum(v) / len(v) for k, v in sorted(groups.items())}

    return {"metrics": {"accuracy": 100 * sum(per_question.values()) / len(per_question)},
            "per_answer_type": mean_by("answer_type"), "per_question_type": mean_by("question_type"),
            "per_question": per_question}
