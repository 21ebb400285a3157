"""EasyGen's image replies drawn by the released systems, from their files in the layout users
download (tiny, random): through the Assistant, `easygen chat`, `easygen serve` (official OpenAI
client) and `easygen worker` (the stock FastChat controller and API server). The picture is the
backend's own drawing of the description, and the next turn shows it to the LLM."""
from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from easygen.assistant import Assistant, GenerationSettings
from easygen.builder import load_pretrained, save_pretrained
from easygen.cli import main as easygen_main

from .conftest import overfit
from .serving import easygen_serve, free_port, running

SIDE = 64  # drawn at 64 px (the references' 512 px would only slow the tests)
ASK, DESCRIPTION = "draw a red circle", "a red circle"


def _ella(root: Path) -> tuple[Path, list[str]]:
    from drawing.tiny_layouts_ella import write_tiny_ella
    return write_tiny_ella(root / "ella"), []


def _lavi(root: Path) -> tuple[Path, list[str]]:
    from drawing.tiny_layouts_lavi import write_tiny_lavi
    return write_tiny_lavi(root / "lavi") / "t5_unet", []


def _paradiffusion(root: Path) -> tuple[Path, list[str]]:
    from drawing.tiny_layouts_paradiffusion import write_tiny_paradiffusion
    tokenizer = Path(__file__).parent / "fixtures" / "llama_tokenizer" / "tokenizer.model"
    return write_tiny_paradiffusion(root / "paradiffusion", tokenizer), []


LAYOUTS = {"ella": _ella, "lavi-bridge": _lavi, "paradiffusion": _paradiffusion}


@pytest.fixture(scope="module")
def drawer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {name: make(root) for name, make in LAYOUTS.items()}


@pytest.fixture(scope="module")
def drawing_model(tiny_easygen_dir, tmp_path_factory):
    """The tiny EasyGen model taught to answer ASK with <Img>DESCRIPTION</Img>, saved as a model directory."""
    loaded = load_pretrained(tiny_easygen_dir, device="cpu")
    assert overfit(loaded, [{"role": "user", "content": ASK},
                            {"role": "assistant", "content": f"<Img>{DESCRIPTION}</Img>"}]) < 0.1
    out = tmp_path_factory.mktemp("drawing_model") / "model"
    return save_pretrained(loaded.model, loaded.tokenizer, out, tiny_easygen_dir / "bidiffuser")


def _flags(name: str, drawer_dirs) -> list[str]:
    path, extra = drawer_dirs[name]
    return ["--draw-with", name, "--drawer", str(path), "--drawer-option", f"width={SIDE}",
            "--drawer-option", f"height={SIDE}", "--drawer-option", "steps=2", *extra]


def _load(model, name, drawer_dirs):
    path, _ = drawer_dirs[name]
    return load_pretrained(model, device="cpu", draw_with=name, drawer=path,
                           drawer_options={"width": SIDE, "height": SIDE, "steps": 2})


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_assistant_draws_with_the_backend_and_shows_the_picture_next(name, drawing_model, drawer_dirs, tmp_path):
    from easygen.constants import IMAGE_TOKEN_ID
    loaded = _load(drawing_model, name, drawer_dirs)
    assert loaded.draw_with == name
    a = Assistant(loaded, GenerationSettings(temperature=0, max_new_tokens=16, seed=5), out_dir=tmp_path)
    reply = a.send(ASK)
    assert reply.text == f"<Img>{DESCRIPTION}</Img>" and len(reply.image_paths) == 1
    # the backend's own drawing of the description (its text encoder read it), with the turn's seed
    expected = loaded.drawer.draw([DESCRIPTION], [5])[0]
    assert expected.size == (SIDE, SIDE)
    assert np.abs(_pixels(Image.open(reply.image_paths[0])) - _pixels(expected)).max() <= 1
    turn = a.prepare("what color did you make it?")
    assert turn.ids.count(IMAGE_TOKEN_ID) == loaded.model.config.num_image_tokens  # the drawn picture, shown


def test_without_a_bidiffuser_the_drawn_picture_is_not_shown_and_the_next_turn_works(drawing_model, drawer_dirs,
                                                                                      tmp_path):
    """A text-only EasyGen (no BiDiffuser, so no image reader) that draws with a released backend: the
    next turn goes on without the picture instead of failing to read it."""
    from easygen.builder import save_pretrained
    from easygen.constants import IMAGE_TOKEN_ID
    full = load_pretrained(drawing_model, device="cpu")
    text_only = save_pretrained(full.model, full.tokenizer, tmp_path / "text-only")
    path, _ = drawer_dirs["ella"]
    loaded = load_pretrained(text_only, device="cpu", draw_with="ella", drawer=path,
                             drawer_options={"width": SIDE, "height": SIDE, "steps": 2})
    a = Assistant(loaded, GenerationSettings(temperature=0, max_new_tokens=16, seed=5), out_dir=tmp_path / "pics")
    assert a.features is None and len(a.send(ASK).image_paths) == 1
    assert a.prepare("what color did you make it?").ids.count(IMAGE_TOKEN_ID) == 0
    a.send("what color did you make it?")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_easygen_chat_prompt_draws_with_the_backend(name, drawing_model, drawer_dirs, tmp_path, capsys):
    rc = easygen_main(["chat", "--model-path", str(drawing_model), "--prompt", ASK, "--temperature", "0",
                       "--out-dir", str(tmp_path / "pics"), "--feature-cache", str(tmp_path / "fc"),
                       *_flags(name, drawer_dirs)])
    out = capsys.readouterr().out
    drawn = list((tmp_path / "pics").glob("*.png"))
    assert rc == 0 and len(drawn) == 1 and str(drawn[0].name) in out
    assert Image.open(drawn[0]).size == (SIDE, SIDE)


def _data_url_image(markdown: str) -> Image.Image:
    url = markdown.split("](", 1)[1].split(")", 1)[0]
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


@pytest.mark.slow
def test_easygen_serve_draws_with_a_backend(drawing_model, drawer_dirs, tmp_path):
    """Chat and /v1/images/generations through ELLA; the worker test below serves all three backends
    (the server code is the same for each: the backend's own size is what differs, checked here)."""
    name = "ella"
    with easygen_serve(drawing_model, tmp_path, "--temperature", "0", *_flags(name, drawer_dirs)) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        chat = c.chat.completions.create(model=c.models.list().data[0].id, temperature=0, seed=3,
                                         messages=[{"role": "user", "content": ASK}])
        assert _data_url_image(chat.choices[0].message.content).size == (SIDE, SIDE)
        r = c.images.generate(model=c.models.list().data[0].id, prompt=DESCRIPTION, n=1,
                              response_format="b64_json", extra_body={"seed": 3})
        assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size == (SIDE, SIDE)
        with pytest.raises(openai.BadRequestError, match=f"{SIDE}x{SIDE}"):
            c.images.generate(model=c.models.list().data[0].id, prompt=DESCRIPTION, size="1024x1024")


@pytest.mark.slow
def test_easygen_worker_draws_with_each_backend(drawing_model, drawer_dirs, tmp_path):
    """One stock controller and API server, one worker per backend (model names = backend names)."""
    py = sys.executable
    ctl, api = free_port(), free_port()
    controller = f"http://127.0.0.1:{ctl}"
    workers = {name: free_port() for name in LAYOUTS}
    import contextlib
    with contextlib.ExitStack() as stack:
        stack.enter_context(running([py, "-m", "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(ctl)],
                                    f"{controller}/test_connection", tmp_path / "controller.log", cwd=tmp_path))
        for name, port in workers.items():
            stack.enter_context(running(
                [py, "-m", "easygen.cli", "worker", "--model-path", str(drawing_model), "--port", str(port),
                 "--controller-address", controller, "--model-name", name, "--temperature", "0",
                 "--feature-cache", str(tmp_path / f"features-{name}"), *_flags(name, drawer_dirs)],
                f"http://127.0.0.1:{port}/", tmp_path / f"worker-{name}.log", cwd=tmp_path))
        stack.enter_context(running([py, "-m", "fastchat.serve.openai_api_server", "--host", "127.0.0.1",
                                     "--port", str(api), "--controller-address", controller],
                                    f"http://127.0.0.1:{api}/v1/models", tmp_path / "api.log", cwd=tmp_path))
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{api}/v1", api_key="none", max_retries=0, timeout=120)
        assert sorted(m.id for m in c.models.list().data) == sorted(workers)
        for name in workers:
            chat = c.chat.completions.create(model=name, temperature=0, messages=[{"role": "user", "content": ASK}])
            assert _data_url_image(chat.choices[0].message.content).size == (SIDE, SIDE), name


def test_an_offloaded_backend_draws_the_same_picture(drawing_model, drawer_dirs):
    """--drawer-offload: the weights wait on the CPU between pictures and the picture is unchanged."""
    from drawing.backend import Offloaded
    path, _ = drawer_dirs["ella"]
    plain = _load(drawing_model, "ella", drawer_dirs).drawer
    offloaded = load_pretrained(drawing_model, device="cpu", draw_with="ella", drawer=path,
                                drawer_options={"width": SIDE, "height": SIDE, "steps": 2, "offload": True}).drawer
    assert isinstance(offloaded, Offloaded) and "while drawing" in offloaded.describe()
    a, b = plain.draw([DESCRIPTION], [9])[0], offloaded.draw([DESCRIPTION], [9])[0]
    assert np.array_equal(_pixels(a), _pixels(b))
    assert next(offloaded.backend.unet.parameters()).device.type == "cpu"


@pytest.mark.slow
def test_the_readme_drawing_block_runs_on_the_released_layouts(drawer_dirs, tmp_path):
    """README's `readme:drawing` block, line by line, in a folder holding the three systems' tiny
    files where the README says the downloads go; each line gets flags that make it quick (2 steps,
    64 px), nothing else changes."""
    import os
    import shutil
    import subprocess

    from .test_readme import readme_block
    for name, where in (("ella", "ella"), ("lavi-bridge", "lavi/t5_unet"), ("paradiffusion", "paradiffusion")):
        source = drawer_dirs[name][0]
        source = source.parent if name == "lavi-bridge" else source
        target = tmp_path / "weights" / where.split("/")[0]
        shutil.copytree(source, target)
    quick = {"draw": "--steps 2 --width 64 --height 64 --quiet",
             "chat": "--drawer-option steps=2 --drawer-option width=64 --drawer-option height=64 "
                     f"--feature-cache {tmp_path / 'fc'}"}
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "OMP_NUM_THREADS": "1"}
    lines = readme_block("readme:drawing")
    assert [line.split()[1] for line in lines] == ["draw", "draw", "draw", "chat"]
    for line in lines:
        r = subprocess.run(f"{line} {quick[line.split()[1]]}", shell=True, cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
    for folder in ("ella", "lavi", "para", "chat"):
        pictures = list((tmp_path / "out" / folder).glob("*.png"))
        assert len(pictures) == 1 and Image.open(pictures[0]).size == (64, 64), folder


def test_eval_t2i_draws_a_benchmark_with_a_released_backend(drawing_model, drawer_dirs, tmp_path, capsys):
    """`easygen eval t2i --draw-with ella`: ParaPrompts' layout, each picture the backend's own
    drawing of the prompt with the benchmark seed, and the summary names the backend."""
    para = Path(__file__).parent / "fixtures" / "t2i" / "paraprompts" / "ParaPrompts_400.csv"
    out = tmp_path / "para"
    rc = easygen_main(["eval", "t2i", "--model-path", str(drawing_model), "--benchmark", "paraprompts",
                       "--prompts", str(para), "--out", str(out), "--limit", "2", "--seed", "4", "--quiet",
                       "--device", "cpu", *_flags("ella", drawer_dirs)])
    summary = capsys.readouterr().out
    assert rc == 0 and "ella" in summary and "2 steps" in summary
    pictures = sorted(out.glob("*.png"))
    assert len(pictures) == 2
    import csv
    with open(para, newline="") as f:
        first = next(csv.DictReader(f))
    prompt = next(v for k, v in first.items() if "prompt" in k.lower())
    drawer = _load(drawing_model, "ella", drawer_dirs).drawer
    picture = next(p for p in pictures if p.stem == Path(first[next(k for k in first if "image" in k.lower())]).stem)
    assert np.abs(_pixels(Image.open(picture)) - _pixels(drawer.draw([prompt], [4])[0])).max() <= 1


def test_the_profile_counts_a_released_backends_weights(drawing_model, drawer_dirs):
    """`--profile`'s resident weights include the backend's (ELLA: connector, T5, U-Net, VAE)."""
    from easygen.profiling import module_bytes, resident_weight_bytes
    loaded = _load(drawing_model, "ella", drawer_dirs)
    d = loaded.drawer
    with_drawer = resident_weight_bytes(loaded)
    loaded.drawer = None
    assert with_drawer - resident_weight_bytes(loaded) == module_bytes(d.connector, d.t5, d.unet, d.vae) > 0
