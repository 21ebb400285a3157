"""Training data: the readers, the data config (mixtures), and the sample files in data/."""
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from easygen.constants import IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS
from easygen.data import (CAPTION_PROMPTS, BadRows, load_mixture, read_coco, read_karpathy_captions, read_llava,
                          read_tsv)
from easygen.errors import EasyGenError

from .conftest import make_image

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def root(tmp_path):
    """An image folder with a.png .. e.png (distinct contents)."""
    images = tmp_path / "img"
    images.mkdir()
    for i, name in enumerate("abcde"):
        make_image(images / f"{name}.png", color=(40 * i, 200 - 30 * i, 90))
    return images


def write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- TSV captions
def test_tsv_captions_become_one_exchange_with_a_brief_description_prompt(tmp_path, root):
    tsv = write(tmp_path / "caps.tsv", f"image_path\tcaption\na.png\tA red box.\n\n{root / 'b.png'}\t Two boxes. \n")
    examples = read_tsv(tsv, root)
    assert [ex["source"] for ex in examples] == [f"{tsv}:2", f"{tsv}:4"]  # header and blank line skipped
    first, second = examples
    assert first["images"] == [str(root / "a.png")] and second["images"] == [str(root / "b.png")]
    user, answer = first["messages"]
    assert user["role"] == "user" and user["num_images"] == 1 and user["content"] in CAPTION_PROMPTS
    assert answer == {"role": "assistant", "content": "A red box."}
    assert second["messages"][1]["content"] == "Two boxes."
    assert read_tsv(tsv, root) == examples  # the prompt choice is deterministic


def test_tsv_malformed_rows_name_file_and_line_or_are_counted(tmp_path, root):
    tsv = write(tmp_path / "caps.tsv", "a.png\tfine\nb.png no tab\nc.png\t\nd.png\tx\ty\ne.png\tfine too\n")
    with pytest.raises(EasyGenError, match=r"caps.tsv:2: expected 'image_path<TAB>caption', got 1"):
        read_tsv(tsv, root)
    bad = BadRows(skip=True)
    examples = read_tsv(tsv, root, bad_rows=bad)
    assert [ex["source"].rsplit(":", 1)[1] for ex in examples] == ["1", "5"]
    assert bad.count == 3 and bad.examples[1] == f"{tsv}:3: empty caption"
    with pytest.raises(EasyGenError, match="captions TSV not found"):
        read_tsv(tmp_path / "missing.tsv")


# ------------------------------------------------------------------------------- COCO captions
def test_coco_captions_one_example_per_annotation(tmp_path, root):
    doc = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
           "annotations": [{"id": 7, "image_id": 1, "caption": "A box."}, {"id": 8, "image_id": 2, "caption": "B."},
                           {"id": 9, "image_id": 1, "caption": "Another box."}]}
    examples = read_coco(write(tmp_path / "captions_train.json", doc), root)
    assert [(Path(ex["images"][0]).name, ex["messages"][1]["content"]) for ex in examples] == \
        [("a.png", "A box."), ("b.png", "B."), ("a.png", "Another box.")]
    assert examples[0]["id"] == "captions_train.json:7"


def test_coco_malformed_entries_are_named(tmp_path, root):
    doc = {"images": [{"id": 1, "file_name": "a.png"}, {"file_name": "b.png"}],
           "annotations": [{"image_id": 1, "caption": "ok"}, {"image_id": 5, "caption": "x"}, {"image_id": 1}]}
    path = write(tmp_path / "c.json", doc)
    with pytest.raises(EasyGenError, match=r"c.json images\[1\]: missing 'id'"):
        read_coco(path, root)
    bad = BadRows(skip=True)
    assert len(read_coco(path, root, bad_rows=bad)) == 1 and bad.count == 3
    assert "annotations[1]: image_id 5 is not in 'images'" in bad.examples[1]
    assert "annotations[2]: missing 'caption'" in bad.examples[2]
    with pytest.raises(EasyGenError, match=r"c.json:1: invalid JSON"):
        read_coco(write(path, "{not json"), root)


# ------------------------------------------------------------------------------- LLaVA conversations
def test_llava_conversations_map_roles_and_images(tmp_path, root):
    doc = [{"id": "q1", "image": "a.png", "conversations": [
                {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A box."},
                {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
           {"id": "q2", "image": "b.png", "conversations": [  # no mark: the image goes to the first turn
                {"from": "gpt", "value": "dropped, as LLaVA does"},
                {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Boxes."}]},
           {"id": "draw", "conversations": [
                {"from": "human", "value": "Draw a cat."}, {"from": "gpt", "value": "<Img>a cat</Img>"}]},
           {"id": "two", "image": ["c.png", "d.png"], "conversations": [
                {"from": "human", "value": "<image> vs <image>?"}, {"from": "gpt", "value": "Same."}]}]
    q1, q2, draw, two = read_llava(write(tmp_path / "llava.json", doc), root)
    assert q1["id"] == "llava.json:q1" and q1["images"] == [str(root / "a.png")]
    assert q1["messages"] == [{"role": "user", "content": "What is it?\n<image>", "num_images": 1},
                              {"role": "assistant", "content": "A box."},
                              {"role": "user", "content": "Colour?", "num_images": 0},
                              {"role": "assistant", "content": "Red."}]
    assert q2["messages"][0] == {"role": "user", "content": "Describe.", "num_images": 1}
    assert draw["images"] == [] and draw["messages"][1]["content"] == "<Img>a cat</Img>"
    assert two["messages"][0]["num_images"] == 2 and len(two["images"]) == 2


@pytest.mark.parametrize("entry, problem", [
    ({"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]},
     "the turns mark 1 image.s. but the entry has 0"),
    ({"image": "a.png", "conversations": [{"from": "bot", "value": "hi"}]},
     r"conversations\[0\]: unknown speaker 'bot'"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "two human turns in a row"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>"}]},
     "answer cannot hold input"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "<Img>cat"}]}, "unbalanced"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "should end with an answer"),
    ({"conversations": []}, "non-empty list"),
    ({"image": 3, "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
     "non-empty string"),
])
def test_llava_malformed_entries_are_named_or_counted(tmp_path, root, entry, problem):
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    path = write(tmp_path / "llava.json", [good, entry])
    with pytest.raises(EasyGenError, match=rf"llava.json \[1\]: .*{problem}"):
        read_llava(path, root)
    bad = BadRows(skip=True)
    assert len(read_llava(path, root, bad_rows=bad)) == 1 and bad.count == 1


# ------------------------------------------------------------------------------- Karpathy split
def karpathy_doc():
    def entry(i, split, sentences):
        return {"filepath": "val2014", "filename": f"{'abcde'[i]}.png", "cocoid": 100 + i, "split": split,
                "sentences": [{"raw": s} for s in sentences]}
    return {"images": [entry(0, "train", ["A box.", "A red box."]), entry(1, "restval", ["B."]),
                       entry(2, "val", ["C."]), entry(3, "test", ["D."])]}


def test_karpathy_reuses_the_eval_reader_one_example_per_sentence(tmp_path, root):
    (root / "val2014").mkdir()
    for name in "ab":
        (root / f"{name}.png").rename(root / "val2014" / f"{name}.png")
    path = write(tmp_path / "dataset_coco.json", karpathy_doc())
    examples = read_karpathy_captions(path, root, split="train+restval")
    assert [(ex["images"][0], ex["messages"][1]["content"]) for ex in examples] == [
        (str(root / "val2014/a.png"), "A box."), (str(root / "val2014/a.png"), "A red box."),
        (str(root / "val2014/b.png"), "B.")]
    assert examples[0]["id"] == "dataset_coco.json:100:0" and examples[0]["source"] == f"{path} images[0]"
    with pytest.raises(EasyGenError, match="no images in split 'nope'"):
        read_karpathy_captions(path, root, split="nope")


# ------------------------------------------------------------------------------- mixtures
def mixture_config(tmp_path, root, **top):
    write(tmp_path / "caps.tsv", "".join(f"{n}.png\tcaption {n}\n" for n in "abcd"))
    write(tmp_path / "llava.json", [{"id": i, "image": "e.png", "conversations": [
        {"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(4)])
    config = {"seed": 3, "datasets": [
        {"name": "caps", "format": "tsv", "path": "caps.tsv", "image_root": "img", "weight": 1.5},
        {"name": "chat", "format": "llava", "path": "llava.json", "image_root": "img", "weight": 0.5}], **top}
    return write(tmp_path / "mix.json", config), config


def test_mixture_weights_and_ids(tmp_path, root):
    path, _ = mixture_config(tmp_path, root)
    mix = load_mixture(path)
    per_dataset = Counter(ex["dataset"] for ex in mix.train)
    assert per_dataset == {"caps": 6, "chat": 2} and mix.eval == []  # 1.5 x 4 and 0.5 x 4
    assert mix.stats == {"caps": {"read": 4, "train": 6, "eval": 0}, "chat": {"read": 4, "train": 2, "eval": 0}}
    ids = [ex["id"] for ex in mix.train]
    assert len(set(ids)) == len(ids) and sum(i.endswith("#1") for i in ids) == 2  # the extra half: copies
    assert "caps/caps.tsv:1" in ids and all(Path(im).is_absolute() for ex in mix.train for im in ex["images"])
    assert mix.images() == sorted({im for ex in mix.train for im in ex["images"]})
    assert str(root / "a.png") in mix.images()


def test_mixture_is_deterministic_and_seeded(tmp_path, root):
    path, config = mixture_config(tmp_path, root)
    first, again = load_mixture(path), load_mixture(path)
    assert first.train == again.train
    reseeded = load_mixture({**config, "seed": 4}, base_dir=tmp_path)  # a dict config works too
    assert [ex["id"] for ex in reseeded.train] != [ex["id"] for ex in first.train]
    assert Counter(ex["dataset"] for ex in reseeded.train) == Counter(ex["dataset"] for ex in first.train)


def test_mixture_eval_sets_and_max_samples(tmp_path, root):
    path, config = mixture_config(tmp_path, root)
    config["datasets"][0].update(weight=1, max_samples=3)
    config["datasets"].append({"name": "chat_eval", "format": "llava", "path": "llava.json", "image_root": "img",
                               "eval": True})
    mix = load_mixture(config, base_dir=tmp_path)
    assert mix.stats["caps"] == {"read": 4, "train": 3, "eval": 0}
    assert mix.stats["chat_eval"] == {"read": 4, "train": 0, "eval": 4}

    # all four captions (a-d.png); with seed 2 the file-name hash holds out b and c
    full = {k: v for k, v in config["datasets"][0].items() if k != "max_samples"}
    held = load_mixture({**config, "seed": 2, "datasets": [full], "eval_fraction": 0.5}, base_dir=tmp_path)
    train_images = {im for ex in held.train for im in ex["images"]}
    eval_images = {im for ex in held.eval for im in ex["images"]}
    assert {os.path.basename(i) for i in eval_images} == {"b.png", "c.png"}
    assert not train_images & eval_images  # whole images are held out


def test_mixture_yaml_config(tmp_path, root):
    _, config = mixture_config(tmp_path, root)
    lines = ["seed: 3", "datasets:"] + [f"  - {{name: {d['name']}, format: {d['format']}, path: {d['path']}, "
                                        f"image_root: img, weight: {d['weight']}}}" for d in config["datasets"]]
    yaml_path = write(tmp_path / "mix.yaml", "\n".join(lines) + "\n")
    assert load_mixture(yaml_path).train == load_mixture(tmp_path / "mix.json").train
    with pytest.raises(EasyGenError, match=r"mix.yaml:2: invalid YAML"):
        load_mixture(write(tmp_path / "mix.yaml", "seed: 1\n  bad: [\n"))


@pytest.mark.parametrize("change, problem", [
    ({"format": "csv"}, "'format' should be one of tsv, coco, llava, karpathy"),
    ({"weight": -1}, "'weight' should be a number at least 0"),
    ({"max_samples": 0}, "'max_samples' should be an integer at least 1"),
    ({"split": "train"}, "'split' is a string, for the karpathy format only"),
    ({"wieght": 2}, "unknown key.s. wieght"),
    ({"name": "chat"}, "'name' should be a unique"),
])
def test_mixture_config_errors_name_the_entry(tmp_path, root, change, problem):
    path, config = mixture_config(tmp_path, root)
    config["datasets"][0].update(change)
    with pytest.raises(EasyGenError, match=rf"mix.json datasets\[[01]\]: {problem}"):
        load_mixture(write(path, config))


def test_mixture_missing_images_and_bad_rows_raise_or_are_skipped(tmp_path, root):
    path, _ = mixture_config(tmp_path, root)
    (root / "c.png").unlink()
    write(tmp_path / "caps.tsv", "a.png\tok\nb.png\nc.png\tgone\nd.png\tok\n")
    with pytest.raises(EasyGenError, match=r"caps.tsv:2: expected"):
        load_mixture(path)
    mix = load_mixture(path, on_error="skip")
    assert mix.skipped == 2 and mix.stats["caps"]["read"] == 2
    assert mix.skipped_examples[1] == f"{tmp_path / 'caps.tsv'}:3: image not found: {root / 'c.png'}"
    assert "2 malformed row(s) skipped" in mix.summary()
    assert load_mixture(path, on_error="skip", check_images=False).stats["caps"]["read"] == 3


# ------------------------------------------------------------------------------- the sample files
def test_sample_files_load_and_tokenize():
    from easygen.processor import EasyGenProcessor
    from easygen.tiny import build_llama_tokenizer

    for reader, name in ((read_tsv, "captions_sample.tsv"), (read_coco, "coco_captions_sample.json"),
                         (read_llava, "llava_sample.json")):
        assert reader(DATA / name, DATA / "images")
    mix = load_mixture(DATA / "mixture_sample.json")
    assert mix.train and mix.eval and mix.skipped == 0
    for image in mix.images():
        with Image.open(image) as im:
            assert im.size == (64, 64) and Path(image).stat().st_size < 1024

    processor = EasyGenProcessor(build_llama_tokenizer(None))
    for ex in mix.train + mix.eval:  # what the trainer will do with every example
        out = processor.tokenize_conversation(ex["messages"])
        assert list(out["input_ids"]).count(IMAGE_TOKEN_ID) == NUM_IMAGE_TOKENS * len(ex["images"])
        assert any(label != -100 for label in out["labels"])
