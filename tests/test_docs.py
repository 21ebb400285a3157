"""README.md and docs/*.md hold together: every relative link lands on a file (and heading) that
exists, and every `easygen`/`bidiffuser` command shown in a ```bash block parses with the real CLI,
so a renamed or removed flag breaks this test rather than a reader's first try."""
import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from .test_readme import DOC_PAGES, REPO

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(lines: list[str]):
    """(line number, line) outside fenced blocks."""
    fence = False
    for n, line in enumerate(lines, 1):
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, counts = set(), {}
    for _, line in _prose(page.read_text().splitlines()):
        m = re.match(r"^#{1,6} (.*)", line)
        if m:
            base = slug(m.group(1))
            k = counts[base] = counts.get(base, -1) + 1  # a repeated heading gets -1, -2, ...
            found.add(f"{base}-{k}" if k else base)
    return found


def link_errors(page: Path, root: Path = REPO) -> list[str]:
    errors = []
    for n, line in _prose(page.read_text().splitlines()):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(root)}:{n}: {target}"
            if not dest.exists():
                errors.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                errors.append(f"{where}: no heading with that anchor in {dest.relative_to(root)}")
    return errors


def test_every_relative_link_resolves():
    errors = [e for page in DOC_PAGES for e in link_errors(page)]
    assert not errors, "\n".join(errors)


def test_link_check_catches_a_missing_anchor_and_file(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Top\n## Install: `pip`\n## Install: `pip`\n")
    page = tmp_path / "docs" / "probe.md"
    page.write_text("# Probe\n[ok](#probe) [bad](#nowhere) [gone](missing.md) [ok](../README.md#install-pip-1)\n"
                    "`[not a link](#in-code)`\n```\n[not a link](#in-a-block)\n```\n[bad](../README.md#install)\n")
    errors = link_errors(page, root=tmp_path)
    assert [e.split(": ")[1] for e in errors] == ["#nowhere", "missing.md", "../README.md#install"], errors


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def _cli_parsers() -> dict[str, argparse.ArgumentParser]:
    from bidiffuser.cli import build_parser as bidiffuser_parser
    from easygen.cli import build_parser as easygen_parser
    parsers = {"easygen": easygen_parser(), "bidiffuser": bidiffuser_parser()}
    for root in parsers.values():
        for p in _all_parsers(root):
            p.allow_abbrev = False  # `--feature-step` must not pass for a flag renamed `--feature-steps-n`
    return parsers


def shown_commands(page: Path):
    """(line number, program, argv) for each `easygen`/`bidiffuser` command in the page's ```bash blocks,
    continuation lines joined; `torchrun ... -m easygen.cli` and `VAR=value easygen ...` count too."""
    lines, inside, start, buf = page.read_text().splitlines(), False, 0, ""
    for n, line in enumerate(lines, 1):
        if line.startswith("```"):
            inside = line == "```bash"
            continue
        if not inside or (not buf and (not line.strip() or line.lstrip().startswith("#"))):
            continue
        start = start if buf else n
        buf += line.rstrip("\\") + " "
        if line.endswith("\\"):
            continue
        lexer = shlex.shlex(buf, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)  # quotes honoured, comments dropped, `&&`, `;`, `|`, `(` become tokens
        parts = [[]]
        for token in tokens:
            if set(token) <= set("&|;()<>"):
                parts.append([])
            else:
                parts[-1].append(token)
        for words in parts:
            while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
                words.pop(0)
            if words[:1] in (["easygen"], ["bidiffuser"]):
                yield start, words[0], words[1:]
            elif "-m" in words and words[words.index("-m") + 1:][:1] == ["easygen.cli"]:
                yield start, "easygen", words[words.index("-m") + 2:]
        buf = ""


def parse_error(parsers, program: str, argv: list[str]) -> str | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _, extra = parsers[program].parse_known_args(argv)
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip().splitlines()[-1]
    unknown = [a for a in extra if a.startswith("-")]
    return f"unknown flags {unknown}" if unknown else None


def test_every_shown_command_parses():
    parsers = _cli_parsers()
    shown = [(page, *c) for page in DOC_PAGES for c in shown_commands(page)]
    assert len(shown) > 60, f"only {len(shown)} commands found: the block scanner is broken"
    errors = [f"{page.relative_to(REPO)}:{n}: {program} {shlex.join(argv)}\n    {msg}"
              for page, n, program, argv in shown if (msg := parse_error(parsers, program, argv))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("argv, bad", [(["chat", "--feature-step", "4"], True),
                                       (["chat", "--feature-steps", "4"], False),
                                       (["train", "--stage", "pretrain", "lr=1e-3"], False),
                                       (["demo", "eval", "--quik"], True)])
def test_parse_check_refuses_unknown_or_abbreviated_flags(argv, bad):
    assert (parse_error(_cli_parsers(), "easygen", argv) is not None) == bad


def test_every_marker_is_in_one_place_and_run_by_a_test():
    """A marked block is an example some test runs as written; a marker no test names marks nothing."""
    markers = [m for page in DOC_PAGES for m in re.findall(r"^<!-- ((?:readme|ci):[\w-]+) -->$",
                                                           page.read_text(), re.M)]
    assert len(markers) >= 13 and len(set(markers)) == len(markers), markers
    tests = "".join(p.read_text() for p in (REPO / "tests").glob("test_*.py") if p.name != "test_docs.py")
    assert [m for m in markers if f'"{m}"' not in tests] == []


def test_readme_block_names_a_missing_or_repeated_marker(tmp_path, monkeypatch):
    from . import test_readme
    page = tmp_path / "page.md"
    page.write_text("<!-- readme:twice -->\n```bash\necho 1\n```\n<!-- readme:twice -->\n```bash\necho 2\n```\n")
    monkeypatch.setattr(test_readme, "REPO", tmp_path)
    monkeypatch.setattr(test_readme, "DOC_PAGES", [page])
    with pytest.raises(AssertionError, match=r"exactly one .*\['page.md', 'page.md'\]"):
        test_readme.readme_block("readme:twice")
    with pytest.raises(AssertionError, match="found in none"):
        test_readme.readme_block("readme:nowhere")
