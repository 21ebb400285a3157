"""Evaluation metrics against independent computations: hand-worked BLEU and VQA accuracy,
perfect predictions, and pycocoevalcap called directly."""
import math
import shutil

import pytest

from easygen.errors import EasyGenError
from easygen.eval.data import VQASample
from easygen.eval.metrics import (SIMPLE, caption_scores, normalize_answer, simple_tokenize, vqa_accuracy,
                                  vqa_scores)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer and METEOR need Java")

REFS = {
    "1": ["A red square on a white background.", "A red box in the middle of a white picture.",
          "a small red square centered on white"],
    "2": ["Two dogs are playing in the grass.", "A pair of dogs run on a green lawn.", "two puppies on grass"],
    "3": ["A man riding a bicycle down the street.", "A person cycles along a city road.",
          "a cyclist on an empty street"],
}
PREDS = {"1": "a red square on a white background", "2": "two dogs running on the grass",
         "3": "a man is riding a bike on the road"}


# ------------------------------------------------------------------------------------------- VQA
@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),          # number word, final period
    ("yes!", "yes"),                  # punctuation not touching a space becomes a space, then split away
    ("1,000", "1000"),                # a thousands comma is deleted
    ("3.5", "3.5"),                   # a period before a digit stays
    ("A Dog", "dog"),                 # lower-case, article dropped
    ("the  cat\n", "cat"),
    ("red, white", "red white"),      # punctuation touching a space is deleted
    ("dont", "don't"),                # contractions restored
    ("couldnt've", "couldn't've"),
    ("none", "0"),
])
def test_vqa_answer_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_hand_worked():
    # 2 of 10 humans said "red". Leaving out one of them, 1 of the other 9 agrees: 1/3 (2 such
    # subsets); leaving out any of the 8 others, 2 agree: 2/3 (8 subsets). Mean: (2/3 + 16/3) / 10.
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    # 3 agree: leaving one of them out gives 2/3 (3 subsets), any other leaves 3 agreeing: 1 (7).
    assert vqa_accuracy("Red.", ["red"] * 3 + ["blue"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("two", ["2"] * 10) == 1.0           # the prediction is normalised
    assert vqa_accuracy("green", ["red"] * 10) == 0.0
    # Human answers get the punctuation step only when they disagree (official behaviour):
    # "t-shirt" -> "t shirt" on both sides here, but stays "t-shirt" when all ten agree.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 5 + ["shirt"] * 5) == 1.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0


def test_vqa_scores_overall_and_per_answer_type():
    samples = [VQASample("1", None, "q", ("red",) * 9 + ("orange",), "other", "what color"),
               VQASample("2", None, "q", ("yes",) * 10, "yes/no", "is the"),
               VQASample("3", None, "q", ("2",) + ("1",) * 9, "number", "how many"),
               VQASample("4", None, "q", ("box",) * 2 + ("square",) * 8, "other", "what")]
    scores = vqa_scores(samples, {"1": "Red", "2": "yes", "3": "two", "4": "a box"})
    per_question = [1.0, 1.0, 0.3, 0.6]  # "2" by 1 human: 9 subsets of 1/3; "box" by 2: 0.6 as above
    assert scores["per_question"] == pytest.approx(dict(zip("1234", per_question)))
    assert scores["metrics"]["accuracy"] == pytest.approx(100 * sum(per_question) / 4)
    assert scores["per_answer_type"] == pytest.approx({"number": 30.0, "other": 80.0, "yes/no": 100.0})
    with pytest.raises(EasyGenError, match="no prediction"):
        vqa_scores(samples, {"1": "red"})


# ------------------------------------------------------------------------------------------- captions
def test_simple_tokenizer_drops_ptb_punctuation():
    assert simple_tokenize("A man's dog, running -- fast!") == "a man's dog running fast"


def test_bleu_hand_worked():
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat" (same length: no brevity penalty)
    # unigrams 5/6, bigrams 3/5 (the cat, on the, the mat), trigrams 1/4 (on the mat), 4-grams 0/3.
    m = caption_scores({"a": ["the cat is on the mat"]}, {"a": "the cat sat on the mat"}, SIMPLE)["metrics"]
    p1, p2, p3 = 5 / 6, 3 / 5, 1 / 4
    assert m["BLEU-1"] == pytest.approx(100 * p1)
    assert m["BLEU-2"] == pytest.approx(100 * math.sqrt(p1 * p2))
    assert m["BLEU-3"] == pytest.approx(100 * (p1 * p2 * p3) ** (1 / 3))
    assert m["BLEU-4"] < 0.05  # not exactly 0: pycocoevalcap adds 1e-15 to every match count
    # ROUGE-L: the longest common subsequence is 5 of 6 words both ways, so P = R = F = 5/6.
    assert m["ROUGE-L"] == pytest.approx(100 * 5 / 6)


def test_perfect_predictions():
    scores = caption_scores(REFS, {k: v[1] for k, v in REFS.items()}, SIMPLE)
    m = scores["metrics"]
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert m[name] == pytest.approx(100, abs=1e-4), name
    assert m["CIDEr"] > caption_scores(REFS, PREDS, SIMPLE)["metrics"]["CIDEr"]
    assert not scores["comparable"] and "NON-COMPARABLE" in scores["tokenizer"] and "METEOR" not in m


def test_missing_prediction_and_missing_java(monkeypatch, tmp_path):
    with pytest.raises(EasyGenError, match="no prediction"):
        caption_scores(REFS, {"1": "x"}, SIMPLE)
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    with pytest.raises(EasyGenError, match="needs Java"):
        caption_scores(REFS, PREDS, "ptb")
    assert not caption_scores(REFS, PREDS)["comparable"]  # auto: falls back, labelled


@needs_java
def test_caption_scores_equal_pycocoevalcap_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours = caption_scores(REFS, PREDS)
    assert ours["comparable"] and ours["tokenizer"].startswith("PTB")

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in PREDS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    direct = {f"BLEU-{n}": b for n, b in enumerate(bleu, 1)}
    direct["METEOR"] = Meteor().compute_score(gts, res)[0]
    direct["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    direct["CIDEr"] = Cider().compute_score(gts, res)[0]
    assert ours["metrics"] == pytest.approx({k: 100 * v for k, v in direct.items()}, rel=1e-9)
    assert 0 < ours["metrics"]["CIDEr"]
