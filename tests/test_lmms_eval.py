"""EasyGen in lmms-eval 0.7.3, offline: lmms-eval's own evaluator on local copies of its VQAv2, POPE,
COCO-caption and WorldVQA (multiple choice) tasks, the real task YAMLs included as they are with only
the dataset swapped for small parquet files in their schemas (images embedded as the HF datasets
``Image`` feature stores them). The model is the `ci` shapes demo; parity is checked on identical
predictions: lmms-eval's metrics against ``easygen eval``'s, and the shapes task against
``easygen demo eval``'s VQA row."""
from __future__ import annotations

import os

# Before datasets and lmms-eval read them: nothing may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is installed by the README's install block")

import yaml  # noqa: E402
from bidiffuser.images import load_image  # noqa: E402
from datasets import Features, Image, List, Value  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from easygen.cli import main as easygen_main  # noqa: E402
from easygen.demo import world  # noqa: E402
from easygen.errors import EasyGenError  # noqa: E402
from easygen.eval import metrics  # noqa: E402
from easygen.eval.lmms_prompt import user_text  # noqa: E402
from easygen.eval.lmms_tasks import vqav2_features, write_parquet, write_shapes_vqa  # noqa: E402

from .conftest import overfit  # noqa: E402
from .test_readme import REPO, readme_block  # noqa: E402

LMMS_TASKS = Path(lmms_eval.__file__).parent / "tasks"
JAVA = metrics.java_available()


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True)
def _offline_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.chdir(tmp_path)  # lmms-eval's COCO aggregation writes a submissions/ folder here


@pytest.fixture(scope="module")
def model_args(ci_demo, tmp_path_factory) -> str:
    return f"pretrained={ci_demo.easygen},device=cpu,feature_cache={tmp_path_factory.mktemp('features')}"


def scenes(n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [world.random_scene(rng) for _ in range(n)]


def png(scene, path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    world.draw(scene).save(path)
    return path.read_bytes()


def local_task(folder: Path, name: str, real_yaml: str, split: str, rows: list, features, **overrides) -> None:
    """A copy of lmms-eval's task ``real_yaml`` (included as it is: its prompts, process_results and
    aggregations) reading ``rows`` from a local parquet file."""
    write_parquet(rows, features, folder / f"{name}.parquet")
    config = {"include": str(LMMS_TASKS / real_yaml), "task": name, "dataset_path": "parquet",
              "dataset_name": None, "dataset_kwargs": {"data_files": {split: f"{name}.parquet"}}, **overrides}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))


def evaluate(model, folder: Path, tasks: list[str], model_args: str = "", batch_size: int = 8, **options) -> dict:
    manager = TaskManager("WARNING", include_path=str(folder), include_defaults=False, model_name="easygen")
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=batch_size,
                           task_manager=manager, log_samples=True, verbosity="WARNING", bootstrap_iters=0, **options)


def responses(results: dict, task: str) -> list:
    return [s["resps"][0][0] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def easygen(*argv) -> dict:
    """``easygen eval ...`` in this process; the results JSON it wrote."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert easygen_main([str(a) for a in argv]) == 0, err.getvalue()[-2000:]
    return json.loads(Path(argv[argv.index("--out") + 1]).read_text())


def predictions(path: Path, key: str) -> list[str]:
    return [json.loads(line)[key] for line in path.read_text().splitlines()[1:]]


class FixedAnswers(lmms):
    """Answers decided by the test: the same predictions go to both metric paths."""

    def __init__(self, answers: dict):
        super().__init__()
        self.answers = answers

    def generate_until(self, requests):
        return [self.answers[(r.args[4], r.args[3])] for r in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def generate_until_multi_round(self, requests):
        raise NotImplementedError


def vqav2_rows(items, root: Path, answers_of) -> list[dict]:
    """lmms-lab/VQAv2 rows: (question id, image file, question, answer type) -> 10 human answers."""
    return [{"question_type": kind, "multiple_choice_answer": answers_of(qid)[0],
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                         for k, a in enumerate(answers_of(qid))],
             "image_id": int(Path(image).stem), "answer_type": kind, "question_id": qid, "question": question,
             "image": {"bytes": (root / image).read_bytes(), "path": image}} for qid, image, question, kind in items]


def vqa_files(items, root: Path, answers_of) -> tuple[Path, Path]:
    """The same questions as ``easygen eval vqa`` reads them (VQAv2 JSON files)."""
    q = root / "questions.json"
    a = root / "annotations.json"
    q.write_text(json.dumps({"questions": [{"question_id": qid, "image": image, "question": question}
                                           for qid, image, question, _ in items]}))
    a.write_text(json.dumps({"annotations": [
        {"question_id": qid, "answer_type": kind, "question_type": kind,
         "answers": [{"answer": x, "answer_id": k + 1} for k, x in enumerate(answers_of(qid))]}
        for qid, _, _, kind in items]}))
    return q, a


COCO_FEATURES = Features({"question_id": Value("string"), "image": Image(), "question": Value("string"),
                          "answer": List(Value("string")), "id": Value("int64"), "license": Value("int8"),
                          "file_name": Value("string"), "coco_url": Value("string"), "height": Value("int32"),
                          "width": Value("int32"), "date_captured": Value("string")})
POPE_FEATURES = Features({"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
                          "answer": Value("string"), "image_source": Value("string"), "image": Image(),
                          "category": Value("string")})
# BLEU-4 and CIDEr of coco2017_cap_val's list (METEOR starts a Java process per call), aggregated by
# lmms-eval's own functions, imported as a module so that a test may patch its tokenizer.
COCO_METRICS = {"coco_Bleu_4": "coco_bleu4", "coco_CIDEr": "coco_cider"}


def coco_task(folder: Path, name: str, captions: list[tuple[str, list[str]]], root: Path) -> None:
    rows = [{"question_id": f"{i + 1:012d}.png", "image": {"bytes": (root / f).read_bytes(), "path": f},
             "question": "", "answer": refs, "id": i + 1, "license": 1, "file_name": f, "coco_url": "",
             "height": 64, "width": 64, "date_captured": ""} for i, (f, refs) in enumerate(captions)]
    write_parquet(rows, COCO_FEATURES, folder / f"{name}.parquet")
    metric_list = "".join(f"  - metric: {metric}\n    aggregation: !function lmms_eval.tasks.coco_cap.utils.{fn}\n"
                          "    higher_is_better: true\n" for metric, fn in COCO_METRICS.items())
    (folder / f"{name}.yaml").write_text(  # text: the !function tags stay tags
        f"include: {LMMS_TASKS / 'coco_cap' / 'coco2017_cap_val.yaml'}\ntask: {name}\n"
        f"dataset_path: parquet\ndataset_kwargs:\n  data_files:\n    val: {name}.parquet\n"
        f"metric_list:\n{metric_list}")


@pytest.fixture
def coco_without_java(monkeypatch):
    """Without Java, both sides use the project's simple tokenizer in place of PTB (the same on both)."""
    if JAVA:
        return None

    class SimpleTokenizer:
        def tokenize(self, captions):
            return {k: [metrics.simple_tokenize(c["caption"]) for c in v] for k, v in captions.items()}

    import lmms_eval.tasks.coco_cap.utils as coco_utils
    monkeypatch.setattr(coco_utils, "PTBTokenizer", SimpleTokenizer)
    return metrics.SIMPLE


# ------------------------------------------------------------------------------------------ tests
def test_prompt_styles_map_lmms_contexts_onto_easygens_prompts():
    vqa = "What color is the shape?\nAnswer the question using a single word or phrase."
    assert user_text(vqa) == "What color is the shape? please giving an short answer."
    assert user_text(vqa, "llava") == vqa
    assert user_text(vqa, "task") == vqa
    assert user_text("Provide a one-sentence caption for the provided image.") == "Describe the image concisely."
    assert user_text("Which one? A. red B. blue") == "Which one? A. red B. blue"


def test_metrics_equal_easygens_on_fixed_predictions(tmp_path, coco_without_java):
    """lmms-eval's VQAv2 exact match and COCO BLEU-4/CIDEr equal ``easygen eval``'s metric functions on the
    same (chosen, imperfect) predictions."""
    items, root = [], tmp_path / "data"
    humans = [["red"] * 10, ["red"] * 2 + ["orange"] * 8, ["2"] * 4 + ["3"] * 6, ["circle"] * 10]
    said = ["Red.", "red", "two", "a square"]  # punctuation, partial credit, number words, articles
    for qid, scene in enumerate(scenes(4, 1)):
        png(scene, root / f"{qid:05d}.png")
        items.append((qid, f"{qid:05d}.png", "What is it?", "other"))
    local_task(tmp_path, "local_vqav2_val", "vqav2/vqav2_val.yaml", "validation",
               vqav2_rows(items, root, lambda q: humans[q]), vqav2_features())
    captions = [(f"{i:05d}.png", [f"a {c} shape", f"a {c} thing on white"]) for i, c in enumerate("red green blue".split())]
    coco_task(tmp_path, "local_coco_cap", captions, root)
    answers = {("local_vqav2_val", i): a for i, a in enumerate(said)}
    answers |= {("local_coco_cap", i): c for i, c in enumerate(["a red shape", "a green blob", "blue"])}

    r = evaluate(FixedAnswers(answers), tmp_path, ["local_vqav2_val", "local_coco_cap"])

    class S:  # easygen's VQASample fields
        def __init__(self, i):
            self.id, self.answers, self.answer_type, self.question_type = str(i), humans[i], "other", "other"
    ours = metrics.vqa_scores([S(i) for i in range(4)], {str(i): a for i, a in enumerate(said)})
    lmms_em = r["results"]["local_vqav2_val"]["exact_match,none"]
    assert 0 < lmms_em < 1 and lmms_em == pytest.approx(ours["metrics"]["accuracy"] / 100, abs=1e-12)
    ours = metrics.caption_scores({str(i): refs for i, (_, refs) in enumerate(captions)},
                                  {str(i): answers[("local_coco_cap", i)] for i in range(3)}, coco_without_java)
    coco = r["results"]["local_coco_cap"]
    assert coco["coco_CIDEr,none"] > 0.1
    assert 100 * coco["coco_CIDEr,none"] == pytest.approx(ours["metrics"]["CIDEr"], abs=1e-9)
    assert 100 * coco["coco_Bleu_4,none"] == pytest.approx(ours["metrics"]["BLEU-4"], abs=1e-9)


def shape_questions(root: Path, n: int, seed: int) -> tuple[list[tuple], dict]:
    """Colour and shape questions about ``n`` images, and their human answers: 7 say the truth, 3 a
    common confusion (so partial credit can occur)."""
    items, humans = [], {}
    for i, scene in enumerate(scenes(n, seed)):
        png(scene, root / f"{i:05d}.png")
        items += [(2 * i, f"{i:05d}.png", "What color is the shape?", "color"),
                  (2 * i + 1, f"{i:05d}.png", "What shape is it?", "shape")]
        humans[2 * i] = [scene.colour] * 7 + ["purple"] * 3
        humans[2 * i + 1] = [scene.shape] * 7 + ["circle"] * 3
    return items, humans


def test_vqav2_and_pope_through_easygen_match_easygen_eval_vqa(tmp_path, ci_demo, model_args):
    """The easygen model through lmms-eval's VQAv2 and POPE tasks: the answers are `easygen eval vqa`'s
    (same prompt style, same decoding), lmms-eval's exact match is its accuracy, and POPE's parser
    receives those answers."""
    root = tmp_path / "data"
    items, truth = shape_questions(root, 3, 5)
    local_task(tmp_path, "local_vqav2_val", "vqav2/vqav2_val.yaml", "validation",
               vqav2_rows(items, root, truth.get), vqav2_features())
    pope = [(f"{i}", f"{i:05d}.png", f"Is there a {s} in the image?", "yes" if i % 2 else "no")
            for i, s in enumerate(["circle", "square", "triangle"])]
    local_task(tmp_path, "local_pope", "pope/pope.yaml", "test", [
        {"id": q, "question_id": q, "question": text, "answer": gt, "image_source": f, "category": "random",
         "image": {"bytes": (root / f).read_bytes(), "path": f}} for q, f, text, gt in pope], POPE_FEATURES)

    r = evaluate("easygen", tmp_path, ["local_vqav2_val", "local_pope"], model_args)

    recipe = ci_demo.recipe()
    common = ["--model-path", ci_demo.easygen, "--image-root", root, "--feature-steps", recipe.feature_steps,
              "--feature-scale", recipe.feature_scale, "--device", "cpu", "--quiet", "--min-new-tokens", "0"]
    q, a = vqa_files(items, root, truth.get)
    ours = easygen("eval", "vqa", *common, "--questions", q, "--annotations", a, "--max-new-tokens", "16",
                   "--out", tmp_path / "vqa.json")
    assert responses(r, "local_vqav2_val") == predictions(tmp_path / "vqa.predictions.jsonl", "answer")
    assert r["results"]["local_vqav2_val"]["exact_match,none"] == pytest.approx(ours["metrics"]["accuracy"] / 100)

    q, a = vqa_files([(i, f, text, "yes/no") for i, (_, f, text, _) in enumerate(pope)], root, lambda i: [pope[i][3]])
    easygen("eval", "vqa", *common, "--questions", q, "--annotations", a, "--max-new-tokens", "128",
            "--out", tmp_path / "pope.json")
    said = predictions(tmp_path / "pope.predictions.jsonl", "answer")
    seen = [s["pope_accuracy"] for s in sorted(r["samples"]["local_pope"], key=lambda s: s["doc_id"])]
    assert [s["prediction"] for s in seen] == [x.lower().strip() for x in said] and all(said)
    expected = sum(x.lower() == gt for x, (*_, gt) in zip(said, pope)) / len(pope)
    assert r["results"]["local_pope"]["pope_accuracy,none"] == pytest.approx(expected)


def test_coco_caption_through_easygen_matches_easygen_eval_caption(tmp_path, ci_demo, model_args, coco_without_java):
    root = tmp_path / "data"
    shots = scenes(3, 6)
    captions = [(f"{i:05d}.png", world.captions(s.colour, s.shape)) for i, s in enumerate(shots)]
    for (f, _), s in zip(captions, shots):
        png(s, root / f)
    coco_task(tmp_path, "local_coco_cap", captions, root)

    r = evaluate("easygen", tmp_path, ["local_coco_cap"], model_args)

    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [{"filename": f, "split": "test", "imgid": i + 1,
                                                "sentences": [{"raw": c} for c in refs]}
                                               for i, (f, refs) in enumerate(captions)]}))
    recipe = ci_demo.recipe()
    ours = easygen("eval", "caption", "--model-path", ci_demo.easygen, "--karpathy", karpathy, "--image-root", root,
                   "--feature-steps", recipe.feature_steps, "--feature-scale", recipe.feature_scale,
                   "--beam", "1", "--min-new-tokens", "0", "--max-new-tokens", "64", "--device", "cpu", "--quiet",
                   *(["--no-java"] if coco_without_java else []), "--out", tmp_path / "caption.json")
    assert responses(r, "local_coco_cap") == predictions(tmp_path / "caption.predictions.jsonl", "caption")
    coco = r["results"]["local_coco_cap"]
    assert 100 * coco["coco_CIDEr,none"] == pytest.approx(ours["metrics"]["CIDEr"], abs=1e-9)
    assert 100 * coco["coco_Bleu_4,none"] == pytest.approx(ours["metrics"]["BLEU-4"], abs=1e-9)


MC_FEATURES = Features({"question": Value("string"), "option": List(Value("string")), "answer": Value("string"),
                        "image": Image()})


def worldvqa_mc_task(folder: Path, root: Path, options: list[list[str]], answers: list[int]) -> None:
    """WorldVQA's multiple-choice task (its own choice and target functions, lmms-eval's acc) on
    ``{root}/{i}.png``, one document per options list."""
    rows = [{"question": "What color is the shape?", "option": opts, "answer": opts[a],
             "image": {"bytes": (root / f"{i}.png").read_bytes(), "path": f"{i}.png"}}
            for i, (opts, a) in enumerate(zip(options, answers))]
    local_task(folder, "local_worldvqa_mc_ppl", "worldvqa/worldvqa_mcppl.yaml", "test", rows, MC_FEATURES)


def llava_scores(qa, prompt: str, image, choices: list[str]) -> tuple[list[float], list[bool]]:
    """lmms-eval's llava ``loglikelihood``, one unpadded forward per choice: the model's own loss with
    the context labelled -100 (the mean NLL of the choice and its "</s>"), and whether every one of
    those tokens is the argmax of the logits before it."""
    import torch

    feats, head, losses, greedy = qa.features([image]), qa.processor.tokenize_prompt(prompt), [], []
    for choice in choices:
        ids = qa.processor.tokenize_prompt(f"{prompt} {choice}</s>")
        assert ids[:len(head)] == head and len(ids) - len(head) >= 2
        with torch.no_grad():
            out = qa.model(input_ids=torch.tensor([ids]), labels=torch.tensor([[-100] * len(head) + ids[len(head):]]),
                           image_features=feats)
        losses.append(out.loss.item())
        greedy.append(all(int(out.logits[0, t - 1].argmax()) == ids[t] for t in range(len(head), len(ids))))
    return losses, greedy


def greedy_reply(qa, prompt: str, image, limit: int = 16) -> str:
    """The reply greedy decoding gives, token by token from the model's logits, up to its "</s>"."""
    import torch

    ids, eos, feats = qa.processor.tokenize_prompt(prompt), qa.processor.tokenizer.eos_token_id, qa.features([image])
    reply = []
    while len(reply) < limit and eos not in reply:
        with torch.no_grad():
            reply.append(int(qa.model(input_ids=torch.tensor([ids + reply]), image_features=feats).logits[0, -1].argmax()))
    assert reply[-1] == eos, "the greedy reply did not end within the limit"
    return qa.processor.decode(reply[:-1]).strip()


def test_multiple_choice_scores_through_loglikelihood(tmp_path, model_args):
    """WorldVQA's multiple-choice task: each choice's score is lmms-eval's llava (loss, is_greedy), the
    loss being the mean negative log-likelihood of the reply's tokens given the image and question
    (not their sum), is_greedy true exactly for the reply greedy decoding gives (choice A, built from
    the model's own logits) and false for that reply continued (choice B); lmms-eval ranks by argmin."""
    from easygen.eval.lmms_model import EasyGen

    root = tmp_path / "data"
    for i, scene in enumerate(scenes(3, 8)):
        png(scene, root / f"{i}.png")
    lm = EasyGen.create_from_arg_string(model_args, {"batch_size": 3})
    qa = lm.qa
    prompt = qa.processor.build_prompt([{"role": "user", "content": "What color is the shape?", "num_images": 1}])
    choices = []
    for i in range(3):
        greedy = greedy_reply(qa, prompt, str(root / f"{i}.png"))
        assert greedy and "." not in greedy  # WorldVQA's choices are the text after "X."
        choices.append([greedy, f"{greedy} shape", "blue", "circle"])
    worldvqa_mc_task(tmp_path, root, [[f"{k}. {c}" for k, c in zip("ABCD", cs)] for cs in choices], [0, 1, 2])

    r = evaluate(lm, tmp_path, ["local_worldvqa_mc_ppl"])

    samples, right = sorted(r["samples"]["local_worldvqa_mc_ppl"], key=lambda s: s["doc_id"]), 0
    for i, s in enumerate(samples):
        losses, greedy = llava_scores(qa, prompt, str(root / f"{i}.png"), choices[i])
        assert greedy[:2] == [True, False]  # the construction: A is greedy decoding's reply, B is not
        assert [resp[0][0] for resp in s["resps"]] == pytest.approx(losses, rel=1e-4) and min(losses) > 0
        assert [resp[0][1] for resp in s["resps"]] == greedy
        right += min(range(4), key=losses.__getitem__) == i
    assert r["results"]["local_worldvqa_mc_ppl"]["acc,none"] == pytest.approx(right / 3)


def test_use_cache_serves_the_second_run_with_the_same_scores(tmp_path, model_args, monkeypatch):
    """lmms-eval's --use_cache on a generation task (VQAv2) and a multiple-choice one (WorldVQA): the
    second run is served by its response cache alone (the model is never asked), with the same
    responses and scores."""
    from easygen.eval.lmms_model import EasyGen

    root = tmp_path / "data"
    items, truth = shape_questions(root, 2, 5)
    local_task(tmp_path, "local_vqav2_val", "vqav2/vqav2_val.yaml", "validation",
               vqav2_rows(items, root, truth.get), vqav2_features())
    for i in range(2):
        (root / f"{i}.png").write_bytes((root / f"{i:05d}.png").read_bytes())
    worldvqa_mc_task(tmp_path, root, [["A. red", "B. green", "C. purple"]] * 2, [0, 2])
    tasks, cache = ["local_vqav2_val", "local_worldvqa_mc_ppl"], str(tmp_path / "lmms-cache")

    first = evaluate("easygen", tmp_path, tasks, model_args, use_cache=cache)

    def asked(self, requests):
        raise AssertionError("the model was asked: not served from the cache")
    monkeypatch.setattr(EasyGen, "generate_until", asked)
    monkeypatch.setattr(EasyGen, "loglikelihood", asked)
    second = evaluate("easygen", tmp_path, tasks, model_args, use_cache=cache)

    for task in tasks:
        assert second["results"][task] == first["results"][task]
        assert [s["resps"] for s in second["samples"][task]] == [s["resps"] for s in first["samples"][task]]
    assert all(isinstance(loss, float) and isinstance(greedy, bool)
               for s in second["samples"]["local_worldvqa_mc_ppl"] for [(loss, greedy)] in s["resps"])
    assert all(answer for [[answer]] in (s["resps"] for s in first["samples"]["local_vqav2_val"]))


def chat_doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                     previous_round_info=None):
    """A two-round task (lmms-eval's multi-round protocol): the question with the image, then a follow-up."""
    if round_idx is None:
        return doc["question"]
    if round_idx == 1:
        return [], "And its shape?", False, previous_output, {"asked": 1}
    assert previous_round_info == {"asked": 1}
    return None, None, True, previous_output, None


def chat_process_results(doc, results):
    return {"rounds": len(results[0])}


def no_visual(doc):
    return []


def test_multi_round_is_one_assistant_conversation(tmp_path, ci_demo, model_args):
    from easygen.assistant import Assistant, GenerationSettings
    from easygen.eval.lmms_model import EasyGen

    root = tmp_path / "data"
    png(scenes(1, 9)[0], root / "0.png")
    write_parquet([{"question": "What color is the shape?", "image": {"bytes": (root / "0.png").read_bytes(),
                                                                       "path": "0.png"}}],
                  Features({"question": Value("string"), "image": Image()}), tmp_path / "chat.parquet")
    (tmp_path / "chat.yaml").write_text(
        "task: local_chat\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: chat.parquet\n"
        "test_split: test\noutput_type: generate_until_multi_round\n"
        "doc_to_visual: !function lmms_eval.tasks.vqav2.utils.vqav2_doc_to_visual\n"
        "doc_to_text: !function tests.test_lmms_eval.chat_doc_to_text\n"
        "process_results: !function tests.test_lmms_eval.chat_process_results\ndoc_to_target: question\n"
        "generation_kwargs:\n  max_new_tokens: 12\n  temperature: 0\n  do_sample: false\n"
        "metric_list:\n  - metric: rounds\n    aggregation: mean\n    higher_is_better: true\n")
    lm = EasyGen.create_from_arg_string(model_args, {})

    r = evaluate(lm, tmp_path, ["local_chat"])

    assert r["results"]["local_chat"]["rounds,none"] == 2
    recipe = ci_demo.recipe()
    direct = Assistant(lm.qa.loaded, GenerationSettings(temperature=0, max_new_tokens=12,
                                                       image_steps=recipe.image_steps, image_scale=recipe.image_scale),
                       features=lm.qa.features)
    expected = [direct.send("What color is the shape?", [root / "0.png"]).text, direct.send("And its shape?").text]
    assert r["samples"]["local_chat"][0]["resps"][0][0] == expected and all(expected)


def test_images_out_draws_the_reply_and_returns_json(tmp_path, model_args):
    """With images_out, a reply that asks for a picture has it drawn; the reply is lmms-eval's
    {"text", "images"} JSON (as its image-generating models return it)."""
    from easygen.eval.lmms_model import EasyGen

    lm = EasyGen.create_from_arg_string(f"{model_args},images_out={tmp_path / 'drawn'}", {})
    reply = "Here it is: <Img>a red circle</Img>"
    overfit(lm.qa.loaded, [{"role": "user", "content": "Draw a red circle."}, {"role": "assistant", "content": reply}])
    write_parquet([{"question": "Draw a red circle."}], Features({"question": Value("string")}),
                  tmp_path / "draw.parquet")
    (tmp_path / "draw.yaml").write_text(
        "task: local_draw\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: draw.parquet\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_visual: !function tests.test_lmms_eval.no_visual\n"
        "doc_to_text: question\ndoc_to_target: question\ngeneration_kwargs:\n  max_new_tokens: 24\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")

    r = evaluate(lm, tmp_path, ["local_draw"])

    out = json.loads(r["samples"]["local_draw"][0]["resps"][0][0])
    assert out["text"] == reply and len(out["images"]) == 1
    picture = Path(out["images"][0])
    assert picture.is_relative_to(tmp_path / "drawn") and load_image(picture).size == (64, 64)


def test_shapes_task_gives_the_demo_evals_vqa_accuracy(tmp_path, ci_demo, model_args):
    """The repository's shapes_vqa task through lmms-eval: the same answers and the same accuracy as
    `easygen demo eval`'s VQA row on the same held-out questions."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert easygen_main(["demo", "eval", "--model", str(ci_demo.root), "--images", "3", "--draws", "1",
                             "--conversations", "1", "--out", str(tmp_path / "demo-eval")]) == 0, err.getvalue()
    demo = json.loads((tmp_path / "demo-eval" / "results.json").read_text())
    write_shapes_vqa(tmp_path / "tasks", n_images=3, seed=2024)

    r = evaluate("easygen", tmp_path / "tasks", ["shapes_vqa"], model_args)

    assert responses(r, "shapes_vqa") == predictions(tmp_path / "demo-eval" / "vqa.predictions.jsonl", "answer")
    assert 100 * r["results"]["shapes_vqa"]["exact_match,none"] == pytest.approx(demo["vqa_accuracy"])


def test_the_entry_point_lists_and_runs_easygen(tmp_path, ci_demo):
    """A fresh process: lmms-eval's registry lists the entry point's model, and its command line runs it
    on the shapes task (the README's offline example)."""
    env = {**os.environ, "EASYGEN_DEMO_DIR": str(ci_demo.root), "OMP_NUM_THREADS": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache"),  # the default feature cache stays out of ~/.cache
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    listed = subprocess.run([sys.executable, "-c", "from lmms_eval.models import get_model, list_available_models as l;"
                             "print('easygen' in l(), get_model('easygen').__module__)"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert listed.stdout.split() == ["True", "easygen.eval.lmms_model"], listed.stderr[-2000:]
    for line in readme_block("readme:lmms-eval"):  # as written; no pretrained: the (ci) demo
        run = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{line}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    assert "shapes_vqa" in run.stdout and "exact_match" in run.stdout
    results = json.loads(next((tmp_path / "lmms-results").rglob("*_results.json")).read_text())
    assert results["n-samples"]["shapes_vqa"]["effective"] == 240
    assert results["config"]["model"] == "easygen"


def test_the_readmes_benchmark_command_names_real_tasks_and_valid_model_args():
    """The real benchmarks need downloads; offline, their names and the model arguments are checked."""
    from easygen.eval import lmms_args

    argv = " ".join(line.rstrip("\\") for line in readme_block("readme:lmms-eval-benchmarks")).split()
    assert argv[:4] == ["python", "-m", "lmms_eval", "--model"] and argv[4] == "easygen"
    known = set(TaskManager("WARNING").all_tasks)
    tasks = argv[argv.index("--tasks") + 1].split(",")
    assert len(tasks) == 5 and set(tasks) <= known
    lmms_args.parse(dict(kv.split("=", 1) for kv in argv[argv.index("--model_args") + 1].split(",")))


def test_no_pretrained_is_the_demo_and_bad_model_args_are_one_line_errors(ci_demo, monkeypatch, tmp_path):
    from easygen.eval import lmms_args

    monkeypatch.setenv("EASYGEN_DEMO_DIR", str(ci_demo.root))  # built: nothing is built here
    s = lmms_args.resolve(lmms_args.parse({"feature_cache": str(tmp_path), "batch_size": None, "device": None}))
    recipe = ci_demo.recipe()
    assert Path(s.pretrained) == ci_demo.easygen and s.batch_size == 1
    assert (s.feature_steps, s.feature_scale, s.image_steps) == (recipe.feature_steps, recipe.feature_scale,
                                                                 recipe.image_steps)
    for bad, message in (({"pretrianed": "x"}, "unknown model_args key 'pretrianed'"),
                         ({"prompt_style": "fancy"}, "prompt_style='fancy': expected one of easygen, llava, task"),
                         ({"batch_size": 0}, "batch_size=0: must be at least 1"),
                         ({"feature_steps": "many"}, "feature_steps='many': expected an integer")):
        with pytest.raises(EasyGenError, match=message) as e:
            lmms_args.parse(bad)
        assert "\n" not in str(e.value)
