"""The README's conversation, played to its end the way a person plays it: plain ``easygen chat``
(no flags, a fresh home: the shipped demo model) on a real pseudo-terminal in the default rich
style and in ``--style simple``, and with piped input. Two uploads at different sizes, follow-ups,
a drawing, a question about it, an image-grounded drawing, /save, /reset, /load and Ctrl-D.

What a person would see is what is checked: the screen replayed through a terminal emulator has
no traceback, every picture is announced as "[picture: ...]" on an intact line and then
"image: PATH", and each PATH is a PNG that was written. (How good the answers are is the demo
eval's business: tests/test_demo_quality.py.)
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


from .terminal import Terminal, easygen, plain
from .test_readme import readme_block


# The README's conversation: the pictures to upload, then what is typed.
SETUP = [line for line in readme_block("readme:pictures") if line.startswith("easygen demo picture")]
SCRIPT = readme_block("readme:conversation")
DRAWINGS = sum(line.startswith("Draw") for line in SCRIPT)
MESSAGES = 2 * sum(not line.startswith("/") for line in SCRIPT[:SCRIPT.index("/reset")])
UPLOADS = sum(line.startswith("/image") for line in SCRIPT)


def shown_after(typed: str) -> str:
    """What shows once a typed line is done: a command's confirmation, else a reply's role line."""
    name, _, arg = typed.partition(" ")
    return {"/image": f"attached {arg}", "/save": f"saved {MESSAGES} messages", "/reset": "new conversation",
            "/load": f"loaded {MESSAGES} messages ({UPLOADS} images)"}.get(name, "ASSISTANT")


PICTURE = re.compile(r"^(?:ASSISTANT: )?.*\[picture: [a-z ]+\]$")
IMAGE = re.compile(r"^image: (\S+\.png)$")


@pytest.fixture
def home(tmp_path):
    """A fresh user: an empty home and cache, the two pictures to upload in the working folder."""
    for line in SETUP:  # `easygen demo picture ...`, as the README runs it
        subprocess.run([sys.executable, "-m", "easygen.cli", *shlex.split(line)[1:]], cwd=tmp_path, check=True,
                       capture_output=True)
    env = {"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache"), "EASYGEN_DEMO_DIR": None}
    return tmp_path, env


def _check_pictures(lines: list[str], cwd: Path) -> None:
    """Each drawing: an intact "[picture: ...]" line, then "image: PATH" naming a PNG on disk."""
    pictures = [k for k, line in enumerate(lines) if PICTURE.match(line)]
    images = [(k, IMAGE.match(line).group(1)) for k, line in enumerate(lines) if IMAGE.match(line)]
    assert len(pictures) == DRAWINGS and len(images) == DRAWINGS, "\n".join(lines)
    for k, (at, path) in zip(pictures, images):
        assert at == k + 1, f"'image:' does not follow its picture line:\n" + "\n".join(lines)
        assert Path(path).parent == cwd / "easygen-images" and Image.open(path).format == "PNG"
    assert len(list((cwd / "easygen-images").glob("*.png"))) == DRAWINGS
    saved = json.loads((cwd / "conversation.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"] * (MESSAGES // 2)
    assert sum(len(m.get("generated", [])) for m in saved) == DRAWINGS


@pytest.mark.slow
@pytest.mark.parametrize("style", ["rich", "simple"])
def test_the_readme_conversation_on_a_terminal(style, home):
    cwd, env = home
    term = Terminal(easygen("chat") if style == "rich" else easygen("chat", "--style", style), cwd, env,
                    columns=200)  # wide enough for the pictures' paths
    try:
        term.wait_for("/help for commands", timeout=90)  # the banner: the model is loaded
        for typed in SCRIPT:
            term.send(typed)
            term.wait_for(shown_after(typed))
        term.wait_for("USER")
        term.type(b"\x04")  # Ctrl-D at the prompt
        assert term.exit_code() == 0
        screen = term.text()
    finally:
        term.close()
    assert "Traceback" not in plain(term.raw.decode(errors="replace")), screen
    lines = [line.strip() for line in screen.splitlines()]
    assert not any("error" in line for line in lines), screen
    _check_pictures(lines[:lines.index("new conversation")], cwd)
    assert "drawing image" not in screen  # the bars went once the pictures were drawn
    # /load shows the transcript: both users' uploads and both pictures by path
    transcript = screen[screen.rindex("new conversation"):]
    assert transcript.count("[image: ") == UPLOADS + DRAWINGS, screen


@pytest.mark.slow
def test_the_readme_conversation_piped(home):
    cwd, env = home
    stdin = "".join(typed + "\n" for typed in SCRIPT)
    r = subprocess.run([sys.executable, "-m", "easygen.cli", "chat"], input=stdin, capture_output=True, text=True,
                       cwd=cwd, env={k: v for k, v in {**os.environ, **env}.items() if v is not None},
                       timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    _check_pictures(lines, cwd)
    # stdout: one line per reply, plus the pictures' image: lines; the rest is on stderr
    assert len(lines) == MESSAGES // 2 + DRAWINGS, r.stdout
    assert "drawing image" not in r.stderr and shown_after("/load x") in r.stderr
