"""``easygen eval caption|vqa`` end to end on the sample files in data/, with images generated here
and a random tiny EasyGen. Its captions are garbage: these tests check the files written, resume,
the torchrun split and the metric plumbing (known predictions give hand-computed scores)."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bidiffuser.model_dir import read_config
from easygen.cli import SUBCOMMANDS, main
from easygen.eval.data import read_captions, read_vqa
from easygen.eval.metrics import SIMPLE, caption_scores

from .conftest import make_image

REPO = Path(__file__).resolve().parents[1]
KARPATHY = REPO / "data" / "karpathy_sample.json"
LAVIS = REPO / "data" / "lavis_karpathy_test_sample.json"
LAVIS_GT = REPO / "data" / "lavis_karpathy_test_gt_sample.json"
QUESTIONS = REPO / "data" / "vqa_sample_questions.json"
ANNOTATIONS = REPO / "data" / "vqa_sample_annotations.json"
TEST_IDS = ["900001", "900002", "900003"]  # the Karpathy 'test' images of the sample
# Small and quick; the same settings everywhere, so every run may reuse the first run's predictions.
FAST = ["--beam", "2", "--max-new-tokens", "4", "--min-new-tokens", "1", "--feature-steps", "2",
        "--batch-size", "2", "--device", "cpu", "--quiet"]


def easygen(*argv) -> tuple[int, str, str]:
    """Run the ``easygen`` entry point in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse: --help, usage errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def with_records(src: Path, dst: Path, n: int, edit=None, partial: str = "") -> Path:
    """``dst``: the header and first ``n`` records of ``src`` (each passed through ``edit``),
    then ``partial``, an unfinished line as an interrupted write leaves it."""
    header, *records = read_jsonl(src)
    lines = [header] + [edit(r) if edit else r for r in records[:n]]
    dst.write_text("".join(json.dumps(r) + "\n" for r in lines) + partial)
    return dst


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory) -> Path:
    from easygen.tiny import init_tiny_easygen
    return init_tiny_easygen(tmp_path_factory.mktemp("easygen") / "model", tiny_dir)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """The sample's images (val2014/COCO_val2014_<id>.jpg, ...), coloured as their captions say."""
    root = tmp_path_factory.mktemp("coco")
    colours = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 220, 30), (0, 0, 0)]
    for entry, colour in zip(json.loads(KARPATHY.read_text())["images"], colours):
        (root / entry["filepath"]).mkdir(exist_ok=True)
        make_image(root / entry["filepath"] / entry["filename"], color=colour)
    return root


@pytest.fixture(scope="module")
def caption_run(model_dir, image_root, tmp_path_factory):
    """One uninterrupted captioning run with the default scoring (PTB + METEOR when Java is here)."""
    out = tmp_path_factory.mktemp("caption") / "results.json"
    rc, stdout, stderr = easygen("eval", "caption", "--model-path", model_dir, "--karpathy", KARPATHY,
                                 "--image-root", image_root, "--out", out, *FAST)
    assert rc == 0, stderr
    return {"out": out, "results": json.loads(out.read_text()), "stdout": stdout,
            "predictions": out.with_suffix(".predictions.jsonl")}


def caption_args(model_dir, image_root, out, *extra):
    return ["eval", "caption", "--model-path", model_dir, "--karpathy", KARPATHY, "--image-root", image_root,
            "--out", out, *FAST, *extra]


def references(image_root) -> dict[str, tuple[str, ...]]:
    return {s.id: s.references for s in read_captions(KARPATHY, image_root)[1]}


def test_eval_is_an_easygen_subcommand_with_the_documented_flags():
    assert SUBCOMMANDS["eval"] == "easygen.cli.eval"
    common = ["--model-path", "--bidiffuser", "--image-root", "--out", "--predictions", "--limit", "--prompt",
              "--beam", "--max-new-tokens", "--min-new-tokens", "--batch-size", "--feature-steps",
              "--feature-scale", "--feature-cache", "--device", "--dtype"]
    for task, own in (("caption", ["--karpathy", "--gt", "--split", "--no-java", "--spice"]),
                      ("vqa", ["--questions", "--annotations"])):
        rc, help_text, _ = easygen("eval", task, "--help")
        assert rc == 0 and all(flag in help_text for flag in common + own)
    rc, _, stderr = easygen("eval", "translate")
    assert rc == 2 and "invalid choice: 'translate'" in stderr


def test_caption_end_to_end(caption_run, tiny_dir):
    r = caption_run["results"]
    assert r["task"] == "caption" and r["num_images"] == 3 and r["world_size"] == 1
    assert r["bidiffuser"]["fingerprint"] == read_config(tiny_dir).fingerprint()
    assert len(r["model"]["fingerprint"]) == 64
    assert r["prompt"] == "Describe the image concisely." and r["prompt_style"] == "easygen"
    assert r["decoding"] == {"num_beams": 2, "max_new_tokens": 4, "min_new_tokens": 1, "do_sample": False}
    assert r["features"] == {"steps": 2, "scale": 7.0, "seed": 1234}
    assert r["data"]["split"] == "test" and r["data"]["format"] == "karpathy"
    expected = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"] + (["METEOR"] if r["comparable"] else []) + ["ROUGE-L", "CIDEr"]
    assert list(r["metrics"]) == expected
    assert r["comparable"] == (shutil.which("java") is not None)

    header, *records = read_jsonl(caption_run["predictions"])
    assert header["easygen_eval"]["model"] == r["model"]["fingerprint"]
    assert [rec["id"] for rec in records] == TEST_IDS and all(isinstance(rec["caption"], str) for rec in records)
    assert "CIDEr" in caption_run["stdout"] and "3 images" in caption_run["stdout"]


def test_known_captions_are_scored_against_the_right_references(caption_run, model_dir, image_root, tmp_path):
    """Predictions set to each image's first reference are rescored with no model work (all
    reused): perfect BLEU, and exactly what the metric code gives for these captions."""
    refs = references(image_root)
    preds = with_records(caption_run["predictions"], tmp_path / "p.jsonl", 3,
                         edit=lambda r: {**r, "caption": refs[r["id"]][0]})
    rc, stdout, _ = easygen(*caption_args(model_dir, image_root, tmp_path / "r.json", "--predictions", preds,
                                          "--no-java"))
    r = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and r["reused_predictions"] == 3
    assert r["metrics"]["BLEU-4"] == pytest.approx(100, abs=1e-4)
    assert r["metrics"] == caption_scores(refs, {k: v[0] for k, v in refs.items()}, SIMPLE)["metrics"]
    assert not r["comparable"] and "NON-COMPARABLE" in stdout


def simple_scores(predictions: Path, image_root) -> dict:
    """The Java-free scores of a predictions file, computed here from its records."""
    captions = {r["id"]: r["caption"] for r in read_jsonl(predictions)[1:]}
    return caption_scores(references(image_root), captions, SIMPLE)["metrics"]


def test_resume_after_an_interrupted_run_gives_the_same_predictions_and_scores(caption_run, model_dir, image_root,
                                                                              tmp_path, caplog):
    preds = with_records(caption_run["predictions"], tmp_path / "p.jsonl", 1, partial='{"id": "9000')
    # --no-java: identical predictions files score identically under any scorer; this saves METEOR's start-up.
    rc, _, _ = easygen(*caption_args(model_dir, image_root, tmp_path / "r.json", "--predictions", preds, "--no-java"))
    r = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and r["reused_predictions"] == 1 and "incomplete last line" in caplog.text
    assert preds.read_text() == caption_run["predictions"].read_text()
    assert r["metrics"] == simple_scores(caption_run["predictions"], image_root)


def test_without_java_the_scores_are_labelled_non_comparable(caption_run, model_dir, image_root, tmp_path,
                                                             monkeypatch):
    preds = shutil.copy(caption_run["predictions"], tmp_path / "p.jsonl")
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on this PATH
    rc, stdout, stderr = easygen(*caption_args(model_dir, image_root, tmp_path / "r.json", "--predictions", preds))
    r = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and "Java not found" in stderr and "NON-COMPARABLE" in stdout
    assert not r["comparable"] and "NON-COMPARABLE" in r["tokenizer"] and "METEOR" not in r["metrics"]


def test_lavis_files_give_the_karpathy_test_split(caption_run, model_dir, image_root, tmp_path):
    karpathy = read_captions(KARPATHY, image_root)[1]
    assert read_captions(LAVIS, image_root, gt=LAVIS_GT) == ("lavis", karpathy)
    assert read_captions(LAVIS, image_root) == ("lavis", karpathy)  # references from the file itself
    # End to end on the LAVIS files, reusing the Karpathy run's predictions (same images, same ids).
    preds = shutil.copy(caption_run["predictions"], tmp_path / "p.jsonl")
    rc, _, stderr = easygen("eval", "caption", "--model-path", model_dir, "--karpathy", LAVIS, "--gt", LAVIS_GT,
                            "--image-root", image_root, "--out", tmp_path / "r.json", "--predictions", preds,
                            *FAST, "--no-java")
    r = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0, stderr
    assert r["data"]["format"] == "lavis" and r["data"]["split"] is None and r["reused_predictions"] == 3


def test_vqa_end_to_end_resume_and_known_answers(model_dir, image_root, tmp_path):
    args = ["eval", "vqa", "--model-path", model_dir, "--questions", QUESTIONS, "--annotations", ANNOTATIONS,
            "--image-root", image_root, *FAST]
    rc, stdout, stderr = easygen(*args, "--out", tmp_path / "full.json")
    full = json.loads((tmp_path / "full.json").read_text())
    assert rc == 0, stderr
    assert full["num_questions"] == 5 and set(full["per_answer_type"]) == {"other", "yes/no", "number"}
    assert full["prompt"] == "{question} please giving an short answer." and full["prompt_style"] == "easygen"
    full_preds = tmp_path / "full.predictions.jsonl"
    records = read_jsonl(full_preds)[1:]
    assert sorted(r["id"] for r in records) == sorted(s.id for s in read_vqa(QUESTIONS, ANNOTATIONS, image_root))
    assert "accuracy" in stdout and "yes/no" in stdout

    # Resume after an interruption: same predictions, same scores.
    preds = with_records(full_preds, tmp_path / "resumed.jsonl", 2, partial='{"id": "90')
    rc, _, _ = easygen(*args, "--out", tmp_path / "resumed.json", "--predictions", preds)
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert rc == 0 and resumed["reused_predictions"] == 2
    assert preds.read_text() == full_preds.read_text() and resumed["metrics"] == full["metrics"]

    # Known answers, hand-scored: "Red." 1.0 (9 humans say red); "yes" 1.0; "light green" 0.6
    # (2 humans); "two" -> "2" 0.3 (1 human: 9 subsets of 1/3); "a box" -> "box" 0.6 (2 humans).
    answers = {"900001000": "Red.", "900001001": "yes", "900002000": "light green", "900002001": "two",
               "900003000": "a box"}
    preds = with_records(full_preds, tmp_path / "known.jsonl", 5, edit=lambda r: {**r, "answer": answers[r["id"]]})
    rc, _, _ = easygen(*args, "--out", tmp_path / "known.json", "--predictions", preds)
    known = json.loads((tmp_path / "known.json").read_text())
    assert rc == 0 and known["reused_predictions"] == 5
    assert known["metrics"]["accuracy"] == pytest.approx(70.0)
    assert known["per_answer_type"] == pytest.approx({"other": 220 / 3, "yes/no": 100.0, "number": 30.0})


def test_bad_input_is_a_one_line_error(caption_run, model_dir, image_root, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"images": [\n  {"split": "test",,}\n]}')
    no_sentences = tmp_path / "no_sentences.json"
    no_sentences.write_text(json.dumps({"images": [{"split": "test", "filename": "x.jpg"}]}))
    preds = shutil.copy(caption_run["predictions"], tmp_path / "p.jsonl")
    base = ["eval", "caption", "--model-path", model_dir, "--image-root", image_root, "--out", tmp_path / "r.json"]
    cases = [
        (["--karpathy", bad_json], "bad.json:2: invalid JSON"),
        (["--karpathy", no_sentences], "no_sentences.json images[0]: missing 'sentences'"),
        (["--karpathy", KARPATHY, "--split", "nope"], "no images in split 'nope' (splits present: restval, test, val)"),
        (["--karpathy", LAVIS, "--split", "test"], "--split applies to dataset_coco.json"),
        (["--karpathy", KARPATHY, "--image-root", tmp_path], "3 of 3 images not found"),
        (["--karpathy", KARPATHY, "--min-new-tokens", "9", "--max-new-tokens", "4"], "--min-new-tokens 9"),
        (["--karpathy", KARPATHY, *FAST, "--predictions", preds, "--prompt", "Describe it."], "(prompt differ)"),
        (["--karpathy", KARPATHY, "--model-path", tmp_path / "nowhere"], "not found"),
        (["--karpathy", KARPATHY, "--out", tmp_path], "is a directory"),
    ]
    for extra, message in cases:
        rc, _, stderr = easygen(*base, *extra)
        assert rc == 2 and stderr.startswith("easygen: error: ") and message in stderr, (extra, stderr)
        assert stderr.count("\n") == 1 and not (tmp_path / "r.json").exists()
    rc, _, stderr = easygen("eval", "vqa", "--model-path", model_dir, "--questions", QUESTIONS, "--annotations",
                            ANNOTATIONS, "--image-root", image_root, "--out", tmp_path / "r.json", "--prompt", "Hi")
    assert rc == 2 and "must contain {question}" in stderr


@pytest.mark.slow
def test_torchrun_two_processes_merge_to_the_single_process_result(caption_run, model_dir, image_root, tmp_path):
    """scripts/eval_caption.sh with 2 gloo processes: each captions part of the images, rank 0
    merges; the predictions file equals the single-process run's byte for byte, and so do the
    scores (Java-free here, to spare METEOR's start-up)."""
    out = tmp_path / "r.json"
    env = {**os.environ, "NPROC": "2", "OUT": str(out), "OMP_NUM_THREADS": "1",
           "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
    proc = subprocess.run(["bash", REPO / "scripts" / "eval_caption.sh", model_dir, KARPATHY, image_root, *FAST,
                           "--no-java"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["reused_predictions"] == 0
    assert out.with_suffix(".predictions.jsonl").read_text() == caption_run["predictions"].read_text()
    assert not list(tmp_path.glob("*.rank*"))  # part files merged and removed
    assert r["metrics"] == simple_scores(caption_run["predictions"], image_root)
