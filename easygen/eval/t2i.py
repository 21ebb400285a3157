"""Text-to-image benchmarks: read a benchmark's prompts, draw them, and write the images in exactly
the layout that benchmark's official scorer reads. How the images are drawn is not this module's
business: the writers take a callable ``draw(prompts, seeds) -> [PIL.Image]`` (one image per
(prompt, seed) pair).

Benchmarks and their layouts (``<out>`` is ``--out``):

- ``dpg``: DPG-Bench (TencentQQGYLab/ELLA, ``dpg_bench/``). Prompts: the folder
  ``dpg_bench/prompts/`` (``<item>.txt``, one prompt a file), or ``dpg_bench/dpg_bench.csv`` (one
  row per question; columns ``item_id`` and ``text`` give the prompts). Output: ``<out>/<item>.png``,
  a 2x2 grid of 4 samples (reading order: top-left, top-right, bottom-left, bottom-right), each tile
  the model's resolution; ``compute_dpg_bench.py --resolution R`` crops the tiles at multiples of
  R and keys each image by its file name up to the first dot. It lists every file in the folder,
  so nothing else is written there.
- ``geneval``: GenEval (djghosh13/geneval). Prompts: ``prompts/evaluation_metadata.jsonl``, one
  JSON object a line. Output: ``<out>/<index:05d>/metadata.jsonl`` (the prompt's line) and
  ``<out>/<index:05d>/samples/<k:05d>.png``, as ``generation/diffusers_generate.py`` writes them
  (``evaluation/evaluate_images.py`` reads every ``\\d+.png`` under ``samples/`` of every
  all-digit folder); 4 samples a prompt unless told otherwise. No ``grid.png`` (optional there).
- ``paraprompts``: ParaPrompts-400 (weijiawu/ParaDiffusion, ``ParaPrompts-400/ParaPrompts_400.csv``,
  columns Image, Prompt, Category, Prompt_Chinese). Output: one ``<out>/<stem>.png`` per row,
  ``<stem>`` the row's Image value without its extension (``0f04...b7eb.JPEG`` ->
  ``0f04...b7eb.png``), so the images line up with the CSV and ``Parts_50/<stem>.json``.

Seeds: sample k of every prompt is drawn with seed ``seed + k`` (GenEval's script also reseeds
each prompt alike), so a prompt's images do not depend on which prompts were drawn before it, on
``--limit`` or on how the work was split.

Resuming: each prompt's output is written atomically (a PNG through a temporary file renamed into
place; a GenEval prompt folder built as a temporary folder, then renamed), so it is either all
there or absent. Every PNG carries a text chunk ``easygen-t2i`` with the settings it was drawn with
(the header: model and BiDiffuser fingerprints, steps, scale, seeds, ...) and its prompt. A rerun
skips every prompt whose output is complete and was drawn with the same settings, refuses to mix
when the settings differ or when the files are someone else's, and deletes temporary files that an
interrupted run of ours left behind (only ours: ``.<name>.<8 chars>.tmp``).

Import-light at the top (the CLI's parser reads ``BENCHMARKS``); PIL and the writers' helpers are
imported where they are used.
"""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from easygen.errors import EasyGenError

if TYPE_CHECKING:
    from PIL import Image

BENCHMARKS = ("dpg", "geneval", "paraprompts")
TITLES = {"dpg": "DPG-Bench", "geneval": "GenEval", "paraprompts": "ParaPrompts-400"}
INFO_KEY = "easygen-t2i"  # the PNG text chunk holding what an image was drawn with

Draw = Callable[[list[str], list[int]], "list[Image.Image]"]


@dataclass(frozen=True)
class Prompt:
    name: str               # the output's name: DPG item, GenEval index (00000), ParaPrompts stem
    text: str               # what is drawn
    where: str              # file (and line or row) for messages
    line: str | None = None  # GenEval: the metadata line, written back verbatim


def seeds_for(seed: int, n: int) -> list[int]:
    """The seed of each of a prompt's ``n`` samples: ``seed + k`` for sample k."""
    return [seed + k for k in range(n)]


# ---------------------------------------------------------------------------------------- reading
def _natural_key(name: str):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise EasyGenError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise EasyGenError(f"{what} {path}: cannot read: {e.strerror or e}") from None


def _read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict]]:
    """(CSV line number, row) for each data row; an error names any required column that is missing."""
    text = _read_text(path, "prompts file")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = reader.fieldnames or []
    except csv.Error as e:
        raise EasyGenError(f"{path}:1: not valid CSV ({e})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        found = ", ".join(columns) if columns else "none: the file is empty"
        found = found if len(found) <= 80 else found[:77] + "..."
        raise EasyGenError(f"{path}: no {' or '.join(repr(c) for c in missing)} column (columns: {found})")
    try:
        return [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise EasyGenError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _check_name(name: str, where: str, what: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise EasyGenError(f"{where}: {what} {name!r} cannot name an output file")
    return name


def read_dpg(path: Path) -> list[Prompt]:
    """DPG-Bench: the ``prompts/`` folder (``<item>.txt``, natural order) or ``dpg_bench.csv``
    (items in the order they first appear)."""
    if path.is_dir():
        files = sorted((f for f in path.iterdir() if f.suffix == ".txt" and not f.name.startswith(".") and f.is_file()),
                       key=lambda f: _natural_key(f.stem))
        if not files:
            raise EasyGenError(f"{path}: no .txt prompt files in the folder")
        prompts = [Prompt(f.stem, _read_text(f, "prompt file").strip(), str(f)) for f in files]
    else:
        rows = _read_csv(path, ("item_id", "text"))
        seen: dict[str, Prompt] = {}
        for line, row in rows:
            item = (row["item_id"] or "").strip()
            if item and item not in seen:
                seen[item] = Prompt(item, (row["text"] or "").strip(), f"{path}:{line}")
        prompts = list(seen.values())
        if not prompts:
            raise EasyGenError(f"{path}: no prompts (no rows with an item_id)")
    for p in prompts:
        _check_name(p.name, p.where, "item")
        if "." in p.name:  # compute_dpg_bench.py keys an image by its name up to the first dot
            raise EasyGenError(f"{p.where}: item {p.name!r} has a dot, which DPG-Bench's scorer cuts its name at")
        if not p.text:
            raise EasyGenError(f"{p.where}: empty prompt")
    return prompts


def read_geneval(path: Path) -> list[Prompt]:
    """GenEval ``evaluation_metadata.jsonl``: prompt i (0-based, blank lines skipped) is output i."""
    if path.is_dir():
        raise EasyGenError(f"{path} is a folder; give GenEval's evaluation_metadata.jsonl")
    prompts = []
    for n, raw in enumerate(_read_text(path, "prompts file").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path}:{n}"
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            raise EasyGenError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(meta, dict):
            raise EasyGenError(f"{where}: a line must be a JSON object")
        text = meta.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise EasyGenError(f"{where}: no 'prompt' (a non-empty string)")
        prompts.append(Prompt(f"{len(prompts):05d}", text.strip(), where, line))
    if not prompts:
        raise EasyGenError(f"{path}: no prompts")
    return prompts


def read_paraprompts(path: Path) -> list[Prompt]:
    """ParaPrompts-400 CSV: one prompt per row, named after its Image column."""
    if path.is_dir():
        raise EasyGenError(f"{path} is a folder; give ParaPrompts-400's ParaPrompts_400.csv")
    prompts: list[Prompt] = []
    names: dict[str, str] = {}
    for line, row in _read_csv(path, ("Image", "Prompt")):
        where = f"{path}:{line}"
        image, text = (row["Image"] or "").strip(), (row["Prompt"] or "").strip()
        if not image and not text:
            continue
        stem = Path(_check_name(image, where, "Image")).stem
        _check_name(stem, where, "Image")
        if not text:
            raise EasyGenError(f"{where}: empty Prompt")
        if stem in names:
            raise EasyGenError(f"{where}: Image {image!r} gives the same file name as {names[stem]}")
        names[stem] = where
        prompts.append(Prompt(stem, text, where))
    if not prompts:
        raise EasyGenError(f"{path}: no prompts")
    return prompts


def read_prompts(benchmark: str, path: str | Path) -> list[Prompt]:
    check_benchmark(benchmark)
    path = Path(path)
    if not path.exists():
        raise EasyGenError(f"prompts not found: {path}")
    return {"dpg": read_dpg, "geneval": read_geneval, "paraprompts": read_paraprompts}[benchmark](path)


def check_benchmark(benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise EasyGenError(f"unknown benchmark {benchmark!r} (choose {', '.join(BENCHMARKS)})")


# ---------------------------------------------------------------------------------------- PNG files
def _record(header: dict, prompt: Prompt, seeds: list[int]) -> dict:
    return {"header": header, "prompt": prompt.text, "seeds": seeds}


def save_png(image: "Image.Image", path: Path, record: dict, atomic: bool = True) -> None:
    from PIL.PngImagePlugin import PngInfo

    from bidiffuser.checkpoint import atomic_path

    info = PngInfo()
    info.add_text(INFO_KEY, json.dumps(record, sort_keys=True))
    if not atomic:
        image.save(path, format="PNG", pnginfo=info)
        return
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_record(path: Path) -> dict | None:
    """What an image of ours was drawn with (None: not one of ours)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            raw = im.info.get(INFO_KEY) if im.format == "PNG" else None
    except (UnidentifiedImageError, OSError):
        return None
    try:
        rec = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _check_record(path: Path, found: dict | None, expected: dict) -> None:
    if found is None:
        raise EasyGenError(f"{path} exists and was not written by `easygen eval t2i`; "
                           "delete it or choose another --out")
    if found != expected:
        fh, eh = found.get("header") or {}, expected["header"]
        diff = sorted(k for k in fh.keys() | eh.keys() if fh.get(k) != eh.get(k))
        diff += [k for k in ("prompt", "seeds") if found.get(k) != expected[k]]
        raise EasyGenError(f"{path} was drawn with other settings ({', '.join(diff)} differ); "
                           "delete it or choose another --out")


# ---------------------------------------------------------------------------------------- layouts
class Layout:
    """Where a benchmark's scorer expects a prompt's images, and how to write them."""
    benchmark = ""
    n_samples = 1

    def done(self, out: Path, prompt: Prompt, header: dict, seed: int) -> bool:
        """True when the prompt's output is complete (drawn with these settings); an error when
        files of another run or someone else's are in the way."""
        raise NotImplementedError

    def write(self, out: Path, prompt: Prompt, images: list, header: dict, seed: int) -> None:
        raise NotImplementedError

    def names(self, prompt: Prompt) -> list[str]:
        """The entries this prompt puts directly in ``out`` (for the stale temporary files)."""
        raise NotImplementedError


class _OnePNG(Layout):
    """``<out>/<name>.png`` per prompt."""

    def path(self, out: Path, prompt: Prompt) -> Path:
        return out / f"{prompt.name}.png"

    def names(self, prompt: Prompt) -> list[str]:
        return [f"{prompt.name}.png"]

    def done(self, out, prompt, header, seed):
        path = self.path(out, prompt)
        if not path.exists():
            return False
        _check_record(path, read_record(path), _record(header, prompt, seeds_for(seed, self.n_samples)))
        return True


class DPGLayout(_OnePNG):
    benchmark = "dpg"
    n_samples = 4  # a 2x2 grid

    def write(self, out, prompt, images, header, seed):
        save_png(grid_2x2(images), self.path(out, prompt), _record(header, prompt, seeds_for(seed, self.n_samples)))


class ParaPromptsLayout(_OnePNG):
    benchmark = "paraprompts"
    n_samples = 1

    def write(self, out, prompt, images, header, seed):
        save_png(images[0].convert("RGB"), self.path(out, prompt), _record(header, prompt, seeds_for(seed, 1)))


class GenEvalLayout(Layout):
    benchmark = "geneval"

    def __init__(self, n_samples: int = 4):
        self.n_samples = n_samples

    def names(self, prompt):
        return [prompt.name]

    @staticmethod
    def sample_name(k: int) -> str:
        return f"{k:05}.png"  # as generation/diffusers_generate.py names them

    def done(self, out, prompt, header, seed):
        folder = out / prompt.name
        if not folder.exists():
            return False
        if not folder.is_dir():
            raise EasyGenError(f"{folder} exists and is not a folder; delete it or choose another --out")
        seeds = seeds_for(seed, self.n_samples)
        samples = [folder / "samples" / self.sample_name(k) for k in range(self.n_samples)]
        present = [p for p in samples if p.is_file()]
        for p, s in zip(samples, seeds):
            if p in present:
                _check_record(p, read_record(p), _record(header, prompt, [s]))
        meta = folder / "metadata.jsonl"
        if meta.is_file() and meta.read_text(encoding="utf-8").strip() != prompt.line:
            raise EasyGenError(f"{meta} holds another prompt's metadata than {prompt.where}; "
                               "delete it or choose another --out")
        if meta.is_file() and len(present) == len(samples):
            return True
        if not meta.is_file() and any(folder.iterdir()):
            raise EasyGenError(f"{folder} exists and was not written by `easygen eval t2i`; "
                               "delete it or choose another --out")
        return False  # an unfinished folder (GenEval's own script's, say): drawn again and replaced

    def write(self, out, prompt, images, header, seed):
        from bidiffuser.checkpoint import atomic_dir

        with atomic_dir(out / prompt.name, marker="metadata.jsonl") as tmp:
            (tmp / "samples").mkdir()
            for k, (image, s) in enumerate(zip(images, seeds_for(seed, self.n_samples))):
                save_png(image.convert("RGB"), tmp / "samples" / self.sample_name(k),
                         _record(header, prompt, [s]), atomic=False)
            (tmp / "metadata.jsonl").write_text(prompt.line + "\n", encoding="utf-8")


def layout_for(benchmark: str, n_samples: int | None = None) -> Layout:
    """The benchmark's layout; ``n_samples`` (GenEval only; default 4) samples per prompt."""
    check_benchmark(benchmark)
    if benchmark == "geneval":
        return GenEvalLayout(4 if n_samples is None else n_samples)
    if n_samples is not None:
        raise EasyGenError("--n-samples applies to geneval only (dpg draws 4 samples into a 2x2 grid, "
                           "paraprompts one image per row)")
    return DPGLayout() if benchmark == "dpg" else ParaPromptsLayout()


def grid_2x2(images: Sequence["Image.Image"]) -> "Image.Image":
    """4 equal tiles in reading order: top-left, top-right, bottom-left, bottom-right."""
    from PIL import Image

    if len(images) != 4:
        raise EasyGenError(f"a DPG-Bench grid needs 4 samples, got {len(images)}")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise EasyGenError(f"the 4 samples of a grid differ in size: {[im.size for im in images]}")
    grid = Image.new("RGB", (2 * w, 2 * h))
    for k, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((k % 2) * w, (k // 2) * h))
    return grid


# ---------------------------------------------------------------------------------------- the loop
_TEMP = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")  # tempfile's names as bidiffuser.checkpoint makes them


def remove_stale_temporaries(out: Path, layout: Layout, prompts: Sequence[Prompt]) -> int:
    """Delete the temporary files and folders an interrupted run left in ``out`` (ours only)."""
    if not out.is_dir():
        return 0
    ours = {name for p in prompts for name in layout.names(p)}
    removed = 0
    for entry in out.iterdir():
        m = _TEMP.fullmatch(entry.name)
        if m and m.group(1) in ours:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


def pending(layout: Layout, prompts: Sequence[Prompt], out: Path, header: dict, seed: int) -> list[Prompt]:
    """The prompts whose output is not there yet."""
    if out.exists() and not out.is_dir():
        raise EasyGenError(f"--out {out} is a file; give a folder")
    return [p for p in prompts if not layout.done(out, p, header, seed)]


def shard(items: Sequence, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous share of ``items`` out of ``world``."""
    return list(items[rank * len(items) // world:(rank + 1) * len(items) // world])


def draw_prompts(layout: Layout, prompts: Sequence[Prompt], out: Path, draw: Draw, header: dict, seed: int,
                 progress: Callable[[int, int], None] | None = None) -> int:
    """Draw and write each prompt's samples (one ``draw`` call a prompt); returns how many."""
    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(prompts):
        seeds = seeds_for(seed, layout.n_samples)
        images = list(draw([p.text] * len(seeds), seeds))
        if len(images) != len(seeds):
            raise EasyGenError(f"drawing gave {len(images)} images for {len(seeds)} samples ({p.where})")
        layout.write(out, p, images, header, seed)
        if progress is not None:
            progress(i + 1, len(prompts))
    return len(prompts)
