"""Every command that shows progress (bars, status lines) runs to its end on a real terminal: the
README's tiny recipe (BiDiffuser init and sampling, features, both training stages, a chat reply),
both evaluations, and the demo build. A progress display that breaks at a terminal (a crash once
the bar closes, a bar left on the screen) fails here, where piped runs would never show it."""
import os
import re
import sys
from pathlib import Path

import pytest

from .conftest import make_image
from .terminal import Terminal, plain
from .test_readme import REPO, readme_block

pytestmark = pytest.mark.slow
# tqdm's bar on the screen: "features:  50%|█████     | 2/4 [00:01<00:01, 2.0img/s]"
BAR = re.compile(r"\d+%\|")
FINISHED_BAR = re.compile(r"100%\|[^|]*\|\s*(\d+)/\1 \[[^\]]*\]$")


def leftover_bars(screen: str) -> list[str]:
    """The screen's lines that show a bar other than a finished one alone on its line: a bar short of
    its end, or one that was never closed, so the next output ran on after it. A finished bar may stay
    (training keeps its last one as the run's summary)."""
    return [line for line in screen.splitlines() if BAR.search(line) and not FINISHED_BAR.search(line)]


def on_terminal(command: str, cwd: Path) -> str:
    """Run a shell command line on a pseudo-terminal to its end; the screen it leaves."""
    bin_dir = str(Path(sys.executable).parent)  # the installed `easygen` and `bidiffuser` scripts
    term = Terminal(["bash", "-c", command], cwd,
                    env={"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"})
    try:
        code = term.exit_code(timeout=300)
        screen = term.text()
    finally:
        term.close()
    assert code == 0 and "Traceback" not in plain(term.raw.decode(errors="replace")), f"{command}\n{screen}"
    assert not leftover_bars(screen), f"{command} left a progress bar on the screen:\n{screen}"
    # the last line was finished: a bar redrawn with \r and never ended would hold the shell's prompt
    assert term.screen.cursor.x == 0, f"{command} left its last line open:\n{screen}"
    return screen


def test_the_tiny_recipe_and_both_evals_finish_on_a_terminal(tmp_path):
    (tmp_path / "data").symlink_to(REPO / "data", target_is_directory=True)
    for k, split in enumerate(("val2014", "val2014", "val2014", "val2014", "train2014"), 1):
        (tmp_path / "coco" / split).mkdir(parents=True, exist_ok=True)
        make_image(tmp_path / "coco" / split / f"COCO_{split}_00000090000{k}.jpg")
    evals = [f"easygen eval {task} --model-path runs/tiny-stage2/final --image-root coco --out {task}.json "
             f"--feature-steps 2 --max-new-tokens 4 --min-new-tokens 1 --beam 1 --device cpu {files}"
             for task, files in (("caption", "--karpathy data/karpathy_sample.json --no-java"),
                                 ("vqa", "--questions data/vqa_sample_questions.json "
                                         "--annotations data/vqa_sample_annotations.json"))]
    for line in readme_block("readme:tiny") + evals:
        on_terminal(line, tmp_path)
    assert (tmp_path / "caption.json").is_file() and (tmp_path / "vqa.json").is_file()


def test_the_demo_build_finishes_on_a_terminal(tmp_path):
    screen = on_terminal(f"easygen demo build --recipe ci --out {tmp_path / 'demo'}", tmp_path)
    assert f"EasyGen directory: {tmp_path / 'demo' / 'easygen'}" in screen
