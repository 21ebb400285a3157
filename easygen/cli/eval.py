"""``easygen eval caption`` (COCO Karpathy: BLEU, METEOR, ROUGE-L, CIDEr) and ``easygen eval vqa``
(VQAv2 accuracy); ``easygen eval t2i`` draws the images of a text-to-image benchmark (DPG-Bench,
GenEval, ParaPrompts-400) in the layout its official scorer reads (``easygen.eval.t2i``).

caption and vqa run the same way: read the benchmark, generate what the predictions file does not hold yet
(resumable; split across ranks under torchrun), then on rank 0 score, write the results JSON
atomically and print a one-screen summary. Defaults follow LAVIS's COCO captioning recipe (beam 5,
8 to 30 new tokens, no sampling); the prompts are EasyGen's own (``--prompt-style easygen``, what
its released weights and our recipe train on) unless ``--prompt-style llava`` or ``--prompt`` says
otherwise.

Only argparse and the light bidiffuser.cliutil are imported at the top (``easygen --help`` stays
instant); torch, the model and pycocoevalcap are imported when a command runs.
"""
from __future__ import annotations

import argparse

from bidiffuser.cliutil import positive_int
from .model_args import add_model_args

# Kept light: easygen --help must not import torch (easygen.eval.prompts imports nothing heavy).
from ..eval.prompts import DEFAULT_PROMPT_STYLE, PROMPT_STYLES
from ..eval.t2i import BENCHMARKS as T2I_BENCHMARKS


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate captioning (COCO Karpathy) or VQA (VQAv2); draw "
                              "text-to-image benchmarks (DPG-Bench, GenEval, ParaPrompts-400)",
                              description="Evaluate an EasyGen model. Launch with torchrun to split the work.")
    tasks = p.add_subparsers(dest="eval_task", required=True, metavar="TASK")

    c = tasks.add_parser("caption", help="COCO Karpathy captioning: BLEU, METEOR, ROUGE-L, CIDEr",
                         description="Caption the images of a Karpathy split and score them with pycocoevalcap.")
    c.add_argument("--karpathy", required=True, metavar="JSON",
                   help="dataset_coco.json, or LAVIS coco_karpathy_test.json (one split already)")
    c.add_argument("--gt", metavar="JSON", help="LAVIS coco_karpathy_test_gt.json: the references "
                   "(default: the captions in the LAVIS file)")
    c.add_argument("--split", help="Karpathy split of dataset_coco.json: test (default), val, train, restval")
    _common(c, task="caption", beam=5, max_new=30, min_new=8)
    c.add_argument("--no-java", action="store_true",
                   help="score without Java (simple tokenizer, no METEOR/SPICE): labelled non-comparable")
    c.add_argument("--spice", action="store_true",
                   help="also compute SPICE (Java; downloads Stanford CoreNLP on first use)")

    v = tasks.add_parser("vqa", help="VQAv2 accuracy (official normalisation, per answer type)",
                         description="Answer VQAv2-format questions and score them with the official VQA accuracy.")
    v.add_argument("--questions", required=True, metavar="JSON", help="VQAv2 questions file")
    v.add_argument("--annotations", required=True, metavar="JSON", help="VQAv2 annotations file")
    _common(v, task="vqa", beam=1, max_new=10, min_new=1)
    _add_t2i(tasks)
    return p


def _add_t2i(tasks) -> None:
    t = tasks.add_parser("t2i", help="draw a text-to-image benchmark's images in its scorer's layout",
                         description="Draw the images of DPG-Bench, GenEval or ParaPrompts-400 and write them as "
                                     "that benchmark's official scorer reads them (score them there). Sample k of "
                                     "every prompt is drawn with seed SEED+k. A rerun skips the prompts already "
                                     "drawn with the same settings. Launch with torchrun to split the work.")
    add_model_args(t)
    g = t.add_argument_group("benchmark and output")
    g.add_argument("--benchmark", required=True, metavar="NAME",
                   help=f"{' | '.join(T2I_BENCHMARKS)}: dpg (ELLA's DPG-Bench: <item>.png, a 2x2 grid of 4 samples), "
                        "geneval (<index>/metadata.jsonl and <index>/samples/00000.png...), paraprompts "
                        "(ParaPrompts-400: one <Image stem>.png per CSV row)")
    g.add_argument("--prompts", required=True, metavar="PATH",
                   help="dpg: the dpg_bench/prompts folder (<item>.txt) or dpg_bench/dpg_bench.csv; geneval: "
                        "evaluation_metadata.jsonl; paraprompts: ParaPrompts_400.csv")
    g.add_argument("--out", required=True, metavar="DIR", help="image folder, in the benchmark's layout (resumed)")
    g.add_argument("--limit", type=positive_int, metavar="N", help="only the first N prompts")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = t.add_argument_group("drawing")
    g.add_argument("--steps", type=positive_int, metavar="N",
                   help="sampling steps (default: BiDiffuser 50; a --draw-with backend: its reference's)")
    g.add_argument("--scale", type=float, metavar="S",
                   help="guidance scale (default: BiDiffuser 7; a --draw-with backend: its reference's)")
    g.add_argument("--seed", type=int, default=42, metavar="N",
                   help="sample k of each prompt gets seed N+k (default 42, GenEval's)")
    g.add_argument("--n-samples", type=positive_int, metavar="N",
                   help="geneval only: samples per prompt (default 4); dpg always draws 4, paraprompts 1")


def _common(p: argparse.ArgumentParser, task: str, beam: int, max_new: int, min_new: int) -> None:
    add_model_args(p)
    g = p.add_argument_group("data and output")
    g.add_argument("--image-root", required=True, metavar="DIR", help="folder the image paths are relative to")
    g.add_argument("--limit", type=positive_int, metavar="N", help="only the first N samples")
    g.add_argument("--out", required=True, metavar="JSON", help="results file (written atomically)")
    g.add_argument("--predictions", metavar="JSONL",
                   help="predictions file, appended as they are produced; an existing one is resumed "
                        "(default: OUT with .predictions.jsonl)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("generation")
    styles = "; ".join(f"{name}: {getattr(style, task)!r}" for name, style in PROMPT_STYLES.items())
    g.add_argument("--prompt-style", choices=sorted(PROMPT_STYLES), default=DEFAULT_PROMPT_STYLE,
                   help=f"which recipe's prompt to use (default {DEFAULT_PROMPT_STYLE}, the original EasyGen's; "
                        f"{styles})")
    g.add_argument("--prompt", help="user message" + (" template with {question}" if task == "vqa" else "")
                   + " (overrides --prompt-style)")
    g.add_argument("--beam", type=positive_int, default=beam, metavar="N",
                   help=f"beam size (default {beam}; 1 = greedy)")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new, metavar="N", help=f"default {max_new}")
    g.add_argument("--min-new-tokens", type=int, default=min_new, metavar="N", help=f"default {min_new}")
    g.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="samples per batch (default 8)")
    g.add_argument("--feature-steps", type=positive_int, default=50, metavar="N",
                   help="BiDiffuser steps per image (default 50)")
    g.add_argument("--feature-scale", type=float, default=7.0, metavar="S",
                   help="BiDiffuser guidance scale (default 7)")
    g.add_argument("--feature-seed", type=int, default=1234, metavar="N", help="BiDiffuser seed (default 1234)")
    g.add_argument("--feature-cache", metavar="DIR", help="cache of image features (default: none)")


def run(args: argparse.Namespace) -> int:
    if args.eval_task == "t2i":
        return run_t2i(args)
    import time
    from pathlib import Path

    from bidiffuser.checkpoint import write_json
    from bidiffuser.model_dir import read_config
    from easygen.builder import find_bidiffuser_dir
    from easygen.errors import EasyGenError

    from ..eval import data, runner

    started = time.time()
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        raise EasyGenError(f"--min-new-tokens {args.min_new_tokens} must lie between 0 and --max-new-tokens")
    style = "custom" if args.prompt else args.prompt_style
    if not args.prompt:
        args.prompt = getattr(PROMPT_STYLES[args.prompt_style], args.eval_task)
    if args.eval_task == "vqa" and "{question}" not in args.prompt:
        raise EasyGenError("--prompt for vqa must contain {question}")
    out = Path(args.out)
    predictions = Path(args.predictions) if args.predictions else out.with_suffix(".predictions.jsonl")
    for flag, path in (("--out", out), ("--predictions", predictions)):
        if path.is_dir():
            raise EasyGenError(f"{flag} {path} is a directory; give a file name")

    if args.eval_task == "caption":
        fmt, samples = data.read_captions(args.karpathy, args.image_root, args.split, args.gt)
        data_info = {"format": fmt, "annotations": args.karpathy, "gt": args.gt,
                     "split": (args.split or "test") if fmt == "karpathy" else None}
    else:
        samples = data.read_vqa(args.questions, args.annotations, args.image_root)
        data_info = {"format": "vqav2", "questions": args.questions, "annotations": args.annotations}
    data_info.update(image_root=args.image_root, limit=args.limit)
    samples = samples[:args.limit]
    data.check_images(samples, args.image_root)
    if args.eval_task == "vqa":  # questions about one image side by side: its features are computed once
        samples.sort(key=lambda s: str(s.image))

    decoding = {"num_beams": args.beam, "max_new_tokens": args.max_new_tokens,
                "min_new_tokens": args.min_new_tokens, "do_sample": False}
    features = {"steps": args.feature_steps, "scale": args.feature_scale, "seed": args.feature_seed}
    model_fp = runner.model_fingerprint(args.model_path, args.model_base, args.lora, args.projector)
    bidiffuser_dir = find_bidiffuser_dir(args.bidiffuser, args.lora, args.model_path, args.model_base)
    if bidiffuser_dir is None:
        raise EasyGenError("no BiDiffuser directory: give --bidiffuser (or put it in the model directory as bidiffuser/)")
    # Everything the predictions depend on: a predictions file made under another header is refused.
    header = {"task": args.eval_task, "model": model_fp, "bidiffuser": read_config(bidiffuser_dir).fingerprint(),
              "prompt": args.prompt, "decoding": decoding, "features": features, "dtype": args.dtype,
              "bidiffuser_dtype": args.bidiffuser_dtype, "quantization": args.quantization}

    def make_predict():
        qa = runner.load_image_qa(args.model_path, args.model_base, args.lora, args.projector, str(bidiffuser_dir),
                                  args.device, args.dtype, dist, args.feature_steps, args.feature_scale,
                                  args.feature_seed, args.feature_cache, args.batch_size, decoding,
                                  args.bidiffuser_dtype, args.quantization)

        def predict(batch):
            if args.eval_task == "caption":
                replies = qa([args.prompt] * len(batch), [s.image for s in batch], [s.where for s in batch])
                return [{"caption": r} for r in replies]
            replies = qa([args.prompt.replace("{question}", s.question) for s in batch], [s.image for s in batch],
                         [s.where for s in batch])
            return [{"question": s.question, "answer": r} for s, r in zip(batch, replies)]
        return predict

    dist = runner.init_distributed()
    try:
        preds = runner.run_predictions(samples, predictions, header, make_predict, args.batch_size, dist,
                                       desc="captioning" if args.eval_task == "caption" else "answering",
                                       progress=not args.quiet)
        if not dist.main:
            return 0
        results = {
            "task": args.eval_task,
            "model": {"path": args.model_path, "model_base": args.model_base, "lora": args.lora,
                      "projector": args.projector, "fingerprint": header["model"]},
            "bidiffuser": {"path": str(bidiffuser_dir), "fingerprint": header["bidiffuser"]},
            "data": data_info,
            "prompt_style": style, "prompt": args.prompt, "decoding": decoding, "features": features,
            "dtype": args.dtype, "bidiffuser_dtype": args.bidiffuser_dtype, "predictions": str(predictions), "reused_predictions": preds.reused, "world_size": dist.world,
        }
        results.update(_score_caption(args, samples, preds.records) if args.eval_task == "caption"
                       else _score_vqa(args, samples, preds.records))
        results["elapsed_s"] = round(time.time() - started, 1)
        write_json(out, results, indent=2)
        print(summary(results, out))
    finally:
        dist.close()
    return 0


def _score_caption(args, samples, records) -> dict:
    import sys

    from ..eval import metrics

    scores = metrics.caption_scores({s.id: s.references for s in samples},
                                    {s.id: records[s.id]["caption"] for s in samples},
                                    metrics.SIMPLE if args.no_java else None, args.spice)
    if scores["notes"]:
        print(f"easygen: warning: {'; '.join(scores['notes'])}", file=sys.stderr)
    return {"num_images": len(samples), **scores}


def _score_vqa(args, samples, records) -> dict:
    from ..eval import metrics

    scores = metrics.vqa_scores(samples, {s.id: records[s.id]["answer"] for s in samples})
    scores.pop("per_question")
    return {"num_questions": len(samples), **scores}


def summary(r: dict, out) -> str:
    """The one-screen table printed at the end of a run."""
    d, f = r["decoding"], r["features"]
    if r["task"] == "caption":
        where = f"Karpathy '{r['data']['split']}' split" if r["data"]["format"] == "karpathy" else "LAVIS file"
        title = f"COCO captioning, {where}, {r['num_images']} images"
        n = r["num_images"]
    else:
        title = f"VQA, {r['num_questions']} questions"
        n = r["num_questions"]
    lines = [f"EasyGen eval: {title}",
             f"  model       {r['model']['path']}  (fingerprint {r['model']['fingerprint'][:12]})",
             f"  bidiffuser  {r['bidiffuser']['path']}  (fingerprint {r['bidiffuser']['fingerprint'][:12]})",
             f"  prompt      {r['prompt']!r}  ({r.get('prompt_style', 'custom')} style)",
             f"  decoding    beam {d['num_beams']}, {d['min_new_tokens']}-{d['max_new_tokens']} new tokens, "
             "no sampling",
             f"  features    BiDiffuser {f['steps']} steps, scale {f['scale']:g}, seed {f['seed']}; LLM {r['dtype']}, "
             f"BiDiffuser {r.get('bidiffuser_dtype', 'auto')}"]
    if r["task"] == "caption":
        lines.append(f"  tokenizer   {r['tokenizer']}")
    rule = "  " + "-" * 40
    lines.append(rule)
    rows = dict(r["metrics"])
    if r["task"] == "vqa":
        rows = {"accuracy": rows["accuracy"], **{f"  {k}": v for k, v in r["per_answer_type"].items()}}
    for name, value in rows.items():
        lines.append(f"  {name:<14}{'n/a' if value is None else f'{value:7.2f}':>8}")
    lines.append(rule)
    lines.append(f"  predictions {r['predictions']}  ({r['reused_predictions']} of {n} reused)")
    procs = f"{r['world_size']} process" + ("es" if r["world_size"] > 1 else "")
    lines.append(f"  results     {out}  ({r['elapsed_s']} s, {procs})")
    return "\n".join(lines)


def run_t2i(args: argparse.Namespace) -> int:
    """``easygen eval t2i``: read the prompts, skip what is drawn, draw the rest (this rank's share),
    print a summary on rank 0."""
    import time
    from pathlib import Path

    from bidiffuser.cliutil import progress_bar
    from bidiffuser.model_dir import read_config
    from bidiffuser.bridge import bridge_fingerprint
    from easygen.builder import find_bidiffuser_dir, resolve_bridge_dir
    from easygen.errors import EasyGenError

    from .engine_args import drawer_options

    from ..assistant import Assistant, GenerationSettings
    from ..eval import runner, t2i

    started = time.time()
    t2i.check_benchmark(args.benchmark)
    layout = t2i.layout_for(args.benchmark, args.n_samples)
    prompts = t2i.read_prompts(args.benchmark, args.prompts)
    total = len(prompts)
    prompts = prompts[:args.limit]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EasyGenError(f"--out {out} is a file; give a folder")
    bidiffuser_dir = find_bidiffuser_dir(args.bidiffuser, args.lora, args.model_path, args.model_base)
    if bidiffuser_dir is None:
        raise EasyGenError("no BiDiffuser directory: give --bidiffuser "
                           "(or put it in the model directory as bidiffuser/)")
    bridge_dir = resolve_bridge_dir(args.bridge, args.draw_with, args.lora, args.model_path)
    released = args.draw_with not in ("auto", "bridge", "clip")
    if not released:
        args.steps, args.scale = args.steps or 50, 7.0 if args.scale is None else args.scale
    # Everything the pictures depend on; stored in each PNG, so a rerun never mixes two settings.
    header = {"benchmark": args.benchmark,
              "model": runner.model_fingerprint(args.model_path, args.model_base, args.lora, args.projector),
              "bidiffuser": read_config(bidiffuser_dir).fingerprint(),
              "draw_with": args.draw_with if released else "clip" if bridge_dir is None else "bridge",
              "bridge": None if bridge_dir is None else bridge_fingerprint(bridge_dir),
              "drawer": runner.tree_fingerprint(args.drawer) if released and args.drawer else None,
              "drawer_options": drawer_options(args) or None,
              "steps": args.steps, "scale": args.scale,
              "seed": args.seed, "n_samples": layout.n_samples, "dtype": args.dtype,
              "bidiffuser_dtype": args.bidiffuser_dtype, "quantization": args.quantization}

    dist = runner.init_distributed()
    try:
        if dist.main:
            t2i.remove_stale_temporaries(out, layout, prompts)
        dist.barrier()
        todo = t2i.pending(layout, prompts, out, header, args.seed)
        dist.barrier()  # every rank has looked before anyone writes
        mine = t2i.shard(todo, dist.rank, dist.world)
        tile = None
        if mine:
            loaded = _load_for_drawing(args, dist)
            tile = _tile(loaded.drawer.defaults)
            # (the summary shows what a backend's own defaults came to; the header above keeps None)
            used = loaded.drawer.defaults.override(args.steps, args.scale)
            args.steps, args.scale = used.steps, used.guidance
            # the chat's own drawing (clip, bridge or a released system, as --draw-with resolved)
            draw = Assistant(loaded, GenerationSettings(image_steps=args.steps, image_scale=args.scale)).draw
            update, close = progress_bar("drawing", disable=args.quiet or not dist.main, unit="prompt")
            try:
                t2i.draw_prompts(layout, mine, out, draw, header, args.seed, update)
            finally:
                close()
        else:
            out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if dist.main:
            if tile is None:  # (nothing left to draw here: the size the images were drawn at)
                tile = read_config(bidiffuser_dir).resolution if not released else "the backend's"
            print(t2i_summary(args, layout, out, total, len(prompts), len(todo), tile, dist.world,
                              round(time.time() - started, 1)))
    finally:
        dist.close()
    return 0


def _load_for_drawing(args, dist):
    """The model through the one builder, on this rank's GPU under torchrun."""
    import torch

    from bidiffuser.cliutil import resolve_device
    from easygen.builder import load_pretrained
    from easygen.errors import EasyGenError

    from .engine_args import drawer_options
    dev = resolve_device(args.device)
    if dev.type == "cuda" and dev.index is None and dist.world > 1:
        dev = torch.device("cuda", dist.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    loaded = load_pretrained(args.model_path, model_base=args.model_base, lora=args.lora, projector=args.projector,
                             bidiffuser=args.bidiffuser, bridge=args.bridge, draw_with=args.draw_with,
                             drawer=args.drawer, drawer_options=drawer_options(args), device=dev,
                             dtype=args.dtype, bidiffuser_dtype=args.bidiffuser_dtype, quantization=args.quantization)
    if loaded.bidiffuser is None:
        raise EasyGenError("no BiDiffuser directory: give --bidiffuser")
    return loaded


def _tile(defaults) -> str | int:
    """A picture's size for the summary: its side when square, else WxH."""
    return defaults.width if defaults.width == defaults.height else f"{defaults.width}x{defaults.height}"


def _drawing_name(args) -> str:
    return "BiDiffuser" if args.draw_with in ("auto", "bridge", "clip") else args.draw_with


def _or_default(value, what: str) -> str:
    if value is None:
        return f"the backend's default {what}"
    return f"{value:g}" + (" steps" if what == "steps" else "")


def t2i_summary(args, layout, out, total: int, n: int, drawn: int, tile: int, world: int, elapsed: float) -> str:
    """What was drawn, where, and the scorer's command."""
    from ..eval.t2i import TITLES

    seeds = f"seed {args.seed}" if layout.n_samples == 1 else f"seeds {args.seed}..{args.seed + layout.n_samples - 1}"
    what = {"dpg": f"<item>.png, each a 2x2 grid of 4 samples of {tile} px",
            "geneval": f"<index>/metadata.jsonl + <index>/samples/00000.png.. ({layout.n_samples} of {tile} px)",
            "paraprompts": f"<Image stem>.png, {tile} px"}[args.benchmark]
    score = {"dpg": f"bash dpg_bench/dist_eval.sh {out} {tile}   (in ELLA's repository)",
             "geneval": f"python evaluation/evaluate_images.py {out} --outfile results.jsonl "
                        "--model-path <OBJECT_DETECTOR_FOLDER>   (in GenEval's repository)",
             "paraprompts": "no scorer ships with ParaDiffusion (its paper compares models by human rating)"
             }[args.benchmark]
    procs = f"{world} process" + ("es" if world > 1 else "")
    return "\n".join([
        f"EasyGen eval t2i: {TITLES[args.benchmark]}, {n} of {total} prompts ({drawn} drawn now, "
        f"{n - drawn} already there)",
        f"  model       {args.model_path}",
        f"  drawing     {_drawing_name(args)} {_or_default(args.steps, 'steps')}, "
        f"scale {_or_default(args.scale, 'scale')}, {seeds} (sample k: seed + k); "
        f"{layout.n_samples} sample{'s' if layout.n_samples > 1 else ''} a prompt",
        f"  images      {out}/{what}",
        f"  score with  {score}",
        f"  took        {elapsed} s, {procs}",
    ])
