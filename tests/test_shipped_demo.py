"""The demo model shipped in the package: its files are the manifest's (sha256), safetensors only,
built by today's recipe, and plain `easygen chat` on a fresh machine uses it at once (no build)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from easygen.demo.recipe import STAGES, VERSION, Recipe
from easygen.demo.shipped import SHIPPED_DIR, default_demo, manifest, shipped_demo, verify

REBUILD = ("rebuild and re-ship it: easygen demo build --out DIR && easygen demo ship --model DIR "
           "(then update docs/demo.md's table from its manifest)")


def test_every_file_matches_the_manifest():
    assert shipped_demo() is not None, f"the shipped demo model is missing from {SHIPPED_DIR}"
    assert verify() == [], "the shipped demo's files differ from MANIFEST.json's sha256"


def test_the_shipped_model_was_built_by_todays_recipe():
    doc = manifest()
    assert doc["recipe_version"] == VERSION, f"the demo recipe is v{VERSION}, the shipped model v{doc['recipe_version']}: " + REBUILD
    assert doc["recipe"] == Recipe().to_json(), "the demo recipe changed since the shipped model was built: " + REBUILD
    assert json.loads((SHIPPED_DIR / "demo.json").read_text())["recipe"] == doc["recipe"]
    assert doc["eval"]["results"]["conversations"] and doc["eval"]["table"]  # measured on these files


def test_the_manifest_records_one_uninterrupted_build_as_it_happened():
    doc = manifest()
    build = doc["build"]
    assert build["stages_run_earlier"] == [], "the shipped model must be one uninterrupted build: " + REBUILD
    assert build["command"].startswith("easygen demo build") and doc["commands"][0] == build["command"]
    assert doc["commands"][1].startswith("easygen demo ship") and len(doc["commands"]) == 2
    assert build["git_commit"] and build["git_dirty"] is False  # a commit anyone can check out
    assert set(build["seconds"]) == {name for name, _, _ in STAGES}
    assert doc["eval"]["results"]["draw_seed"] is not None  # drawn on a fresh sample of seeds, recorded


def test_weights_are_safetensors_only_in_float16():
    files = [p for p in SHIPPED_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pth", ".pt", ".bin", ".pkl", ".ckpt")]  # no pickles
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 8  # LLM, U-ViT, VAE, caption decoder, two CLIP towers, the bridge and its U-ViT LoRA
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        assert dtypes <= {"F16", "I64", "I32", "BOOL"}, (path, dtypes)


def test_plain_commands_use_the_shipped_model_and_load_it_in_float32(tmp_path, monkeypatch):
    import torch

    from easygen.builder import load_pretrained
    monkeypatch.delenv("EASYGEN_DEMO_DIR", raising=False)
    assert default_demo().root == SHIPPED_DIR
    loaded = load_pretrained(SHIPPED_DIR / "easygen", device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert {p.dtype for p in loaded.bidiffuser.uvit.parameters()} == {torch.float32}
    assert loaded.draw_with == "bridge"  # the shipped demo draws its replies through its LLM bridge
    assert {p.dtype for p in loaded.bidiffuser.bridge.parameters()} == {torch.float32}
    monkeypatch.setenv("EASYGEN_DEMO_DIR", str(tmp_path / "mine"))  # your own build, when you name one
    assert default_demo().root == tmp_path / "mine"


@pytest.mark.slow
def test_first_contact_draws_without_building(tmp_path):
    """A new user: empty home and cache, `easygen chat --prompt ...` straight after install."""
    env = {k: v for k, v in os.environ.items() if k != "EASYGEN_DEMO_DIR"}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "easygen.cli", "chat", "--prompt", "Draw a green square.", "--json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert "<Img>" in reply["text"] and len(reply["images"]) == 1
    assert "building" not in r.stderr and not (tmp_path / "cache" / "easygen" / f"demo-shapes-v{VERSION}").exists()


def test_the_shipped_bridge_samples_on_its_own_with_the_shipped_llm():
    """`bidiffuser sample --bridge` without --text-model: the bridge's recorded text model is the shipped
    LLM, as a path relative to the bridge (the package can be installed anywhere)."""
    from bidiffuser.bridge import read_bridge
    from bidiffuser.pipeline import BiDiffuser
    assert read_bridge(SHIPPED_DIR / "bridge").text_model == "../easygen"
    pipe = BiDiffuser.from_pretrained(SHIPPED_DIR / "bidiffuser", bridge=SHIPPED_DIR / "bridge")
    assert len(pipe.text_to_image("a green triangle", steps=2, seed=0).images) == 1
    assert Path(pipe.text_model.model.name_or_path).resolve() == (SHIPPED_DIR / "easygen").resolve()
