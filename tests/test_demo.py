"""The shapes demo end to end with the reduced `ci` recipe (the real stages, few steps): build ->
chat one-shot -> PNG written, chat about an uploaded image, `demo eval`, resuming a build, and the
data files read by the normal readers. Quality is measured by `easygen demo eval`, not asserted here."""
import json
import os

import pytest
from PIL import Image

from easygen.cli import main
from easygen.demo import world
from easygen.demo.dataset import write_eval_data, write_training_data
from easygen.demo.recipe import RECIPES, STAGES, DemoModel, build
from easygen.errors import EasyGenError

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoModel:
    root = tmp_path_factory.mktemp("demo")
    lines = []
    model = build(root, "ci", log=lines.append)
    assert [line.split(":")[0] for line in lines if line.startswith("[") and line.endswith(" s")] == \
        [f"[{k}/{len(STAGES)}] {name}" for k, (name, _, _) in enumerate(STAGES, 1)]  # progress per stage
    return model


def _run(monkeypatch, capsys, demo_root, *argv):
    monkeypatch.setenv("EASYGEN_DEMO_DIR", str(demo_root))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_build_writes_a_normal_model_pair(demo):
    from bidiffuser.model_dir import read_config
    from easygen.builder import load_pretrained

    manifest = json.loads(demo.manifest.read_text())
    assert manifest["format"] == "easygen-demo-shapes" and manifest["recipe"]["name"] == "ci"
    assert os.readlink(demo.easygen / "bidiffuser") == os.path.join("..", "bidiffuser")  # relative: movable
    bd = read_config(demo.bidiffuser)
    assert bd.resolution == 64 and bd.uvit.num_text_tokens == 16 and bd.autoencoder.downsample_factor == 8
    assert not any(p.is_symlink() for p in demo.bidiffuser.iterdir())  # the final BiDiffuser holds its own files
    loaded = load_pretrained(demo.easygen)
    assert loaded.model.config.num_image_tokens == 16 and loaded.bidiffuser is not None
    ids = loaded.processor.tokenizer("What color is the shape?")["input_ids"]
    assert len(ids) <= 8  # the tokenizer was trained on the world's text


def test_chat_without_model_flags_uses_the_demo_and_draws(demo, tmp_path, monkeypatch, capsys):
    code, out, err = _run(monkeypatch, capsys, demo.root, "chat", "--prompt", "Draw a red circle.", "--temperature",
                          "0", "--out-dir", str(tmp_path), "--steps", "2")
    assert code == 0, err
    text, picture = out.splitlines()
    # the picture shows as its description, never as a raw tag
    assert "[picture: " in text and "<Img>" not in text and picture.startswith("image: ")
    with Image.open(picture.removeprefix("image: ")) as im:
        assert im.size == (64, 64)
    assert "building" not in err  # already built: no rebuild


def test_chat_builds_the_demo_first_when_it_is_absent(tmp_path, monkeypatch, capsys):
    from easygen.demo import recipe
    monkeypatch.setitem(recipe.RECIPES, "full", recipe.RECIPES["ci"])  # the default recipe, made small
    code, out, err = _run(monkeypatch, capsys, tmp_path / "cache", "chat", "--prompt", "Draw a red circle.",
                          "--temperature", "0", "--out-dir", str(tmp_path / "png"), "--steps", "2")
    assert code == 0, err
    assert "building the built-in shapes demo model" in err and f"[{len(STAGES)}/{len(STAGES)}] {STAGES[-1][0]}" in err
    assert "[picture: " in out.splitlines()[0] and DemoModel(tmp_path / "cache").is_built()


def test_chat_reads_an_uploaded_image(demo, tmp_path, monkeypatch, capsys):
    image = tmp_path / "shape.png"
    world.draw(world.Scene("blue", "square", 30, 10, 12)).save(image)
    code, out, err = _run(monkeypatch, capsys, demo.root, "chat", "--json", "--image-file", str(image), "--prompt",
                          "What color is the shape?", "--max-new-tokens", "4", "--feature-cache", str(tmp_path / "c"))
    assert code == 0, err
    assert set(json.loads(out)) == {"text", "images", "notices"}


def test_a_conversation_with_an_image_a_follow_up_and_a_late_drawing(demo, tmp_path, monkeypatch, capsys):
    """Piped into `easygen chat --json`: an upload, a follow-up without it, a drawing late in the
    conversation, then a question about that drawing, which the model sees in that turn."""
    import io
    import sys

    from easygen.assistant import Assistant
    from easygen.constants import IMAGE_TOKEN_ID

    image = tmp_path / "shape.png"
    world.draw(world.Scene("blue", "square", 30, 10, 12)).resize((96, 96)).save(image)
    stdin = (f"/image {image}\nWhat color is the shape?\nAnd its shape?\nDraw a red circle.\n"
             "What color did you make it?\n/save conv.json\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(monkeypatch, capsys, demo.root, "chat", "--json", "--temperature", "0",
                          "--max-new-tokens", "40", "--out-dir", str(tmp_path / "png"), "--feature-cache",
                          str(tmp_path / "cache"))
    assert code == 0, err
    replies = [json.loads(line) for line in out.splitlines()]
    assert len(replies) == 4 and all(set(r) == {"text", "images", "notices"} and r["text"] for r in replies), replies
    assert len(replies[2]["images"]) == 1, replies  # the drawing came as the 3rd answer
    saved = json.loads((tmp_path / "conv.json").read_text())["messages"]
    assert [len(m["images"]) for m in saved] == [1, 0, 0, 0, 0, 0, 0, 0]
    assert saved[5]["generated"] == replies[2]["images"]
    shown = Assistant._shown_images(saved)
    assert shown[6] == replies[2]["images"]  # the 4th question showed the model its drawing
    from easygen.builder import load_pretrained
    loaded = load_pretrained(demo.easygen)
    a = Assistant(loaded)
    a.from_json(json.loads((tmp_path / "conv.json").read_text()))
    ids = a._prompt_ids(a.messages[:7])
    assert ids.count(IMAGE_TOKEN_ID) == 2 * loaded.model.config.num_image_tokens  # upload + drawing


def test_demo_eval_runs_every_measure(demo, tmp_path, monkeypatch, capsys):
    from easygen.demo.conversations import KINDS

    code, out, err = _run(monkeypatch, capsys, demo.root, "demo", "eval", "--images", "3", "--draws", "1",
                          "--conversations", "6", "--out", str(tmp_path))
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("caption_accuracy", "vqa_accuracy", "image_colour_accuracy", "image_shape_accuracy", "cider"):
        assert 0 <= results[key] <= 100 or key == "cider", key
    assert set(results["vqa_by_type"]) == {"color", "shape"}  # VQAv2's answer types, as the annotations name them
    assert len(results["drawings"]) == 18 and "target >= 95%" in out
    assert results["readback_check"] == {"images": 1000, "right": 1000, "seed": 2024}
    table = results["conversations"]
    assert set(table) == set(KINDS) and "Conversations: 6 held-out scripts" in out
    turns = results["conversation_turns"]
    assert sum(row["turns"] for row in table.values()) == len(turns) >= 12
    assert {t["conversation"] for t in turns} == set(range(6))
    for kind, description in KINDS.items():
        assert description in out


def test_demo_eval_quick_and_demo_picture(demo, tmp_path, monkeypatch, capsys):
    code, out, err = _run(monkeypatch, capsys, demo.root, "demo", "eval", "--quick", "--draws", "3",
                          "--conversations", "2", "--out", str(tmp_path))
    assert code == 0, err
    results = json.loads((tmp_path / "quick" / "results.json").read_text())
    assert len(results["drawings"]) == 3 and results["seed"] == 7 and "reduced check (held-out seed 7)" in out
    assert {t["conversation"] for t in results["conversation_turns"]} == {0, 1}
    code, out, err = _run(monkeypatch, capsys, demo.root, "demo", "picture", "green", "square",
                          str(tmp_path / "g.png"), "--size", "96", "--left", "3")
    assert code == 0 and Image.open(tmp_path / "g.png").size == (96, 96)
    found = world.analyse_image(Image.open(tmp_path / "g.png").convert("RGB").resize((64, 64), Image.NEAREST))
    assert (found.colour, found.shape) == ("green", "square")
    code, out, err = _run(monkeypatch, capsys, demo.root, "demo", "picture", "green", "square", "x.png", "--side", "50")
    assert code == 2 and "must lie inside" in err


def test_rebuild_reuses_finished_stages_and_refuses_another_recipe(demo):
    import fcntl
    names = [name for name, _, _ in STAGES]
    demo.manifest.unlink()  # as if killed while the U-ViT's final directory was being written: the
    for name in names[names.index("easygen-objective"):]:  # stage's copies are there, its marker is not
        (demo.root / "stages" / f"{name}.json").unlink()
    with open(demo.root / "stages" / ".lock", "w") as lock:  # another build holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(EasyGenError, match="another process is building the demo"):
            build(demo.root, "ci", log=print)
    lines = []
    build(demo.root, "ci", log=lines.append)
    assert sum("done before, skipped" in line for line in lines) == names.index("easygen-objective")
    assert demo.is_built() and (demo.easygen / "model.safetensors").is_file()
    with pytest.raises(EasyGenError, match="built with recipe 'ci'"):
        build(demo.root, "full", log=lines.append)


def test_data_files_read_by_the_normal_readers(tmp_path):
    from easygen.data import load_mixture
    from easygen.eval.data import read_captions, read_vqa

    paths = write_training_data(tmp_path / "train", 60, seed=0, draw_copies=2, n_conversations=5)
    rows = paths["captions.tsv"].read_text().splitlines()
    assert len(rows) == 1 + 120 and all(world.parse_description(r.split("\t")[1]) != (None, None) for r in rows[1:])
    stage2 = load_mixture(paths["instruct_data.json"])
    single = [ex for ex in stage2.train if len(ex["messages"]) == 2]
    draws = [ex for ex in single if not ex["images"]]
    n_requests = 18 * len(world.DRAW_REQUESTS)
    assert len(draws) == 2 * n_requests and all("<Img>" in ex["messages"][-1]["content"] for ex in draws)
    assert len(single) - len(draws) == 180  # caption, colour and shape question per image
    assert len(stage2.train) - len(single) == 5  # the conversations (2 to 6 turns)
    assert len(load_mixture(paths["pretrain_data.json"]).train) == 120

    karpathy, questions, annotations, items = write_eval_data(tmp_path / "eval", 4, seed=5)
    _, samples = read_captions(karpathy, tmp_path / "eval")
    assert [s.references[0] for s in samples] == [scene.caption for _, scene in items]
    vqa = read_vqa(questions, annotations, tmp_path / "eval")
    assert sorted(s.answers[0] for s in vqa) == sorted([sc.colour for _, sc in items] + [sc.shape for _, sc in items])
    # another seed, other images: held-out data is not the training data
    assert [s for _, s in items] != [s for _, s in write_eval_data(tmp_path / "eval2", 4, seed=0)[3]]


def test_recipes_are_consistent():
    assert set(RECIPES) == {"full", "ci"} and RECIPES["full"].name == "full"
