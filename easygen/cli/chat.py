"""``easygen chat``: talk with EasyGen in the terminal; upload images, get text and image replies.

Interactive at a terminal, turn by turn when input is piped, or once with ``--prompt``. The chat
engine is ``easygen.Assistant``; the terminal side is ``fastchat_ext.chat_io``; this module parses
flags, loads the model through the one builder, and runs the slash commands.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

from bidiffuser.errors import BiDiffuserError

from ..errors import EasyGenError
from .engine_args import add_engine_args, load_engine, quiet_libraries, resolve_model

COMMAND_HELP = """\
in-chat commands:
  /image PATH   attach an image to your next message (any turn, any number)
  /reset        start a new conversation
  /save FILE    save the conversation as JSON (images by path)
  /load FILE    load a conversation saved with /save
  /help         show this help
  /exit         quit (or Ctrl-D); Ctrl-C stops the reply being written
An empty line sends the attached images alone; //text sends "/text"."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "chat", help="chat in the terminal: upload images, get text and image replies",
        description="Chat with EasyGen: attach images with --image-file or /image, get answers streamed\n"
                    "token by token; pictures the model draws are saved as PNG under --out-dir.",
        epilog=COMMAND_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)

    g = p.add_argument_group("chat")
    g.add_argument("--image-file", action="append", default=[], metavar="PATH",
                   help="image for the first message (may repeat)")
    g.add_argument("--out-dir", type=Path, default=Path("easygen-images"), metavar="DIR",
                   help="where image replies are saved as PNG (default ./easygen-images)")
    g.add_argument("--force-image", action="store_true",
                   help="every answer ends in a picture: when the model does not ask for one, it continues "
                        "with <Img> and writes the description itself")
    g.add_argument("--profile", nargs="?", const="-", metavar="JSON",
                   help="print seconds, peak resident memory and resident weights per phase (load, features, "
                        "generate, draw) on stderr at the end; with a file name, also write them there as JSON")

    g = p.add_argument_group("interface")
    g.add_argument("--style", choices=("simple", "rich"), default="rich",
                   help="rich: colours, Markdown, progress bars, command and path completion (the default; "
                        "falls back to simple when input or output is not a terminal); simple: plain text. "
                        "--prompt and --json always print plain text")
    g.add_argument("--prompt", metavar="TEXT", help="answer this one message (with any --image-file), print "
                   "the reply and the paths of its pictures, and exit")
    g.add_argument("--json", action="store_true",
                   help='print each reply as one JSON object on stdout: {"text", "images", "notices"} '
                        '(a turn that fails prints {"error"})')
    return p


def run(args) -> int:
    from bidiffuser.images import load_image
    from fastchat_ext.chat_io import SimpleChatIO, make_chat_io

    for path in args.image_file:  # a bad image fails now, before minutes of loading
        load_image(path)
    io = SimpleChatIO() if args.json or args.prompt is not None else make_chat_io(args.style)
    resolve_model(args)
    profiler = None
    if args.profile:
        from ..profiling import Profiler
        profiler = Profiler()
    elif args.prompt is None and not args.json and io.interactive:
        return _chat_while_loading(args, io)
    try:
        with quiet_libraries():
            session = _load_session(args, io, profiler)
            if args.prompt is not None:
                return session.answer_once(args.prompt, args.image_file)
            for path in args.image_file:
                session.attach(path)
            return session.loop()
    finally:
        if profiler is not None and profiler.phases:
            print(profiler.table(), file=sys.stderr)
            if args.profile != "-":
                Path(args.profile).write_text(json.dumps({"phases": [p.to_json() for p in profiler.phases]}, indent=1))


def _load_session(args, io, profiler=None) -> "ChatSession":
    from ..assistant import Assistant
    from ..profiling import resident_weight_bytes

    with io.busy(f"loading {args.model_path}"), (profiler.phase("load") if profiler else contextlib.nullcontext()):
        loaded, features, settings = load_engine(args)
    assistant = Assistant(loaded, settings, out_dir=args.out_dir.resolve(), features=features)
    if profiler is not None:
        profiler.weights = lambda: resident_weight_bytes(loaded)
        profiler.phases[-1].weights = profiler.weights()
        assistant.profiler = profiler
    pictures = "on" if features else "off (no BiDiffuser directory)"
    io.banner(f"EasyGen chat · {args.model_path} ({loaded.layout}) · images {pictures}\n"
              f"Type a message; /help for commands; Ctrl-D to quit.")
    return ChatSession(assistant, io, json_mode=args.json, force_image=args.force_image)


def _chat_while_loading(args, io) -> int:
    """At a terminal the prompt shows at once and the model loads while the person types (importing
    torch and transformers alone takes seconds); the first message that needs it waits for it."""
    loading = LoadingAssistant(args, io)
    io.banner(f"EasyGen chat · {args.model_path}\nType a message; /help for commands; Ctrl-D to quit.")
    session = ChatSession(loading, io, force_image=args.force_image)
    try:
        for path in args.image_file:
            session.attach(path)
        return session.loop()
    except LoadFailed as failed:  # the command's error, as if it had loaded first
        raise failed.error from None


class LoadFailed(Exception):
    """Loading the model failed: the session ends with that error (not a per-message problem)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class LoadingAssistant:
    """The ``Assistant``, loaded in a background thread; ``get()`` waits for it (with the busy line)."""

    def __init__(self, args, io):
        import threading
        self.io, self.model_path, self._done = io, args.model_path, {}
        self._thread = threading.Thread(target=self._load, args=(args,), daemon=True, name="easygen-load")
        self._thread.start()

    def _load(self, args) -> None:
        from ..assistant import Assistant
        from .engine_args import silence_libraries
        try:
            silence_libraries()
            loaded, features, settings = load_engine(args)
            self._done["assistant"] = Assistant(loaded, settings, out_dir=args.out_dir.resolve(), features=features)
        except BaseException as e:  # handed to the main thread, which ends the session with it
            self._done["error"] = e

    def get(self):
        if self._thread.is_alive():
            with self.io.busy(f"loading {self.model_path}"):
                self._thread.join()
        if "error" in self._done:
            raise LoadFailed(self._done["error"])
        return self._done["assistant"]


class ChatSession:
    """The chat loop over one ``Assistant``: slash commands, attached images, replies. Bad input
    gets a one-line message and the session goes on."""

    def __init__(self, assistant, io, json_mode: bool = False, force_image: bool = False):
        self._assistant, self.io, self.json_mode, self.force_image = assistant, io, json_mode, force_image
        self.pending: list[str] = []  # images attached to the next message
        self.commands = {"/image": self.attach, "/reset": self.reset, "/save": self.save, "/load": self.load,
                         "/help": self.help}

    @property
    def assistant(self):
        return self._assistant.get() if isinstance(self._assistant, LoadingAssistant) else self._assistant

    def loop(self) -> int:
        while True:
            try:
                line = self.io.read_message(len(self.pending))
            except EOFError:  # Ctrl-D or the end of piped input
                if self.io.interactive:
                    self.io.info("")  # the shell prompt starts on a line of its own
                return 0
            except KeyboardInterrupt:
                if not self.io.interactive:
                    raise
                self.io.info("(/exit or Ctrl-D to quit)")
                continue
            if not self.handle(line):
                return 0

    def handle(self, line: str) -> bool:
        """Run one line of input; False when the session should end."""
        text = line.strip()
        try:
            if text.startswith("/") and not text.startswith("//"):
                name, _, arg = text.partition(" ")
                if name in ("/exit", "/quit"):
                    return False
                if name not in self.commands:
                    raise BiDiffuserError(f"unknown command {name} (type /help)")
                self.commands[name](arg.strip())
            else:
                self.ask(text[1:] if text.startswith("//") else text)
        except BiDiffuserError as e:
            self.problem(str(e))
        except OSError as e:  # e.g. an unwritable --out-dir or cache: say so and go on
            self.problem(f"{e.filename or 'file system'}: {e.strerror or e}")
        except KeyboardInterrupt:  # Ctrl-C: the turn (or upload) is dropped, the session goes on
            self.problem("stopped; the conversation is as it was before", error=False)
        return True

    def problem(self, message: str, error: bool = True) -> None:
        if self.json_mode:
            self.io.print_json({"error": message})
        elif error:
            self.io.error(message)
        else:
            self.io.info(message)

    # -- messages ----------------------------------------------------------------------------------
    def ask(self, text: str) -> None:
        if not text and not self.pending:
            raise EasyGenError("empty message (type a question; /help for commands)")
        reply = self._send(text, self.pending)
        self.pending = []
        self._show(reply)

    def answer_once(self, text: str, images: list[str]) -> int:
        """``--prompt``: one reply; a problem is the command's error (exit code 2)."""
        self._show(self._send(text, images))
        return 0

    def _send(self, text: str, images: list[str]):
        from ..image_reply import ImageTagStream

        # The reader never sees a raw <Img>...</Img>: text streams until a tag starts, and the rest
        # shows once the pictures exist, each as "[picture: description]" before its image: line.
        tags = ImageTagStream()

        def show(piece: str) -> None:
            if piece:
                self.io.reply_token(piece)

        stream = None if self.json_mode else (lambda t: show(tags.feed(t)))
        update, close = self.io.image_progress()
        self.io.start_reply()
        done = False
        try:
            reply = self.assistant.send(text, images, on_token=stream, on_image_progress=update,
                                        force_image=self.force_image)
            close()  # the drawing bar goes before the picture's line takes its place
            if stream is not None:
                show(tags.finish(_picture_line, text=reply.text))
            done = True
            return reply
        finally:
            close()
            self.io.end_reply(complete=done and stream is not None)

    def _show(self, reply) -> None:
        paths = [str(p) for p in reply.image_paths]
        if self.json_mode:
            self.io.print_json({"text": reply.text, "images": paths, "notices": reply.notices})
            return
        for path in reply.image_paths:
            self.io.show_image(path)
        for notice in reply.notices:
            self.io.info(f"note: {notice}")

    # -- commands ----------------------------------------------------------------------------------
    def attach(self, arg: str) -> None:
        """``/image PATH``: check the image and read it with BiDiffuser now (the features land in the
        cache), so a bad file or a slow first read shows here rather than in the middle of a reply."""
        from bidiffuser.images import load_image

        path = _one_path(arg, "/image PATH")
        if self.assistant.features is None:
            raise EasyGenError("images need a BiDiffuser model directory (--bidiffuser)")
        image = load_image(path)
        with self.io.busy(f"reading {Path(path).name}"):
            self.assistant.features([path])
        self.pending.append(path)
        res = self.assistant.pipe.config.resolution
        size = f"{image.width}x{image.height}"
        if image.size != (res, res):
            crop = ", centre-cropped" if image.width != image.height else ""
            size += f", resized to {res}x{res}{crop}"
        self.io.info(f"attached {path} ({size}); it goes with your next message")

    def reset(self, arg: str = "") -> None:
        self.assistant.reset()
        self.pending = []
        self.io.info("new conversation")

    def save(self, arg: str) -> None:
        path = self.assistant.save(_one_path(arg, "/save FILE"))
        self.io.info(f"saved {len(self.assistant.messages)} messages to {path}")

    def load(self, arg: str) -> None:
        path = _one_path(arg, "/load FILE")
        self.assistant.load(path)
        self.pending = []
        messages = self.assistant.messages
        if self.io.interactive:  # pictures as the reply showed them, never as raw tags
            from ..image_reply import replace_image_tags
            self.io.show_transcript([{**m, "content": replace_image_tags(m["content"], _picture_line)}
                                     for m in messages])
        images = sum(len(m["images"]) for m in messages)
        self.io.info(f"loaded {len(messages)} messages ({images} image{'s' * (images != 1)}) from {path}")

    def help(self, arg: str = "") -> None:
        self.io.info(COMMAND_HELP)


def _picture_line(description: str, k: int) -> str:
    """How a picture in a reply reads in the terminal (its image: line follows)."""
    return f"[picture: {description}]"


def _one_path(arg: str, usage: str) -> str:
    """The path argument of a command, ``~`` expanded. Spaces need no quoting, but a quoted or
    backslash-escaped path (what terminals paste for a dragged file) is understood too."""
    if not arg:
        raise EasyGenError(f"usage: {usage}")
    if not os.path.exists(os.path.expanduser(arg)):
        with contextlib.suppress(ValueError):  # unbalanced quotes: keep the text as typed
            parts = shlex.split(arg)
            if len(parts) == 1:
                arg = parts[0]
    return os.path.expanduser(arg)
