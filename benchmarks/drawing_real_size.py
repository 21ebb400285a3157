"""Real-size dry runs of the released drawing backends: random weights at the true sizes in each
release's layout, then one picture per backend, in a fresh process each, with time and memory per phase.

    python benchmarks/drawing_real_size.py --workdir /var/tmp/draw-real --backend ella
    python benchmarks/drawing_real_size.py --workdir /tmp/draw-reduced --size reduced   # seconds (CI test)

Backends (``--backend``, default all):
  ella                 ELLA-SD1.5: SD1.5 U-Net + VAE, FLAN-T5-XL encoder, the connector (64 latents x 768, 6 blocks)
  lavi-llama2-unet     LaVi-Bridge: SD1.4 U-Net + Llama-2-7B (fp16 shards) + adapter (4096, 2432, 768) + rank-32 LoRA lists
  lavi-t5-transformer  LaVi-Bridge: PixArt-XL-2-512x512 + t5-large + adapter (1024, 2560, 4096) + LoRA lists
  paradiffusion        ParaDiffusion: its U-Net (384/768/1152/1536, cross-attention 4096) + Llama-2-7B + PEFT LoRA + SDXL VAE
  easygen-ella         EasyGen's Vicuna-7B (benchmarks/real_size.py's diffllama) answering with a picture drawn by ELLA
                       in the same process (``easygen chat --draw-with ella --drawer-offload --force-image``)
Files are written once under WORKDIR (skipped when already there; the Llama folder is shared).

Each drawing runs ``drawing.load_backend`` then ``draw`` of one prompt at the reference resolution
(ELLA and LaVi 512 x 512, ParaDiffusion 1024 x 640) with 2 steps, and records per phase (load, text
encoding, denoising, VAE decode): seconds, peak resident memory (the kernel's high-water mark, reset
at each phase as ``easygen.profiling`` does) and the bytes of weights resident. It reports, it never
asserts. The 7B Llamas run in bfloat16 (``text_dtype``; in fp32 one does not fit a 24 GiB machine),
everything else in float32 (16-bit convolutions on a CPU without native bf16 are ~70x slower).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install
sys.path.insert(0, str(ROOT / "benchmarks"))

GIB = 1024 ** 3
PROMPT = ("A red book and a yellow vase on a dark wood table; the vase holds a fresh array of multicolored "
          "wildflowers.")
STEPS = 2
PHASES = ["load", "text", "denoise", "decode"]
# backend name, files under WORKDIR, load options (per-part dtypes where the backend has them)
CASES = {
    "ella": ("ella", "ella", {}),
    "lavi-llama2-unet": ("lavi-bridge", "lavi/llama2_unet", {"text_dtype": "bfloat16"}),
    "lavi-t5-transformer": ("lavi-bridge", "lavi/t5_transformer", {}),
    "paradiffusion": ("paradiffusion", "paradiffusion", {"text_dtype": "bfloat16"}),
}
ALL = [*CASES, "easygen-ella"]


def write_case(case: str, work: Path, size_name: str, easygen_llm: Path | None = None) -> Path:
    """Write what ``case`` reads (skipped when there); returns the folder handed to the backend."""
    import drawing_layouts as L

    size = L.SIZES[size_name]
    llama = work / "Llama-2-7b-hf"
    if case in ("ella", "easygen-ella"):
        path = L.write_ella(work / "ella", size)
        if case == "easygen-ella" and easygen_llm is None:
            import real_size
            real_size.write_llm(work / "easygen" / "diffllama", real_size.SIZES[size_name])
        return path
    if case == "lavi-llama2-unet":
        return L.write_lavi(work / "lavi", size, "llama2_unet", llama)
    if case == "lavi-t5-transformer":
        return L.write_lavi(work / "lavi", size, "t5_transformer", None)
    return L.write_paradiffusion(work / "paradiffusion", size, llama)


def resolution(case: str, size_name: str) -> tuple[int, int]:
    import drawing_layouts as L
    key = "lavi" if case.startswith("lavi") else "ella" if "ella" in case else case
    return L.SIZES[size_name].resolution[key]


# ------------------------------------------------------------------------------ one backend, in a child
class Phases:
    """Rows of (phase, seconds, peak RSS, weights) where each phase starts when the next part is first
    called; the high-water mark is reset at each start (``easygen.profiling``)."""

    def __init__(self, on_row=lambda rows: None):
        self.rows, self.current, self.weights, self.on_row = [], None, (lambda: None), on_row

    def start(self, name: str) -> None:
        from easygen.profiling import reset_peak_rss
        if self.current and self.current[0] == name:
            return
        self.stop()
        self.current = (name, time.perf_counter(), reset_peak_rss())

    def stop(self) -> None:
        from easygen.profiling import Phase, peak_rss_bytes
        if self.current:
            name, t0, per_phase = self.current
            row = Phase(name, time.perf_counter() - t0, peak_rss_bytes() if per_phase else None,
                        self.weights()).to_json()
            # how much of what is resident at the end is mapped weight files (clean pages the kernel
            # can drop and read again) rather than the process's own memory
            row["rss_file_bytes"] = _status_bytes("RssFile")
            self.rows.append(row)
            self.current = None
            self.on_row(self.rows)


def _status_bytes(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines() if Path("/proc/self/status").exists() else []:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def modules_of(backend) -> list:
    """The backend's torch modules: its attributes, and those of its parts (e.g. LaVi's text wrapper)."""
    import torch
    out = []
    for value in vars(backend).values():
        for v in (value if isinstance(value, (list, tuple)) else (value,)):
            if isinstance(v, torch.nn.Module):
                out.append(v)
            elif hasattr(v, "__dict__") and not isinstance(v, (str, Path, type)):
                out += [m for m in vars(v).values() if isinstance(m, torch.nn.Module)]
    return out


def instrument(backend, phases: Phases, skip: list[str]) -> None:
    """Phase boundaries: the first call of the connector or the denoiser starts "denoise", the VAE's
    decode starts "decode" (text encoding is what comes before); a phase in ``skip`` ends the run."""
    def start(name: str) -> None:
        if name in skip:
            phases.stop()
            raise Stop(name)
        phases.start(name)

    for name in ("connector", "unet", "vis"):
        part = getattr(backend, name, None)
        if part is not None:
            part.register_forward_pre_hook(lambda *_: start("denoise"))
    vae = backend.vae
    decode = vae.decode

    def timed_decode(*args, **kwargs):
        start("decode")
        return decode(*args, **kwargs)
    vae.decode = timed_decode


class Stop(Exception):
    """Raised at the start of the phase ``--until`` names: the run ends after the one before it."""


def run_child(case: str, path: Path, size_name: str, options: dict, out: Path, until: str = "decode") -> None:
    import torch

    from drawing import load_backend
    from easygen.profiling import module_bytes, rss_bytes

    backend_name = CASES[case][0]
    width, height = resolution(case, size_name)
    torch.set_grad_enabled(False)
    baseline = rss_bytes()
    # each finished phase is written at once: a run stopped later (memory, time) still reports it
    phases = Phases(lambda rows: out.with_suffix(".partial.json").write_text(json.dumps(rows, indent=1)))
    phases.start("load")
    backend = load_backend(backend_name, path, device="cpu", **options)
    phases.weights = lambda: module_bytes(*modules_of(backend))
    phases.stop()
    image = None
    if until != "load":
        instrument(backend, phases, PHASES[PHASES.index(until) + 1:])
        phases.start("text")
        try:
            [image] = backend.draw([PROMPT], [0], steps=STEPS, width=width, height=height)
            image.save(out.with_suffix(".png"))
            phases.stop()
        except Stop:
            pass
    out.write_text(json.dumps({
        "case": case, "describe": backend.describe(), "baseline_rss_bytes": baseline, "phases": phases.rows,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "image": image and str(out.with_suffix(".png")), "image_size": image and list(image.size),
        "options": options, "until": until}, indent=1))


# ------------------------------------------------------------------------------ EasyGen + ELLA
def ella_weight_bytes(ella_dir: Path) -> int:
    """Bytes ELLA holds once loaded (fp32 on CPU): connector, U-Net, VAE and the T5 encoder (the
    release's decoder half is not loaded), read off the safetensors headers."""
    import math

    from safetensors import safe_open
    total = 0
    sd = ella_dir / "stable-diffusion-v1-5"
    files = [ella_dir / "ella-sd1.5-tsc-t5xl.safetensors", sd / "unet" / "diffusion_pytorch_model.safetensors",
             sd / "vae" / "diffusion_pytorch_model.safetensors", *(ella_dir / "flan-t5-xl").glob("model-*.safetensors")]
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if "flan-t5-xl" in str(f) and not k.startswith(("encoder.", "shared.")):
                    continue
                total += math.prod(st.get_slice(k).get_shape()) * 4
    return total


def run_easygen(work: Path, size_name: str, llm: Path, out: Path, extra: list[str]) -> dict:
    import real_size
    size = real_size.SIZES[size_name]
    profile = out.with_suffix(".profile.json")
    cmd = [sys.executable, "-m", "easygen.cli", "chat", "--model-path", str(llm), "--device", "cpu",
           "--dtype", "bfloat16", "--prompt", "Draw a red book and a yellow vase on a wooden table.",
           "--force-image", "--draw-with", "ella", "--drawer", str(work / "ella"), "--drawer-offload",
           "--steps", str(STEPS), "--max-new-tokens", str(size.steps["new_tokens"]), "--seed", "0",
           "--profile", str(profile), "--json", "--out-dir", str(out.parent / "easygen-images"), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        return {"case": "easygen-ella", "error": proc.stderr[-3000:], "command": " ".join(cmd)}
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"case": "easygen-ella", "phases": json.loads(profile.read_text())["phases"], "reply": reply,
            "wall_s": time.perf_counter() - start, "drawer_weights_bytes": ella_weight_bytes(work / "ella"),
            "command": " ".join(cmd)}


# ------------------------------------------------------------------------------ report
def table(result: dict) -> str:
    width = max(len(p["phase"]) for p in result["phases"])
    rows = [f"{'phase':<{width}} {'seconds':>8} {'peak RSS GiB':>13} {'weights GiB':>12} {'peak/weights':>13} "
            f"{'above weights GiB':>18} {'file-backed GiB':>16}"]
    extra = result.get("drawer_weights_bytes", 0)
    for p in result["phases"]:
        w = (p["weights_bytes"] or 0) + extra
        peak = p["peak_rss_bytes"]
        ratio = f"{peak / w:12.2f}x" if peak and w else f"{'':>13}"
        above = f"{(peak - w) / GIB:18.2f}" if peak else f"{'':>18}"
        mapped = f"{p['rss_file_bytes'] / GIB:16.2f}" if p.get("rss_file_bytes") is not None else ""
        rows.append(f"{p['phase']:<{width}} {p['seconds']:8.1f} {peak / GIB if peak else float('nan'):13.2f} "
                    f"{w / GIB:12.2f} {ratio} {above} {mapped}")
    return "\n".join(rows)


def case_folders(case: str, path: Path) -> list[Path]:
    """The folders a backend reads: LaVi's combo folder and the two bases it runs on."""
    if case == "paradiffusion":
        return [path, path / "Llama-2-7b-hf"]  # a link: counted apart
    if not case.startswith("lavi"):
        return [path]
    bases = {"lavi-llama2-unet": ("stable-diffusion-v1-4", "Llama-2-7b-hf"),
             "lavi-t5-transformer": ("PixArt-XL-2-512x512", "t5-large")}[case]
    return [path, *(path.parent / b for b in bases)]


def dir_bytes(path: Path) -> int:
    path = path.resolve()  # the Llama folder is a link
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_case(case: str, args) -> dict:
    work = args.workdir
    t0 = time.perf_counter()
    path = write_case(case, work, args.size, args.easygen_llm)
    written = time.perf_counter() - t0
    out = work / "results" / f"{case}-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if case == "easygen-ella":
        llm = args.easygen_llm or work / "easygen" / "diffllama"
        result = run_easygen(work, args.size, llm, out, args.extra)
        result["disk_bytes"] = dir_bytes(llm) + dir_bytes(work / "ella")
    else:
        options = {**CASES[case][2], **dict(o.split("=", 1) for o in args.option)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--path", str(path), "--size",
               args.size, "--out", str(out), "--workdir", str(work), "--options", json.dumps(options),
               "--until", args.until]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            result = {"case": case, "error": proc.stderr[-3000:], "command": " ".join(cmd)}
        else:
            result = {**json.loads(out.read_text()), "wall_s": time.perf_counter() - start}
        result["disk_bytes"] = sum(dir_bytes(d) for d in case_folders(case, path))
    result["written_s"] = written
    return result


def report(result: dict) -> None:
    case = result["case"]
    print(f"\n== {case}: {result['disk_bytes'] / GIB:.2f} GiB on disk (written in {result['written_s']:.0f} s; "
          "reused when already there)")
    if "error" in result:
        print(f"FAILED:\n{result['error']}")
        return
    if "describe" in result:
        print(result["describe"])
        print(f"after imports, before loading: {result['baseline_rss_bytes'] / GIB:.2f} GiB resident; "
              + (f"picture {result['image']} {result['image_size']}" if result["image"]
                 else f"stopped after {result['until']} (--until)"))
    else:
        print(f"reply: {result['reply']['text'][:100]!r}; picture {result['reply']['images']}\n"
              f"weights column: EasyGen's --profile count (the LLM) + ELLA's "
              f"{result['drawer_weights_bytes'] / GIB:.2f} GiB (held on the CPU throughout)")
    print(table(result))
    peaks = [p["peak_rss_bytes"] for p in result["phases"] if p["peak_rss_bytes"]]
    print(f"whole run: {result['wall_s']:.0f} s, highest phase peak {max(peaks) / GIB:.2f} GiB")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="where the weights are written (reused)")
    ap.add_argument("--backend", choices=[*ALL, "all"], default="all")
    ap.add_argument("--size", choices=["real", "reduced"], default="real")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a load option for the backends run (e.g. dtype=float32), replacing the default")
    ap.add_argument("--easygen-llm", type=Path, metavar="DIR",
                    help="easygen-ella: an existing diffllama directory (benchmarks/real_size.py's) instead of "
                         "writing WORKDIR/easygen/diffllama")
    ap.add_argument("--until", choices=PHASES, default="decode",
                    help="end each drawing after this phase (default: the whole picture)")
    ap.add_argument("--json", type=Path, help="also write all results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="easygen-ella: more `easygen chat` flags after --")
    args = ap.parse_args(argv)
    if args.child:
        run_child(args.child, args.path, args.size, json.loads(args.options), args.out, args.until)
        return
    results = []
    for case in ALL if args.backend == "all" else [args.backend]:
        results.append(run_case(case, args))
        report(results[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
