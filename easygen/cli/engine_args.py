"""What every command that talks with EasyGen shares (``chat``, ``serve``, ``worker``): the model,
generation and BiDiffuser flags, the built-in demo as the default model, and loading the engine
through the one builder. Import-light at the top: argparse only."""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from bidiffuser.cliutil import positive_int

from .model_args import add_model_args


def non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_engine_args(p: argparse.ArgumentParser, max_new_tokens_help: str = "longest reply in tokens") -> None:
    """Model flags (default: the built-in demo), generation flags, BiDiffuser flags."""
    add_model_args(p, ". Default: the shapes demo model shipped in the package ($EASYGEN_DEMO_DIR: your own build; "
                      "see `easygen demo`)",
                   required=False)
    g = p.add_argument_group("generation")
    g.add_argument("--temperature", type=non_negative, default=0.2, metavar="T",
                   help="sampling temperature; 0 = greedy (default 0.2)")
    g.add_argument("--top-p", type=probability, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    g.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                   help=f"{max_new_tokens_help} (default 512, at most half the model's context)")
    g.add_argument("--seed", type=int, default=None, metavar="N",
                   help="random seed: same seed, same replies and pictures")

    g = p.add_argument_group("images")
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


def add_llm_engine_args(p: argparse.ArgumentParser) -> None:
    """Where the LLM runs: in this process (transformers) or on vLLM (``easygen.vllm_server``)."""
    g = p.add_argument_group("LLM engine")
    g.add_argument("--llm-engine", choices=["transformers", "vllm"], default="transformers",
                   help="what runs the LLM: transformers in this process (default), or vLLM (a server this command "
                        "starts, or the one at --vllm-url); image features, the projector and drawing stay here")
    g.add_argument("--vllm-url", default=None, metavar="URL",
                   help="a running vLLM OpenAI-compatible server of this model's LLM (`easygen export-llm`, served "
                        "with --enable-prompt-embeds); implies --llm-engine vllm")
    g.add_argument("--vllm-model", default=None, metavar="NAME",
                   help="the model name at --vllm-url (default: the first it serves)")
    g.add_argument("--vllm-python", default=None, metavar="PATH",
                   help="the python of vLLM's environment, to start vLLM (default $EASYGEN_VLLM_PYTHON, else this "
                        "python if it has vllm)")
    g.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for the vLLM server started here, e.g. --vllm-arg=--enforce-eager "
                        "(repeatable)")
    g.add_argument("--vllm-timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for vLLM's next token before answering 503 (default 120)")


def wants_vllm(args) -> bool:
    return getattr(args, "llm_engine", "transformers") == "vllm" or bool(getattr(args, "vllm_url", None))


def use_vllm_from_args(loaded, args):
    """``easygen.vllm_server.use_vllm`` with the ``add_llm_engine_args`` flags; returns the engine."""
    from ..vllm_server import use_vllm
    return use_vllm(loaded, url=args.vllm_url, model_name=args.vllm_model, python=args.vllm_python,
                    extra_args=args.vllm_arg, timeout=args.vllm_timeout,
                    log=lambda s: print(s, file=sys.stderr, flush=True))


def resolve_model(args) -> None:
    """No --model-path: the built-in shapes demo (``easygen.demo.shipped.default_demo``: the shipped
    model, or $EASYGEN_DEMO_DIR's, built there first with progress on stderr when it is absent).
    Then the BiDiffuser settings left unset: the demo recipe's for a demo model, else EasyGen's."""
    from contextlib import redirect_stdout

    from ..demo.recipe import BUILD_MINUTES, build, recipe_of
    from ..demo.shipped import default_demo
    from ..errors import EasyGenError

    if args.model_path is None:
        given = [flag for flag, value in (("--model-base", args.model_base), ("--lora", args.lora),
                                          ("--projector", args.projector), ("--bidiffuser", args.bidiffuser),
                                          ("--bridge", args.bridge)) if value]
        if given:
            raise EasyGenError(f"{given[0]} needs --model-path (without one, the built-in demo model is used)")
        demo = default_demo()
        if not demo.is_built():
            log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731  stdout stays the command's
            log(f"No --model-path given: building the built-in shapes demo model in {demo.root} "
                f"(once; about {BUILD_MINUTES} minutes on 2 CPU cores; set EASYGEN_DEMO_DIR to build it elsewhere)")
            with redirect_stdout(sys.stderr):
                build(demo.root, log=log)
        args.model_path = str(demo.easygen)

    recipe = recipe_of(args.model_path)
    defaults = {"steps": 50, "scale": 7.0, "feature_steps": 50, "feature_scale": 7.0}
    if recipe is not None:
        defaults = {"steps": recipe.image_steps, "scale": recipe.image_scale,
                    "feature_steps": recipe.feature_steps, "feature_scale": recipe.feature_scale}
    if getattr(args, "draw_with", "auto") not in ("auto", "bridge", "clip"):
        del defaults["steps"], defaults["scale"]  # a released system draws with its own reference settings
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def parse_options(items: list[str], flag: str) -> dict:
    """KEY=VALUE items as keywords (key-name -> key_name; values read as JSON when they parse)."""
    import json

    from ..errors import EasyGenError
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise EasyGenError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.strip().replace("-", "_")] = value
    return options


def drawer_options(args) -> dict:
    """--drawer-option KEY=VALUE (values read as JSON when they parse: numbers, true/false), plus
    --drawer-device, --drawer-offload and --drawer-dtype, as ``load_drawer`` keywords."""
    options = parse_options(getattr(args, "drawer_option", None) or [], "--drawer-option")
    if getattr(args, "drawer_device", None):
        options["device"] = args.drawer_device
    if getattr(args, "drawer_offload", False):
        options["offload"] = True
    if getattr(args, "drawer_dtype", None):
        options["dtype"] = args.drawer_dtype
    return options


def load_engine(args):
    """(LoadedModel, ImageFeatureExtractor or None, GenerationSettings) from the parsed flags
    (after ``resolve_model``)."""
    from ..assistant import GenerationSettings
    from ..builder import load_pretrained
    from bidiffuser.user_cache import user_cache_dir
    from ..features import ImageFeatureExtractor

    loaded = load_pretrained(args.model_path, model_base=args.model_base, lora=args.lora, projector=args.projector,
                             bidiffuser=args.bidiffuser, bridge=args.bridge, draw_with=args.draw_with,
                             drawer=args.drawer, drawer_options=drawer_options(args), device=args.device, dtype=args.dtype, bidiffuser_dtype=args.bidiffuser_dtype,
                             quantization=args.quantization)
    if wants_vllm(args):
        use_vllm_from_args(loaded, args)
    features = None
    if loaded.bidiffuser is not None:
        features = ImageFeatureExtractor(loaded.bidiffuser, steps=args.feature_steps, scale=args.feature_scale,
                                         cache_dir=args.feature_cache or user_cache_dir() / "features")
    # (the Assistant caps the answer at half the model's context)
    settings = GenerationSettings(temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens or 512, seed=args.seed,
                                  image_steps=args.steps, image_scale=args.scale)
    return loaded, features, settings


def silence_libraries() -> None:
    """What ``quiet_libraries`` does, for the rest of the process (the chat's background load, in a
    process of its own: nothing to restore)."""
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    for m in (tlog, dlog):
        m.set_verbosity_error()
        m.disable_progress_bar()


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
