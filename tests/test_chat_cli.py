"""``easygen chat``: the real command, driven through a pipe, a pseudo-terminal, and in-process main().

Three tests start the real process (piped session, --prompt mode, a terminal session with Ctrl-C);
the rest call the same ``main()`` in-process with stdin replaced, which skips ~4 s of imports each.
"""
import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from easygen.assistant import Assistant, GenerationSettings
from easygen.builder import load_pretrained, save_pretrained
from easygen.cli import main
from easygen.features import ImageFeatureExtractor

from .conftest import make_image, overfit
from .terminal import Terminal, easygen

DRAW_ASK, DRAW_ANSWER = "draw a red circle", "Here it is: <Img>a red circle</Img>"


@pytest.fixture(scope="module")
def drawing_model(tmp_path_factory, tiny_dir, tiny_easygen_dir):
    """A tiny EasyGen that answers DRAW_ASK with DRAW_ANSWER (greedy), saved as a model directory."""
    loaded = load_pretrained(tiny_easygen_dir)
    overfit(loaded, [{"role": "user", "content": DRAW_ASK}, {"role": "assistant", "content": DRAW_ANSWER}])
    return save_pretrained(loaded.model, loaded.tokenizer, tmp_path_factory.mktemp("drawing") / "model", tiny_dir)


@pytest.fixture
def files(tmp_path):
    """Good and bad inputs, by name."""
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(make_image(tmp_path / "ok.png").read_bytes()[:60])
    return {"red": make_image(tmp_path / "red.png"), "txt": tmp_path / "notes.txt",
            "broken": tmp_path / "broken.png", "missing": tmp_path / "missing.png"}


def _flags(model, tmp_path, *extra):
    return ["chat", "--model-path", str(model), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "16",
            "--steps", "2", "--feature-steps", "2", "--feature-cache", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / "out"), *map(str, extra)]


def _chat(monkeypatch, capsys, argv, stdin=""):
    """main(argv) in-process with ``stdin`` piped in: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _process(argv, stdin="", cwd=None):
    return subprocess.run([sys.executable, "-m", "easygen.cli", *argv], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def _reference(loaded, tmp_path, text, images=(), **settings):
    """The same turn through the Assistant directly: what the command must print."""
    features = ImageFeatureExtractor(loaded.bidiffuser, steps=2, cache_dir=tmp_path / "ref-cache")
    s = GenerationSettings(**{**dict(temperature=0.0, max_new_tokens=16, image_steps=2), **settings})
    return Assistant(loaded, s, out_dir=tmp_path / "ref", features=features).send(text, list(images)).text


# -- the real process ---------------------------------------------------------------------------------
def test_piped_session_uploads_answers_survives_bad_input_and_saves(tiny_easygen_dir, tiny_loaded, files,
                                                                     tmp_path):
    lines = [f"/image {files['red']}", "What is in the picture?",
             f"/image {files['missing']}", f"/image {files['txt']}", f"/image {files['broken']}", "", "/frobnicate",
             "/save conv.json", "/reset", "/load conv.json", "/save again.json", "/help"]
    r = _process(_flags(tiny_easygen_dir, tmp_path), "\n".join(lines) + "\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    expected = _reference(tiny_loaded, tmp_path, "What is in the picture?", [files["red"]])
    assert r.stdout == expected + "\n"  # only the reply: no prompts or banners in a pipe
    err = r.stderr.splitlines()
    assert err[0] == f"attached {files['red']} (40x30, resized to 32x32, centre-cropped); it goes with your next " \
                     "message"
    assert err[1:6] == [f"error: image not found: {files['missing']}",
                        f"error: not an image file (or an unsupported format): {files['txt']}",
                        err[3], "error: empty message (type a question; /help for commands)",
                        "error: unknown command /frobnicate (type /help)"]
    assert err[3].startswith(f"error: corrupt or truncated image {files['broken']}")
    assert err[6:10] == ["saved 2 messages to conv.json", "new conversation",
                         "loaded 2 messages (1 image) from conv.json", "saved 2 messages to again.json"]
    assert err[10] == "in-chat commands:" and "/image PATH" in err[11]
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert saved["messages"] == [
        {"role": "user", "content": "What is in the picture?", "images": [str(files["red"])]},
        {"role": "assistant", "content": expected, "images": [], "generated": []}]
    assert json.loads((tmp_path / "again.json").read_text()) == saved  # /load restored it exactly


def test_prompt_mode_answers_once_with_a_picture(drawing_model, tmp_path):
    r = _process(_flags(drawing_model, tmp_path, "--prompt", DRAW_ASK, "--json"))
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["text"] == DRAW_ANSWER and reply["notices"] == []
    [png] = reply["images"]
    assert png.startswith(str(tmp_path / "out")) and Image.open(png).size == (32, 32)
    assert "Loading weights" not in r.stderr and "float32" not in r.stderr and "DeepSpeed" not in r.stderr
    assert "kernels" not in r.stderr and "torch.distributed" not in r.stderr  # bitsandbytes', torch's notices


def test_terminal_session_ctrl_c_stops_a_reply_and_ctrl_d_exits(drawing_model, tmp_path):
    pytest.importorskip("pty")
    argv = _flags(drawing_model, tmp_path, "--steps", "100000")  # a picture that takes long enough to stop
    term = Terminal(easygen(*argv), cwd=tmp_path)  # cwd: where /save writes
    try:
        term.wait_for("/help for commands")  # the rich banner
        term.send(DRAW_ASK)  # at the prompt: type a message
        shown = term.wait_for("drawing image 1")  # streamed up to the picture
        term.type(b"\x03")  # then Ctrl-C
        assert "Here it is:" in shown and "<Img>" not in shown
        term.wait_for("stopped; the conversation is as it was before")
        term.send("/save conv.json")
        term.wait_for("saved 0 messages")  # the stopped turn was not kept
        assert json.loads((tmp_path / "conv.json").read_text())["messages"] == []
        term.wait_for("USER")
        term.type(b"\x04")  # Ctrl-D at the next prompt
        assert term.exit_code() == 0
        assert "Traceback" not in term.text() and "drawing image" not in term.text()
    finally:
        term.close()


# -- in-process --------------------------------------------------------------------------------------
class _Writes(io.StringIO):
    """stdout that remembers each write (to see the reply arrive in pieces)."""

    def __init__(self):
        super().__init__()
        self.pieces = []

    def write(self, s):
        self.pieces.append(s)
        return super().write(s)


def test_reply_streams_token_by_token_with_sampling_flags(tiny_easygen_dir, tiny_loaded, tmp_path, monkeypatch):
    stdout = _Writes()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe the image in detail.\n"))
    flags = ["--temperature", "1.0", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "24", "--style", "simple"]
    assert main(_flags(tiny_easygen_dir, tmp_path, *flags)) == 0
    expected = _reference(tiny_loaded, tmp_path, "Describe the image in detail.", temperature=1.0, top_p=0.9,
                          seed=3, max_new_tokens=24)
    assert stdout.getvalue() == expected + "\n"
    assert len([p for p in stdout.pieces if p.strip()]) > 3  # several pieces, not one print at the end


def test_prompt_mode_text_output_and_seeded_pictures(drawing_model, tmp_path, monkeypatch, capsys):
    code, out, _ = _chat(monkeypatch, capsys, _flags(drawing_model, tmp_path, "--prompt", DRAW_ASK, "--seed", "7"))
    text, image_line = out.splitlines()
    # no raw tag reaches the reader: the picture shows as its description, then its file
    assert code == 0 and text == "Here it is: [picture: a red circle]" and image_line.startswith("image: ")
    first = image_line.removeprefix("image: ")

    def picture(*flags):
        _, out, _ = _chat(monkeypatch, capsys, _flags(drawing_model, tmp_path, "--prompt", DRAW_ASK, *flags))
        return Image.open(out.splitlines()[1].removeprefix("image: ")).tobytes()
    assert picture("--seed", "7") == Image.open(first).tobytes()  # same seed, same picture
    assert picture("--seed", "7", "--scale", "0") != Image.open(first).tobytes()


def test_an_answer_cut_inside_a_picture_tag_shows_its_words_and_a_notice(drawing_model, tmp_path, monkeypatch,
                                                                        capsys):
    from easygen.llama_tokenizer import load_tokenizer

    tok = load_tokenizer(drawing_model)
    ids = tok(DRAW_ANSWER, add_special_tokens=False).input_ids
    cut = next(k for k in range(1, len(ids)) if "<Img>a" in tok.decode(ids[:k]))
    code, out, err = _chat(monkeypatch, capsys, _flags(drawing_model, tmp_path, "--prompt", DRAW_ASK,
                                                       "--max-new-tokens", str(cut)))
    assert code == 0 and out.startswith("Here it is: a") and "<" not in out and "image:" not in out
    assert "unfinished picture tag" in err


def test_json_mode_one_object_per_turn_and_images_at_several_turns(tiny_easygen_dir, tiny_loaded, files, tmp_path,
                                                                   monkeypatch, capsys):
    spaced = make_image(tmp_path / "my photo.png", color=(40, 200, 40))
    blue = make_image(tmp_path / "blue.png", color=(40, 80, 220))
    stdin = (f"what is this?\n/image {files['missing']}\n\n/image {spaced}\n/image '{spaced}'\n/image {blue}\n"
             "and these?\n/save conv.json\n")
    argv = _flags(tiny_easygen_dir, tmp_path, "--json", "--image-file", files["red"])
    monkeypatch.chdir(tmp_path)
    code, out, err = _chat(monkeypatch, capsys, argv, stdin)
    assert code == 0
    objects = [json.loads(line) for line in out.splitlines()]
    assert objects[0] == {"text": _reference(tiny_loaded, tmp_path, "what is this?", [files["red"]]),
                          "images": [], "notices": []}
    assert objects[1:3] == [{"error": f"image not found: {files['missing']}"},
                            {"error": "empty message (type a question; /help for commands)"}]
    assert set(objects[3]) == {"text", "images", "notices"} and len(objects) == 4
    assert err.count("attached ") == 4  # --image-file, the spaced path bare and quoted, blue
    saved = json.loads((tmp_path / "conv.json").read_text())["messages"]
    assert [m["images"] for m in saved] == [[str(files["red"])], [], [str(spaced), str(spaced), str(blue)], []]
    # each distinct image was read once by BiDiffuser, with --feature-steps, into --feature-cache
    from safetensors import safe_open
    cached = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(cached) == 3
    for path in cached:
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["steps"] == "2"


def test_large_images_are_resized_and_absurd_ones_refused(tiny_easygen_dir, tiny_dir, tmp_path, monkeypatch, capsys):
    big = make_image(tmp_path / "photo.jpg", size=(4000, 3000))
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8193, 8193)).save(bomb)  # 67 megapixels of nothing: a decompression bomb
    stdin = f"/image {big}\n/image {bomb}\nwhat is it?\n"
    argv = _flags(tiny_easygen_dir, tmp_path, "--bidiffuser", tiny_dir, "--dtype", "bfloat16",
                  "--bidiffuser-dtype", "bfloat16")
    code, out, err = _chat(monkeypatch, capsys, argv, stdin)
    assert code == 0 and out.count("\n") == 1  # the question was answered
    assert f"attached {big} (4000x3000, resized to 32x32, centre-cropped)" in err
    assert f"error: image too large (8193x8193 pixels): {bomb}" in err
    from safetensors import safe_open
    [cached] = (tmp_path / "cache").rglob("*.safetensors")
    with safe_open(str(cached), framework="pt") as f:
        assert f.metadata()["dtype"] == "uvit+clip bfloat16 autocast"  # --bidiffuser-dtype reached BiDiffuser


def test_load_rejects_bad_files_with_one_line_and_keeps_the_session(tiny_easygen_dir, files, tmp_path, monkeypatch,
                                                                     capsys):
    bad = {"junk.json": "{not json", "other.json": json.dumps({"format": "llava"}),
           "odd.json": json.dumps({"format": "easygen-conversation", "version": 1,
                                   "messages": [{"role": "user", "content": "hi", "images": []}]}),
           "gone.json": json.dumps({"format": "easygen-conversation", "version": 1, "messages": [
               {"role": "user", "content": "hi", "images": ["missing.png"]},
               {"role": "assistant", "content": "yes", "images": []}]})}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    stdin = "".join(f"/load {tmp_path / name}\n" for name in [*bad, "nowhere.json"]) + "/load\n/exit\nnot read\n"
    code, out, err = _chat(monkeypatch, capsys, _flags(tiny_easygen_dir, tmp_path), stdin)
    assert code == 0 and out == ""  # /exit ended the session before the last line
    assert err.splitlines() == [
        f"error: {tmp_path / 'junk.json'}:1: invalid JSON (Expecting property name enclosed in double quotes, "
        "column 2)",
        f'error: {tmp_path / "other.json"}: not an EasyGen conversation (expected "format": "easygen-conversation")',
        f"error: {tmp_path / 'odd.json'}: 1 messages: a conversation holds user/assistant pairs",
        f"error: {tmp_path / 'gone.json'}: message 1: image not found: {tmp_path / 'missing.png'}",
        f"error: conversation file not found: {tmp_path / 'nowhere.json'}",
        "error: usage: /load FILE"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers method
def test_lora_adapter_flags_reach_the_builder(tiny_easygen_dir, tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model
    import torch
    base = load_pretrained(tiny_easygen_dir, load_bidiffuser=False)
    torch.manual_seed(0)
    adapted = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    plain = _chat(monkeypatch, capsys, _flags(tiny_easygen_dir, tmp_path, "--prompt", "hello", "--max-new-tokens", "8"))
    with_lora = _chat(monkeypatch, capsys, _flags(tmp_path / "adapter", tmp_path, "--model-base", tiny_easygen_dir,
                                                  "--prompt", "hello", "--max-new-tokens", "8"))
    expected = _reference(load_pretrained(tmp_path / "adapter", model_base=tiny_easygen_dir), tmp_path, "hello",
                          max_new_tokens=8)
    assert with_lora == (0, expected + "\n", "") and plain[1] != with_lora[1]


@pytest.mark.parametrize("flags, message", [
    (["--lora", "adapter"], "easygen: error: --lora needs --model-path (without one, the built-in demo model is used"),
    (["--model-path", "m", "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    (["--model-path", "m", "--temperature", "-1"], "--temperature: must be 0 or more"),
    (["--model-path", "m", "--image-file", "nope.png"], "easygen: error: image not found: nope.png"),
    (["--model-path", "nowhere"], "easygen: error: model directory not found: nowhere"),
    (["--model-path", "{model}", "--projector", "nope.safetensors"], "projector not found: nope.safetensors"),
    (["--model-path", "{model}", "--lora", "nope"], "not a PEFT LoRA adapter directory"),
    (["--model-path", "{model}", "--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--model-path", "{model}", "--prompt", " "], "easygen: error: empty message"),
])
def test_bad_flags_exit_2_with_one_line(flags, message, tiny_easygen_dir, tmp_path, capsys):
    try:  # argparse's own errors exit through SystemExit, ours return 2 from main()
        code = main(["chat", *[f.format(model=tiny_easygen_dir) for f in flags], "--feature-cache", str(tmp_path)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err.splitlines()[-1] and "Traceback" not in err
    assert err.startswith(("easygen: error", "usage: easygen chat"))  # ours: one line; argparse: usage, then one


def test_help_shows_every_flag_and_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model-path", "--model-base", "--lora", "--projector", "--bidiffuser", "--image-file", "--device",
                 "--dtype", "--temperature", "--top-p", "--max-new-tokens", "--seed", "--out-dir", "--steps",
                 "--scale", "--feature-steps", "--feature-cache", "--style", "--prompt", "--json"):
        assert flag in text
    assert "shapes demo model shipped in the package" in " ".join(text.split()) and "/image PATH" in text \
        and "/save FILE" in text
