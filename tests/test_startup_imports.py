"""`easygen chat` imports only what chatting needs, so it starts in seconds: one real one-shot turn
(the shipped demo, an uploaded picture) in a fresh process, then the modules it imported.

Not asserted, because the pinned libraries import them themselves whatever we do: torch._dynamo
(diffusers.utils.torch_utils; transformers' continuous batching cache) and, through it,
torch.distributed.tensor and torch._inductor's config; torch.distributed.checkpoint
(transformers.modeling_utils). torch._inductor.compile_fx, the compiler proper, is asserted: only
bitsandbytes brought it."""
import importlib.util
import json
import subprocess
import sys

import pytest

from .conftest import make_image

# Prefixes of modules a chat must not import: bitsandbytes (only for --load-8bit/--load-4bit), torch's
# compiler, DeepSpeed, and training code (easygen.train.config stays: the `easygen train --preset`
# choices, plain dataclasses). peft may come: the demo's bridge puts LoRA layers on the U-ViT.
NOT_FOR_CHAT = ("bitsandbytes", "deepspeed", "torch._inductor.compile_fx", "easygen.train.loop",
                "easygen.train.batches", "easygen.train.export", "easygen.data", "bidiffuser.train",
                "drawing.lavi_train", "fastchat_ext.train")

# The command in-process, then the names of every module it imported, on stdout's last line.
RUN_AND_LIST = """
import json, sys
from easygen.cli import main
code = main(sys.argv[1:])
print(json.dumps(sorted(sys.modules)))
sys.exit(code)
"""


def chat_modules(tmp_path, *flags: str) -> tuple[set[str], str]:
    """One `easygen chat --prompt` turn about a picture in a fresh python: (modules imported, answer)."""
    make_image(tmp_path / "picture.png")
    argv = [sys.executable, "-c", RUN_AND_LIST, "chat", "--image-file", "picture.png", "--prompt",
            "What is in the picture?", "--max-new-tokens", "8", "--feature-cache", "features", *flags]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    *answer, modules = done.stdout.strip().splitlines()
    return set(json.loads(modules)), "\n".join(answer)


def unwanted(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.startswith(NOT_FOR_CHAT))


def test_a_chat_turn_imports_no_quantization_compiler_or_training_code(tmp_path):
    modules, answer = chat_modules(tmp_path)
    assert answer.strip()
    assert "easygen.builder" in modules and "diffusers.models.autoencoders.autoencoder_kl" in modules  # it did load
    assert unwanted(modules) == []


@pytest.mark.slow  # quantizing adds its own seconds to the start
def test_asking_for_8_bits_still_imports_bitsandbytes(tmp_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed: --load-8bit cannot run here")
    modules, answer = chat_modules(tmp_path, "--load-8bit")
    assert answer.strip()
    assert "bitsandbytes" in modules and "bitsandbytes.nn" in modules
