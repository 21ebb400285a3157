"""The shapes demo model that ships inside the package, ready to use: what plain ``easygen chat``,
``easygen serve`` and ``easygen worker`` load, so a first conversation needs no build.

It is a built demo (``easygen demo build``) cut down to what inference reads: the ``easygen/``,
``bidiffuser/`` and ``bridge/`` directories, weights as safetensors only (the VAE and caption decoder are converted
from their ``.pth``), floating-point weights stored in float16 (loading converts them back to the
run's dtype). ``MANIFEST.json`` beside them records the recipe and its version, the commands that
made it, the sha256 of every file and the ``easygen demo eval`` results measured on exactly these
files. ``easygen demo ship`` writes all of it.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from bidiffuser.checkpoint import read_json, write_json

from ..errors import EasyGenError
from .recipe import VERSION, DemoModel

SHIPPED_DIR = Path(__file__).resolve().parent / "model"
MANIFEST = "MANIFEST.json"
# The components whose .pth the build writes; shipped as safetensors with the same keys.
CONVERTED = ("autoencoder", "caption_decoder")


def shipped_demo() -> DemoModel | None:
    """The demo model in the package, or None when this installation has none."""
    demo = DemoModel(SHIPPED_DIR)
    return demo if demo.is_built() and (SHIPPED_DIR / MANIFEST).is_file() else None


def default_demo() -> DemoModel:
    """The demo model that commands use with no model flags: ``$EASYGEN_DEMO_DIR`` when set (a build
    of your own, built there first if absent), else the shipped one, else the user cache's build."""
    import os
    from .recipe import default_dir
    if not os.environ.get("EASYGEN_DEMO_DIR"):
        shipped = shipped_demo()
        if shipped is not None:
            return shipped
    return DemoModel(default_dir())


def manifest(root: Path = SHIPPED_DIR) -> dict:
    return read_json(root / MANIFEST, "shipped demo manifest")


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest, by relative path (links as their target)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def verify(root: Path = SHIPPED_DIR) -> list[str]:
    """What does not match the manifest (missing, extra or changed files); empty when all match."""
    return compare_hashes(manifest(root)["sha256"], file_hashes(root))


def compare_hashes(want: dict[str, str], have: dict[str, str]) -> list[str]:
    problems = [f"missing: {p}" for p in sorted(set(want) - set(have))]
    problems += [f"not in the manifest: {p}" for p in sorted(set(have) - set(want))]
    return problems + [f"changed: {p}" for p in sorted(set(want) & set(have)) if want[p] != have[p]]


def ship(built: DemoModel, dest: Path = SHIPPED_DIR, dtype: str = "float16", log=print, command: str | None = None,
         run_eval: bool = True) -> dict:
    """Copy the inference files of ``built`` into ``dest`` (float weights as ``dtype``), evaluate the
    copy with ``easygen demo eval`` (unless ``run_eval`` is False) and write ``MANIFEST.json`` from what
    happened: the build's own record (its command, seconds per stage, commit, versions, threads), this
    ``command`` and the sha256 of every file; returns the manifest."""
    if not built.is_built():
        raise EasyGenError(f"no built demo model in {built.root}: run `easygen demo build` first")
    record = read_json(built.manifest, "demo manifest").get("build")
    if not record:
        raise EasyGenError(f"{built.manifest} has no build record (built by an older EasyGen): rebuild it with "
                           f"`easygen demo build`")
    tmp = dest.with_name(dest.name + ".partial")
    write_inference_files(built, tmp, dtype)
    from .build_record import git_state
    doc = {"format": "easygen-demo-shipped", "recipe_version": VERSION, "recipe": built.recipe().to_json(),
           "weights_dtype": dtype, "build": record,
           "commands": [c for c in (record.get("command"), command) if c],
           "shipped_by": git_state()}  # the code that converted and evaluated the copy
    if run_eval:  # both evals measured on exactly the files shipped
        from .evaluate import QUICK_DRAW_SEED, evaluate, format_quick, format_results, quick_evaluate
        out = built.root / "eval-shipped"
        log(f"evaluating the copy in {tmp} (results in {out})")
        results = evaluate(DemoModel(tmp), out)
        doc["eval"] = {"command": "easygen demo eval", "table": format_results(results).splitlines(),
                       "results": _summary(results)}
        quick = quick_evaluate(DemoModel(tmp), out / "quick", draw_seed=QUICK_DRAW_SEED)  # the CI test's sample
        doc["quick"] = {"command": "easygen demo eval --quick", "table": format_quick(quick).splitlines(),
                        "results": _summary(quick) | {"drawings": [{k: d[k] for k in ("colour_ok", "shape_ok")}
                                                                   | {"picture": d["picture"] is not None}
                                                                   for d in quick["drawings"]]}}
        log("\n".join(doc["eval"]["table"] + doc["quick"]["table"]))
    doc["sha256"] = file_hashes(tmp)
    write_json(tmp / MANIFEST, doc)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return doc


def write_inference_files(built: DemoModel, out: Path, dtype: str) -> None:
    """The shipped form of a build in ``out``: what inference reads, float weights as ``dtype`` in
    safetensors, paths relative, no timings, so that two builds with equal weights give equal bytes."""
    import torch

    from bidiffuser.checkpoint import read_state_dict, save_safetensors

    recipe = built.recipe()
    shutil.rmtree(out, ignore_errors=True)
    cast = getattr(torch, dtype)
    for sub in ("easygen", "bidiffuser", "bridge"):
        src = built.root / sub
        if sub == "bridge" and not src.is_dir():
            continue  # a demo built before the bridge existed
        for path in _files(src):
            rel = path.relative_to(src)
            target = out / sub / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():  # easygen/bidiffuser -> ../bidiffuser, easygen/bridge -> ../bridge
                target.symlink_to(path.readlink(), target_is_directory=True)
            elif path.suffix in (".safetensors", ".pth"):
                sd = {k: v.to(cast) if v.is_floating_point() else v
                      for k, v in read_state_dict(path, str(rel)).items()}
                save_safetensors(sd, target.with_suffix(".safetensors"))
            else:
                shutil.copy2(path, target)
    bridge_config = out / "bridge" / "config.json"
    if bridge_config.is_file():  # its text model is the shipped LLM, wherever the package is installed
        doc = read_json(bridge_config, "bridge config")
        doc["text_model"] = "../easygen"
        doc["info"] = {k: v for k, v in doc.get("info", {}).items() if k in ("stage", "steps", "preset")}
        write_json(bridge_config, doc)
    config_path = out / "bidiffuser" / "bidiffuser.json"
    config = read_json(config_path, "BiDiffuser config")
    for name in CONVERTED:
        config["files"][name] = str(Path(config["files"][name]).with_suffix(".safetensors"))
    # how the recipe samples, so `bidiffuser sample` and `easygen draw` on the shipped files draw as the chat does
    config["sampling_defaults"] = {"steps": recipe.image_steps, "scale": recipe.image_scale,
                                   "modes": {"i2t": {"steps": recipe.feature_steps, "scale": recipe.feature_scale}}}
    write_json(config_path, config)
    demo_doc = read_json(built.manifest, "demo manifest")
    write_json(out / "demo.json", {k: v for k, v in demo_doc.items() if k != "build"})  # the record: in MANIFEST


def verify_build(doc: dict, built: DemoModel, work: Path) -> list[str]:
    """A build's shipped form against a manifest's sha256: what differs (empty when every file is identical)."""
    write_inference_files(built, work, doc["weights_dtype"])
    return compare_hashes(doc["sha256"], file_hashes(work))


def _files(src: Path) -> list[Path]:
    """Files and links under ``src``, not following links, without the training checkpoints."""
    import os
    out = []
    for folder, dirs, files in os.walk(src):
        here = Path(folder)
        links = [d for d in dirs if (here / d).is_symlink()]
        dirs[:] = sorted(d for d in dirs if d not in links and not (here == src and d == "checkpoints"))
        out += [here / name for name in sorted(files + links)]
    return out


def _summary(results: dict) -> dict:
    """The figures of an eval worth keeping (not every turn's record)."""
    keep = ("held_out_images", "seed", "draw_seed", "caption_accuracy", "cider", "vqa_accuracy", "image_colour_accuracy",
            "image_shape_accuracy", "image_picture_rate", "image_counts", "readback_check", "conversations",
            "conversation_count", "paths", "long", "draw_with")
    return {k: results[k] for k in keep if k in results}

