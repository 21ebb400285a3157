"""A real command on a pseudo-terminal, as in a user's shell: type keys, wait for text, and read the
screen a person would see (the output replayed through a terminal emulator, pyte, so redrawn live
displays, cursor moves and erased progress bars count as they look, not as raw bytes)."""
from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import sys
import time

COLUMNS, LINES = 100, 400  # tall enough that a whole conversation stays on the screen


def easygen(*args: str) -> list[str]:
    """The command line of ``easygen ARGS`` in this interpreter."""
    return [sys.executable, "-m", "easygen.cli", *args]


class Terminal:
    """``argv`` (a program and its arguments) running on a new pseudo-terminal."""

    def __init__(self, argv: list[str], cwd, env: dict | None = None, columns: int = COLUMNS):
        import pty

        import pyte
        self.screen = pyte.Screen(columns, LINES)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        self._seen = 0
        environ = {**os.environ, **(env or {}), "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1",
                   "COLUMNS": str(columns), "LINES": str(LINES)}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the real command
            try:
                os.chdir(cwd)
                # Ctrl-C and Ctrl-\ act as in a user's shell, even when pytest itself was started in the
                # background by a script (which leaves them ignored, and exec passes that on)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGQUIT, signal.SIG_DFL)
                os.execvpe(argv[0], argv, {k: v for k, v in environ.items() if v is not None})
            finally:
                os._exit(127)  # never run the rest of pytest in the child
        with contextlib.suppress(OSError):  # the window size, as a terminal emulator sets it
            import fcntl
            import struct
            import termios
            fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, columns, 0, 0))

    def _read(self, wait: float) -> bool:
        if select.select([self.fd], [], [], wait)[0]:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # the child is gone
                return False
            if not data:
                return False
            self.raw.extend(data)
            self.stream.feed(data)
        return True

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """Wait until ``text`` appears in the output after the previous wait; returns the output in between."""
        end = time.monotonic() + timeout
        while (found := self.raw.find(text.encode(), self._seen)) < 0 and time.monotonic() < end:
            if not self._read(0.1):
                break
        assert found >= 0, f"{text!r} never appeared; the screen:\n{self.text()}"
        between = self.raw[self._seen:found + len(text)].decode(errors="replace")
        self._seen = found + len(text)
        return between

    def type(self, *keys: bytes | str) -> None:
        for k in keys:
            os.write(self.fd, k.encode() if isinstance(k, str) else k)

    def send(self, line: str, after: str = "USER") -> None:
        """Wait for the prompt, then type a line and Enter."""
        self.wait_for(after)
        self.type(line + "\r")

    def text(self) -> str:
        """The screen as a person sees it, trailing blanks removed."""
        self.drain()
        return "\n".join(line.rstrip() for line in self.screen.display).rstrip()

    def drain(self, quiet: float = 0.3) -> None:
        """Read whatever is still on its way (until ``quiet`` s pass with nothing new)."""
        while select.select([self.fd], [], [], quiet)[0]:
            if not self._read(0):
                break

    def exit_code(self, timeout: float = 30.0) -> int | None:
        """The command's exit code once it has ended (None if still running after ``timeout`` s)."""
        end = time.monotonic() + timeout
        while True:
            self._read(0.05)
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.drain(0.05)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > end:
                return None

    def close(self) -> None:
        with contextlib.suppress(ChildProcessError):  # reaped by exit_code unless a test failed
            if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def plain(text: str) -> str:
    """``text`` without ANSI escape sequences."""
    return re.sub(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-B]|[=>])", "", text)
