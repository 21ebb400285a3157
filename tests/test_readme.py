"""The README's tiny end-to-end recipe runs as written (a README example that doesn't run is a bug)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# Where the documentation's examples live: the README and the reference pages beside it.
DOC_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def marker_place(marker: str) -> tuple[Path, list[str], int]:
    """The page holding ``<!-- marker -->``, its lines and the marker's line index; a marker must be in
    exactly one place, or a test would run one copy while readers follow the other."""
    line = f"<!-- {marker} -->"
    places = [(page, lines, i) for page in DOC_PAGES for lines in [page.read_text().splitlines()]
              for i, text in enumerate(lines) if text == line]
    assert len(places) == 1, (f"{line} must be in exactly one of README.md, docs/*.md; found in "
                              f"{[str(page.relative_to(REPO)) for page, _, _ in places] or 'none'}")
    return places[0]


def readme_block(marker: str) -> list[str]:
    """The lines of the fenced block (```bash, ```python, ```text) after ``<!-- marker -->`` in
    README.md or a docs/*.md page, without blank and comment-only lines."""
    page, lines, start = marker_place(marker)
    assert lines[start + 1] in ("```bash", "```python", "```text"), f"{page.name}: no fenced block after {marker}"
    end = lines.index("```", start + 2)
    return [line for line in lines[start + 2:end] if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_tiny_recipe_runs_end_to_end(tmp_path):
    (tmp_path / "data").symlink_to(REPO / "data", target_is_directory=True)
    bin_dir = str(Path(sys.executable).parent)  # the installed `easygen` and `bidiffuser` scripts
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    outputs = []
    for line in readme_block("readme:tiny"):
        r = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
        outputs.append(r.stdout)
    assert (tmp_path / "runs" / "tiny-stage2" / "final" / "config.json").is_file()
    assert outputs[-2].strip()  # the chat answered (nonsense from a tiny model, but an answer)
    assert list((tmp_path / "out").glob("*.png"))


def test_ci_install_and_test_commands_are_in_the_readme():
    """.ci/run executes these two blocks, and reads only README.md; they must be there and run pytest."""
    assert marker_place("ci:install")[0].name == marker_place("ci:test")[0].name == "README.md"
    assert any("pip install" in line for line in readme_block("ci:install"))
    assert any("pytest" in line for line in readme_block("ci:test"))


def test_the_bridge_example_draws_what_clip_cannot_read(tmp_path):
    """The README's bridge example on the shipped demo: through the bridge a green triangle, through
    CLIP (which never sees the colour or the shape) whatever the seed gives."""
    from PIL import Image

    from easygen.demo import world
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    script = "\n".join(readme_block("readme:bridge"))
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with Image.open(tmp_path / "out" / "bridge" / "t2i-7-0.png") as im:
        found = world.analyse_image(im.convert("RGB"))
    assert (found.colour, found.shape) == ("green", "triangle")
    assert (tmp_path / "out" / "clip" / "t2i-7-0.png").is_file()
