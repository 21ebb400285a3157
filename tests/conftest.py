"""Shared fixtures: a tiny BiDiffuser directory in the official formats, and small test images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tiny models: extra threads only add contention on a 2-core CI machine.
torch.set_num_threads(1)

# Key names and tensor shapes of the official checkpoints (U-ViT, KL VAE, caption decoder), derived
# from the reference model definitions at their real sizes; each file's "note" says what is inferred.
FORMATS = Path(__file__).resolve().parent / "fixtures" / "formats"


def official_format(name: str) -> dict:
    """Key -> shape of an official checkpoint, from tests/fixtures/formats/<name>.json."""
    path = FORMATS / f"{name}.json"
    return {k: tuple(v) for k, v in json.loads(path.read_text())["keys"].items()}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """`bidiffuser init --preset tiny` output, written once per test session."""
    from bidiffuser.model_dir import init_tiny
    root = tmp_path_factory.mktemp("tiny_bidiffuser")
    init_tiny(root, seed=0)
    return root


def make_image(path: Path, size=(40, 30), color=(220, 40, 40)) -> Path:
    """A small RGB image with a coloured rectangle on white."""
    a = np.full((size[1], size[0], 3), 255, np.uint8)
    a[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = color
    Image.fromarray(a).save(path)
    return path


def overfit(loaded, messages, steps=80) -> float:
    """Teach a (private copy of the) tiny LLM one exchange through the real forward/labels path, so
    its greedy answer is known, e.g. one holding an <Img> tag. Returns the last loss."""
    ex = loaded.processor.tokenize_conversation(messages)
    ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
    model = loaded.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


@pytest.fixture
def red_image(tmp_path) -> Path:
    return make_image(tmp_path / "red.png")


@pytest.fixture(scope="session")
def tiny_easygen_dir(tmp_path_factory, tiny_dir) -> Path:
    """A random tiny EasyGen directory whose `bidiffuser/` links the tiny BiDiffuser."""
    from easygen.tiny import init_tiny_easygen
    return init_tiny_easygen(tmp_path_factory.mktemp("tiny_easygen") / "model", tiny_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_easygen_dir):
    """The tiny EasyGen model loaded once through the builder (read-only in tests)."""
    from easygen.builder import load_pretrained
    return load_pretrained(tiny_easygen_dir, device="cpu")


@pytest.fixture(scope="session")
def ci_demo(tmp_path_factory):
    """The shapes demo built with the reduced `ci` recipe (every real stage, few steps; ~15 s), once per
    test session: the model that the server, worker and web-page tests serve."""
    from easygen.demo.recipe import build
    return build(tmp_path_factory.mktemp("ci_demo"), "ci", log=lambda line: None)


COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    """8 image-caption pairs (two images per colour, different sizes) in images/ beside the TSV."""
    root = tmp_path_factory.mktemp("captions")
    (root / "images").mkdir()
    lines = ["image\tcaption"]
    for colour, rgb in COLOURS.items():
        for k, size in enumerate([(40, 30), (32, 32)]):
            make_image(root / "images" / f"{colour}{k}.png", size=size, color=rgb)
            lines.append(f"images/{colour}{k}.png\ta {colour} square on white")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return root / "captions.tsv"
