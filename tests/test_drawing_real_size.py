"""benchmarks/drawing_real_size.py at its reduced size: every backend draws one picture in a fresh
process with a profile per phase, EasyGen answers with an ELLA picture, and the files it writes are
the tiny released layouts of drawing/tiny_layouts_*.py (same files, configs, keys, shapes, dtypes),
so the real-size run writes those layouts too, only with the real configs."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import drawing_layouts  # noqa: E402
import drawing_real_size  # noqa: E402


def _tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, object]:
    """What each file holds, comparable across writers: JSON as parsed, weights as {key: (dtype,
    shape)} merged per folder (shard boundaries may differ), other files as bytes."""
    from safetensors import safe_open
    out: dict[str, object] = {}
    files = [Path(d) / f for d, _, names in os.walk(root, followlinks=True) for f in names]  # the Llama is a link
    for p in sorted(files):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(skip) or "/." in f"/{rel}":
            continue
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                keys = {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            out.setdefault(f"{p.parent.relative_to(root).as_posix()}/*.safetensors", {}).update(keys)
        elif p.name.endswith(".index.json"):
            index = json.loads(p.read_text())
            out[rel] = (index["metadata"]["total_size"], sorted(index["weight_map"]))
        elif p.suffix == ".json":
            out[rel] = json.loads(p.read_text())
        elif p.suffix in (".pt", ".bin"):
            obj = torch.load(p, weights_only=True)
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            out[rel] = {k: (str(v.dtype), tuple(v.shape)) for k, v in items}
        else:
            out[rel] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    work = tmp_path_factory.mktemp("draw-reduced")
    results = work / "results.json"
    drawing_real_size.main(["--workdir", str(work), "--size", "reduced", "--json", str(results)])
    return work, {r["case"]: r for r in json.loads(results.read_text())}


@pytest.mark.slow
def test_every_backend_draws_once_with_a_profile_per_phase(reduced):
    _, results = reduced
    assert sorted(results) == sorted(drawing_real_size.ALL)
    for case, r in results.items():
        assert "error" not in r, f"{case}: {r.get('error')}"
        phases = [p["phase"] for p in r["phases"]]
        if case == "easygen-ella":
            assert phases[0] == "load" and phases[-1] == "draw" and r["drawer_weights_bytes"] > 0
            [png] = r["reply"]["images"]
            from PIL import Image
            assert Image.open(png).size == (64, 64)
            continue
        assert phases == ["load", "text", "denoise", "decode"], case
        assert tuple(r["image_size"]) == drawing_real_size.resolution(case, "reduced")
        assert Path(r["image"]).is_file()
        assert all(p["weights_bytes"] > 0 and p["seconds"] >= 0 for p in r["phases"])


@pytest.mark.slow
def test_the_files_are_the_tiny_released_layouts(reduced, tmp_path):
    from drawing.tiny_layouts_ella import write_tiny_ella
    from drawing.tiny_layouts_lavi import write_tiny_lavi
    from drawing.tiny_layouts_paradiffusion import write_tiny_paradiffusion

    work, _ = reduced
    assert _tree(work / "ella") == _tree(write_tiny_ella(tmp_path / "ella"))
    para = write_tiny_paradiffusion(tmp_path / "para", drawing_layouts.LLAMA_TOKENIZER)
    assert _tree(work / "paradiffusion") == _tree(para)
    # LaVi: the two combos run and their bases; the Llama folder is ParaDiffusion's (shared), whose
    # weights are LaVi's tiny Llama's (keys and shapes; the release ships them in both forms)
    mine, tiny = _tree(work / "lavi", ("Llama-2-7b-hf",)), _tree(write_tiny_lavi(tmp_path / "lavi"), ("Llama-2-7b-hf",))
    assert mine == {k: v for k, v in tiny.items() if not k.startswith("t5_unet/")}
    llama = _tree(tmp_path / "lavi" / "Llama-2-7b-hf")["./*.safetensors"]
    assert _tree(work / "lavi" / "Llama-2-7b-hf")["./*.safetensors"] == llama


@pytest.mark.parametrize("name", ["lavi-bridge", "paradiffusion"])
def test_text_dtype_sets_the_llama_alone(name, tmp_path):
    """What the real-size runs need on CPU: the 7B Llama in bfloat16, the U-Net and VAE in float32."""
    from drawing import load_backend
    from drawing.backend import DrawingError
    from drawing.tiny_layouts_lavi import write_tiny_lavi
    from drawing.tiny_layouts_paradiffusion import write_tiny_paradiffusion

    if name == "lavi-bridge":
        path = write_tiny_lavi(tmp_path) / "llama2_unet"
        text = lambda b: b.text.model  # noqa: E731
        denoiser, size = "vis", (64, 64)
    else:
        path = write_tiny_paradiffusion(tmp_path, drawing_layouts.LLAMA_TOKENIZER)
        text = lambda b: b.text_encoder  # noqa: E731
        denoiser, size = "unet", (64, 40)
    backend = load_backend(name, path, device="cpu", text_dtype="bfloat16")
    assert text(backend).dtype == torch.bfloat16
    assert getattr(backend, denoiser).dtype == backend.vae.dtype == torch.float32
    [image] = backend.draw(["a red circle"], [0], steps=1, width=size[0], height=size[1])
    assert image.size == size
    every = load_backend(name, path, device="cpu", dtype="bfloat16", text_dtype="float32")
    assert text(every).dtype == torch.float32 and getattr(every, denoiser).dtype == torch.bfloat16
    assert text(load_backend(name, path, device="cpu", dtype="bfloat16")).dtype == torch.bfloat16
    with pytest.raises(DrawingError, match="int8"):
        load_backend(name, path, device="cpu", text_dtype="int8")
