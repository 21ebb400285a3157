"""Terminal IO for ``easygen chat``: how prompts, streamed replies, pictures, progress and problems
reach the user. Two styles, as in FastChat's CLI:

- ``SimpleChatIO``: plain print and readline. When the input is piped (stdin not a terminal) it
  prints no prompts or banners: stdout carries only the replies (and ``image: PATH`` lines, or one
  JSON object per reply), everything else goes to stderr, so scripts can read it.
- ``RichChatIO``: for a terminal: coloured roles, replies rendered as Markdown while they stream, a
  spinner while the model thinks, a progress bar while a picture is drawn, prompt_toolkit input
  with history and completion of the slash commands (and of file paths after ``/image``), and
  pictures shown inline where the terminal speaks the iTerm2 image protocol (iTerm2, WezTerm).

``make_chat_io`` gives the rich style only when both stdin and stdout are terminals.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, TextIO

from bidiffuser.cliutil import progress_bar

USER, ASSISTANT = "USER", "ASSISTANT"
COMMANDS = ("/image", "/reset", "/save", "/load", "/help", "/exit")
Progress = tuple[Callable[[int, int], None], Callable[[], None]]  # (update(step, total), close())


def _attached(n: int) -> str:
    return f" (+{n} image{'s' * (n > 1)})" if n else ""


class SimpleChatIO:
    """Plain text. ``interactive`` (default: stdin is a terminal) shows prompts, banners and roles."""

    def __init__(self, stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None,
                 interactive: bool | None = None):
        self.stdin, self.stdout, self.stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self._line_open = False  # a reply is being written on the current stdout line
        self._started = False    # the current reply has shown its first piece

    # -- input -------------------------------------------------------------------------------------
    def read_message(self, attached: int = 0) -> str:
        """The next line the user typed. EOFError at the end of input (Ctrl-D)."""
        if self.interactive and self.stdin is sys.stdin:
            return input(f"{USER}{_attached(attached)}: ")  # line editing from readline
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    # -- messages ----------------------------------------------------------------------------------
    def _write(self, stream: TextIO, text: str) -> None:
        self.end_line()
        if stream is self.stderr:
            self.stdout.flush()  # keep the two streams in order on a terminal
        print(text, file=stream, flush=True)

    def banner(self, text: str) -> None:
        """Greeting and help: only for a person at a terminal."""
        if self.interactive:
            self._write(self.stdout, text)

    def info(self, text: str) -> None:
        """Confirmations and notes: stdout at a terminal, stderr when piped (stdout is for replies)."""
        self._write(self.stdout if self.interactive else self.stderr, text)

    def error(self, text: str) -> None:
        """A one-line problem; the session goes on."""
        self._write(self.stderr, f"error: {text}")

    def print_json(self, obj: dict) -> None:
        self._write(self.stdout, json.dumps(obj, ensure_ascii=False))

    def show_transcript(self, messages: Iterable[dict]) -> None:
        for m in messages:
            role = USER if m["role"] == "user" else ASSISTANT
            refs = "".join(f" [image: {p}]" for p in m.get("images", []) + m.get("generated", []))
            self.info(f"{role}: {m['content']}{refs}")

    # -- a reply -----------------------------------------------------------------------------------
    def start_reply(self) -> None:
        """A reply is about to be generated (nothing shows until its first piece)."""
        self._started = False

    def reply_token(self, text: str) -> None:
        """One streamed piece of the reply."""
        if not self._started:
            self._started = True
            if self.interactive:
                self.stdout.write(f"{ASSISTANT}: ")
        self.stdout.write(text)
        self.stdout.flush()
        self._line_open = True

    def end_line(self) -> None:
        """Finish a reply line that is still open."""
        if self._line_open:
            self._line_open = False
            self.stdout.write("\n")
            self.stdout.flush()

    def end_reply(self, complete: bool = False) -> None:
        """The reply is over (``complete``: it was generated in full, not stopped or failed). An
        empty reply still gets its line, so piped output keeps one reply per line."""
        if complete and not self._started:
            self.reply_token("")
        self.end_line()

    def image_progress(self) -> Progress:
        """(update, close) of the progress shown while pictures are drawn: tqdm on stderr when that
        is a terminal (a bar redrawn in a log file is only noise)."""
        update, close = progress_bar("drawing image", disable=not self.stderr.isatty())

        def update_below_reply(step: int, total: int) -> None:
            if self.stdout.isatty():  # the bar redraws its line: it must not share it with the reply
                self.end_line()
            update(step, total)
        return update_below_reply, close

    def busy(self, text: str):
        """A context manager around slow work (loading, reading an image). Plain text: a line at a
        terminal, nothing when piped."""
        if self.interactive:
            self.info(f"({text})")
        return contextlib.nullcontext()

    def show_image(self, path: Path) -> None:
        self._write(self.stdout, f"image: {path}")


class RichChatIO(SimpleChatIO):
    """A terminal session: rich output, prompt_toolkit input (both can be passed in, e.g. to record
    the output). JSON output is never rich: ``--json`` uses the simple style."""

    def __init__(self, console=None, session=None):
        from rich.console import Console
        super().__init__(interactive=True)
        self.console = console or Console(highlight=False)
        self.err_console = Console(stderr=True, highlight=False) if console is None else console
        self._session = session
        self._live = _LiveArea(self.console)  # spinner, streamed reply and drawing bar: one display
        self._text = ""

    def read_message(self, attached: int = 0) -> str:
        from prompt_toolkit.formatted_text import HTML
        if self._session is None:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import InMemoryHistory
            self._session = PromptSession(history=InMemoryHistory(), completer=_completer())
        label = f"<b><ansigreen>{USER}</ansigreen></b>{_attached(attached)}: "
        return self._session.prompt(HTML(label), complete_while_typing=False)

    def _write(self, console, text: str, style: str = "") -> None:
        self._live.stop()
        console.print(text, style=style, markup=False, highlight=False)

    def banner(self, text: str) -> None:
        self._write(self.console, text, "bold")

    def info(self, text: str) -> None:
        self._write(self.console, text, "dim")

    def error(self, text: str) -> None:
        self._write(self.err_console, f"error: {text}", "bold red")

    def show_transcript(self, messages: Iterable[dict]) -> None:
        for m in messages:
            user = m["role"] == "user"
            self.console.print(USER if user else ASSISTANT, style="bold green" if user else "bold blue")
            self.console.print(_markdown(m["content"]))
            for p in m.get("images", []) + m.get("generated", []):
                self.info(f"[image: {p}]")

    # -- live displays: one owner (rich allows one Live at a time) -------------------------------------
    def start_reply(self) -> None:
        from rich.spinner import Spinner
        self._text = ""
        self._live.show("status", Spinner("dots", text="thinking…", style="dim"))

    def reply_token(self, text: str) -> None:
        if not self._text:
            self._live.stop()  # the spinner goes; the role line, then the reply in its place
            self.console.print(ASSISTANT, style="bold blue")
        self._text += text
        self._live.show("reply", _markdown(self._text))

    def end_line(self) -> None:
        self._live.stop()

    def end_reply(self, complete: bool = False) -> None:
        self._live.stop()
        if complete and not self._text:
            self.console.print(ASSISTANT, style="bold blue")
            self.console.print("(empty reply)", style="dim")

    def image_progress(self) -> Progress:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)
        # Never started on its own: the bar is one part of the live area, below the reply it belongs to.
        bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=self.console)
        state = {"task": None, "last": 0, "count": 0}

        def update(step: int, total: int) -> None:
            if state["task"] is None or step < state["last"]:  # the first picture, or the next one
                if state["task"] is not None:
                    bar.remove_task(state["task"])
                state["count"] += 1
                state["task"] = bar.add_task(f"drawing image {state['count']}", total=total, rate="")
            state["last"] = step
            bar.update(state["task"], completed=step)
            speed = bar.tasks[-1].speed
            bar.update(state["task"], rate=f"{speed:.1f} steps/s" if speed else "")
            self._live.show("bar", bar)

        return update, lambda: self._live.hide("bar")

    @contextlib.contextmanager
    def busy(self, text: str):
        from rich.spinner import Spinner
        self._live.show("status", Spinner("dots", text=f"{text}…", style="dim"))
        try:
            yield
        finally:
            self._live.stop()

    def show_image(self, path: Path) -> None:
        self._write(self.console, f"image: {path}", "bold")
        if _inline_images_supported() and self.console.is_terminal:
            data = Path(path).read_bytes()
            # iTerm2's inline image protocol (also spoken by WezTerm): OSC 1337 ; File=... BEL
            self.console.file.write(f"\033]1337;File=inline=1;size={len(data)};preserveAspectRatio=1:"
                                    f"{base64.b64encode(data).decode()}\a\n")
            self.console.file.flush()


class _LiveArea:
    """The chat's one live display: named parts shown together, in a fixed order (the reply being
    written, the drawing bar under it, a status spinner). Every live element goes through here: rich
    refuses a second Live while one runs, and a part must never be handed to another part's update.
    ``stop`` clears the transient parts (bar, spinner) and leaves the reply on the screen."""

    ORDER = ("reply", "bar", "status")
    TRANSIENT = ("bar", "status")

    def __init__(self, console):
        self.console = console
        self.parts: dict = {}
        self._live = None

    def _group(self):
        from rich.console import Group
        return Group(*(self.parts[n] for n in self.ORDER if n in self.parts))

    def show(self, name: str, renderable) -> None:
        from rich.live import Live
        self.parts[name] = renderable
        if self._live is None:
            self._live = Live(self._group(), console=self.console, refresh_per_second=8)
            self._live.start()
        else:
            self._live.update(self._group(), refresh=True)

    def hide(self, name: str) -> None:
        if self.parts.pop(name, None) is not None and self._live is not None:
            self._live.update(self._group(), refresh=True)

    def stop(self) -> None:
        """End the display; what stays on the screen is the reply (if any), never a bar or spinner."""
        for name in self.TRANSIENT:
            self.parts.pop(name, None)
        if self._live is not None:
            self._live.update(self._group(), refresh=True)
            self._live.stop()
        self._live, self.parts = None, {}


def _markdown(text: str):
    from rich.markdown import Markdown
    # Markdown would swallow <Img>...</Img> as inline HTML; escaped, the tags stay visible. Single
    # newlines are kept as line breaks (two trailing spaces), as chat models mean them.
    text = text.replace("<", "\\<")
    return Markdown("  \n".join(text.split("\n")))


def _inline_images_supported() -> bool:
    return os.environ.get("TERM_PROGRAM") in ("iTerm.app", "WezTerm")


def _completer():
    """Slash commands, and file paths after ``/image``, ``/save`` and ``/load``."""
    from prompt_toolkit.completion import Completer, PathCompleter, WordCompleter
    from prompt_toolkit.document import Document

    commands, paths = WordCompleter(list(COMMANDS), sentence=True), PathCompleter(expanduser=True)

    class ChatCompleter(Completer):
        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            name, space, arg = text.partition(" ")
            if not space:
                if text.startswith("/"):
                    yield from commands.get_completions(document, complete_event)
            elif name in ("/image", "/save", "/load"):
                yield from paths.get_completions(Document(arg, len(arg)), complete_event)

    return ChatCompleter()


def make_chat_io(style: str = "rich") -> SimpleChatIO:
    """The IO for ``style`` ("simple" or "rich"); rich needs a terminal on both stdin and stdout and
    falls back to simple otherwise (piped input or output)."""
    if style == "rich" and sys.stdin.isatty() and sys.stdout.isatty():
        return RichChatIO()
    return SimpleChatIO()
