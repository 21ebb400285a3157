"""``easygen chat``: talk with EasyGen in the terminal; upload images, get text and image replies.

Interactive at a terminal, turn by turn when input is piped, or once with ``--prompt``. The chat
engine is ``easygen.Assistant``; the terminal side is ``fastchat_ext.chat_io``; this module parses
flags, loads the model through the one builder, and runs the slash commands.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import warnings
from pathlib import Path

from bidiffuser.cliutil import positive_int
from bidiffuser.errors import BiDiffuserError

from ..errors import EasyGenError
from .model_args import add_model_args

COMMAND_HELP = """\
in-chat commands:
  /image PATH   attach an image to your next message (any turn, any number)
  /reset        start a new conversation
  /save FILE    save the conversation as JSON (images by path)
  /load FILE    load a conversation saved with /save
  /help         show this help
  /exit         quit (or Ctrl-D); Ctrl-C stops the reply being written
An empty line sends the attached images alone; //text sends "/text"."""


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _default_feature_cache() -> Path:
    from ..constants import user_cache_dir
    return user_cache_dir() / "features"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "chat", help="chat in the terminal: upload images, get text and image replies",
        description="Chat with EasyGen: attach images with --image-file or /image, get answers streamed\n"
                    "token by token; pictures the model draws are saved as PNG under --out-dir.",
        epilog=COMMAND_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, ". Default: the built-in shapes demo model (built on first use, see `easygen demo`)",
                   required=False)

    g = p.add_argument_group("generation")
    g.add_argument("--temperature", type=_non_negative, default=0.2, metavar="T",
                   help="sampling temperature; 0 = greedy (default 0.2)")
    g.add_argument("--top-p", type=_probability, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    g.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                   help="longest reply in tokens (default 512, at most half the model's context)")
    g.add_argument("--seed", type=int, default=None, metavar="N",
                   help="random seed: same seed, same replies and pictures")

    g = p.add_argument_group("images")
    g.add_argument("--image-file", action="append", default=[], metavar="PATH",
                   help="image for the first message (may repeat)")
    g.add_argument("--out-dir", type=Path, default=Path("easygen-images"), metavar="DIR",
                   help="where image replies are saved as PNG (default ./easygen-images)")
    g.add_argument("--steps", type=positive_int, default=None, metavar="N",
                   help="BiDiffuser steps to draw an image reply (default 50; the demo model: its recipe's)")
    g.add_argument("--scale", type=float, default=None, metavar="S",
                   help="guidance scale for image replies (default 7; the demo model: its recipe's)")
    g.add_argument("--feature-steps", type=positive_int, default=None, metavar="N",
                   help="BiDiffuser steps that read an uploaded image; keep the value the model was trained "
                        "with (default 50; the demo model: its recipe's)")
    g.add_argument("--feature-scale", type=float, default=None, metavar="S",
                   help="guidance scale that reads an uploaded image; keep the training value "
                        "(default 7; the demo model: its recipe's)")
    g.add_argument("--feature-cache", type=Path, default=None, metavar="DIR",
                   help="cache of image features, keyed by image content and settings "
                        "(default $XDG_CACHE_HOME/easygen/features, else ~/.cache/easygen/features)")

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


@contextlib.contextmanager
def quiet_libraries():
    """Keep library chatter out of the chat (weight-loading progress bars, diffusers' float32
    notice, deprecation warnings meant for developers) and restore the previous state afterwards,
    since tests run the command in-process. Errors still show. (``run_main`` already sets the
    environment defaults that do this for a fresh process, and filters DeepSpeed's stdout notice.)"""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (tlog, dlog)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            for m, _, _ in saved:
                m.set_verbosity_error()
                m.disable_progress_bar()
            yield
    finally:
        for m, verbosity, bars in saved:
            m.set_verbosity(verbosity)
            if bars:
                m.enable_progress_bar()


def run(args) -> int:
    from bidiffuser.images import load_image
    from fastchat_ext.chat_io import SimpleChatIO, make_chat_io

    for path in args.image_file:  # a bad image fails now, before minutes of loading
        load_image(path)
    io = SimpleChatIO() if args.json or args.prompt is not None else make_chat_io(args.style)
    if args.model_path is None:
        args.model_path = str(_demo_model(args))
    _fill_bidiffuser_defaults(args)
    with quiet_libraries():
        session = _load_session(args, io)
        if args.prompt is not None:
            return session.answer_once(args.prompt, args.image_file)
        for path in args.image_file:
            session.attach(path)
        return session.loop()


def _demo_model(args) -> Path:
    """No --model-path: the built-in shapes demo, built first (once, with progress) when it is absent."""
    import sys
    from contextlib import redirect_stdout

    from ..demo.recipe import DemoModel, build, default_dir
    from ..errors import EasyGenError

    given = [flag for flag, value in (("--model-base", args.model_base), ("--lora", args.lora),
                                      ("--projector", args.projector), ("--bidiffuser", args.bidiffuser)) if value]
    if given:
        raise EasyGenError(f"{given[0]} needs --model-path (without one, chat uses the built-in demo model)")
    demo = DemoModel(default_dir())
    if not demo.is_built():
        log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731  stdout stays the chat's
        log(f"No --model-path given: building the built-in shapes demo model in {demo.root} "
            f"(once; about 20 minutes on 2 CPU cores; set EASYGEN_DEMO_DIR to build it elsewhere)")
        with redirect_stdout(sys.stderr):
            build(demo.root, log=log)
    return demo.easygen


def _fill_bidiffuser_defaults(args) -> None:
    """BiDiffuser settings left unset: the demo recipe's for a demo model, else EasyGen's defaults."""
    from ..demo.recipe import recipe_of

    recipe = recipe_of(args.model_path)
    defaults = {"steps": 50, "scale": 7.0, "feature_steps": 50, "feature_scale": 7.0}
    if recipe is not None:
        defaults = {"steps": recipe.image_steps, "scale": recipe.image_scale,
                    "feature_steps": recipe.feature_steps, "feature_scale": recipe.feature_scale}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _load_session(args, io) -> "ChatSession":
    from ..assistant import Assistant, GenerationSettings
    from ..builder import load_pretrained
    from ..features import ImageFeatureExtractor

    with io.busy(f"loading {args.model_path}"):
        loaded = load_pretrained(args.model_path, model_base=args.model_base, lora=args.lora,
                                 projector=args.projector, bidiffuser=args.bidiffuser, device=args.device,
                                 dtype=args.dtype)
    features = None
    if loaded.bidiffuser is not None:
        features = ImageFeatureExtractor(loaded.bidiffuser, steps=args.feature_steps, scale=args.feature_scale,
                                         cache_dir=args.feature_cache or _default_feature_cache())
    # (the Assistant caps the answer at half the model's context)
    settings = GenerationSettings(temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens or 512, seed=args.seed,
                                  image_steps=args.steps, image_scale=args.scale)
    assistant = Assistant(loaded, settings, out_dir=args.out_dir.resolve(), features=features)
    pictures = "on" if features else "off (no BiDiffuser directory)"
    io.banner(f"EasyGen chat · {args.model_path} ({loaded.layout}) · images {pictures}\n"
              f"Type a message; /help for commands; Ctrl-D to quit.")
    return ChatSession(assistant, io, json_mode=args.json)


class ChatSession:
    """The chat loop over one ``Assistant``: slash commands, attached images, replies. Bad input
    gets a one-line message and the session goes on."""

    def __init__(self, assistant, io, json_mode: bool = False):
        self.assistant, self.io, self.json_mode = assistant, io, json_mode
        self.pending: list[str] = []  # images attached to the next message
        self.commands = {"/image": self.attach, "/reset": self.reset, "/save": self.save, "/load": self.load,
                         "/help": self.help}

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
        stream = None if self.json_mode else self.io.reply_token
        update, close = self.io.image_progress()
        self.io.start_reply()
        done = False
        try:
            reply = self.assistant.send(text, images, on_token=stream, on_image_progress=update)
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
        if self.io.interactive:
            self.io.show_transcript(messages)
        images = sum(len(m["images"]) for m in messages)
        self.io.info(f"loaded {len(messages)} messages ({images} image{'s' * (images != 1)}) from {path}")

    def help(self, arg: str = "") -> None:
        self.io.info(COMMAND_HELP)


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
