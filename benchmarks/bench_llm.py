"""EasyGen LLM speed: prefill and decode tokens/s, and image features (BiDiffuser) per second.

    python benchmarks/bench_llm.py [--configs tiny,mid,features] [--repeat 5] [--threads N]
                                   [--device cpu|cuda] [--mid-vocab 32000] [--json results.json]

Every model is randomly initialised (no downloads) and written to a temporary EasyGen directory,
then read back with ``easygen.builder.load_pretrained`` (the loader every tool uses). The prompt is
one user turn built by ``EasyGenProcessor``: one image (77 image positions) and ~100 text tokens.

- prefill: one forward over the prompt as ``generate`` runs it (KV cache built, logits of the
  last position only);
- decode: greedy decoding of N tokens with the KV cache, through ``model.generate`` (the chat path)
  and through a plain loop of forwards, and, for reference, the same loop without the cache (every
  step re-runs the whole sequence; ``generate`` cannot do this for EasyGen: transformers forces the
  cache on when generating from ``inputs_embeds``). Decode tokens/s = (N - 1) / (t(N) - t(1)): the
  time of a 1-token call (prefill, setup) is subtracted, so only the N - 1 decoding steps count;
  the speed-up column is relative to the uncached loop;
- features: ``easygen.features.ImageFeatureExtractor`` on a tiny BiDiffuser directory
  (``bidiffuser.model_dir.init_tiny``), images/s at 50 and 10 steps, and the time per image when
  every image is already in the feature store (cache hit: file hash, store read, ``decode_prefix``).

Each figure is the median of ``--repeat`` timed runs after a warm-up (the mid preset runs fewer
repeats, see ``Preset.repeat_scale``). Prints a Markdown table; it measures and reports, it never
asserts a time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from common import TIMING, median_seconds, n_params, machine_info, write_images, add_common_args, apply_common_args, report  # noqa: E402

from bidiffuser.cliutil import quiet_libraries  # noqa: E402

quiet_libraries()  # no weight-writing progress bars or advisory warnings between the figures
from bidiffuser.model_dir import init_tiny  # noqa: E402
from bidiffuser.pipeline import BiDiffuser  # noqa: E402
from easygen.builder import load_pretrained  # noqa: E402
from easygen.constants import IMAGE_TOKEN_ID  # noqa: E402
from easygen.features import ImageFeatureExtractor  # noqa: E402
from easygen.tiny import init_tiny_easygen  # noqa: E402

TEXT_TOKENS = 100          # text tokens in the prompt (besides the 77 image positions), at least
N_IMAGES = 4               # images per feature-extraction call
IMAGE_SIDE = 256           # pixels of the PNG files fed to the extractor (resized to the BiDiffuser's)
FEATURE_STEPS = (50, 10)


@dataclass
class Preset:
    name: str
    overrides: dict = field(default_factory=dict)  # EasyGenConfig fields over init_tiny_easygen's
    decode_tokens: int = 64      # N new tokens per decoding measurement
    repeat_scale: float = 1.0    # fraction of --repeat this preset runs


PRESETS = {
    # init_tiny_easygen's model: 2 layers x 64, 4 heads (2 KV heads), vocab = the tiny tokenizer's
    "tiny": Preset("tiny", {}, decode_tokens=64),
    # a mid-size LLaMA: 8 layers x 1024, 16 heads of 64 (MHA), MLP 2816; vocab from --mid-vocab
    "mid": Preset("mid", dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                              num_key_value_heads=16, head_dim=64, intermediate_size=2816,
                              projector_hidden_size=1024),
                  decode_tokens=32, repeat_scale=0.6),
}


# -- timing ----------------------------------------------------------------------------------------


# -- inputs ----------------------------------------------------------------------------------------
def build_prompt_ids(processor, min_text_tokens: int = TEXT_TOKENS) -> list[int]:
    """Ids of a one-turn prompt holding one image and at least ``min_text_tokens`` text tokens."""
    sentences = ["Describe the image in detail.", "What colour is the square?", "Is there a red circle?",
                 "How many shapes are there?", "Could you explain that again, please?"]
    text, k = "", 0
    while True:
        ids = processor.tokenize_prompt(processor.build_prompt([{"role": "user", "content": text, "num_images": 1}]))
        if sum(i != IMAGE_TOKEN_ID for i in ids) >= min_text_tokens:
            return ids
        text = (text + " " + sentences[k % len(sentences)]).strip()
        k += 1


# -- measurements ----------------------------------------------------------------------------------
def bench_prefill(model, ids: torch.Tensor, feats: torch.Tensor, repeat: int) -> float:
    """Seconds of one prompt forward as generate's first step runs it (cache built, last logits)."""
    def run():
        with torch.inference_mode():
            model(input_ids=ids, image_features=feats, use_cache=True, logits_to_keep=1)
    return median_seconds(run, repeat, warmup=3)  # the first calls at a new shape are slow on CPU


def generate_call(model, ids: torch.Tensor, feats: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy ``EasyGenForCausalLM.generate`` of exactly ``new_tokens`` tokens (the chat path).

    It always decodes with the KV cache: transformers forces ``use_cache=True`` when generating
    from ``inputs_embeds``, which is how EasyGen passes prompts holding images."""
    out = model.generate(ids, image_features=feats, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    return out[0].tolist()


def greedy_loop(model, ids: torch.Tensor, feats: torch.Tensor, new_tokens: int, use_cache: bool) -> list[int]:
    """Greedy decoding by hand: the prompt forward, then one forward per new token, either over the
    new token with the KV cache or over the whole sequence again (no cache). EOS is never picked,
    as ``generate``'s ``min_new_tokens`` does, so all three give the same tokens."""
    embed = model.get_input_embeddings()
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])

    def pick(out) -> int:
        logits = out.logits[0, -1]
        logits[eos] = float("-inf")
        return int(logits.argmax())

    with torch.inference_mode():
        embeds = model.embed_inputs(ids, feats)
        out = model(inputs_embeds=embeds, use_cache=use_cache, logits_to_keep=1)
        tokens = [pick(out)]
        for _ in range(new_tokens - 1):
            last = torch.tensor([[tokens[-1]]], device=ids.device)
            if use_cache:
                out = model(input_ids=last, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
            else:
                embeds = torch.cat([embeds, embed(last)], dim=1)
                out = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)
            tokens.append(pick(out))
    return tokens


def decode_rate(decode, new_tokens: int, repeat: int) -> float:
    """Tokens/s of the decoding steps alone: (N - 1) / (t(N tokens) - t(1 token)), each a median."""
    def timed(n):
        def run():
            if len(decode(n)) != n:
                raise AssertionError(f"decoding returned other than {n} tokens")
        return median_seconds(run, repeat)
    t1 = timed(1)
    return (new_tokens - 1) / max(timed(new_tokens) - t1, 1e-9)


def run_preset(p: Preset, repeat: int, device, bidiffuser_dir: Path, workdir: Path, mid_vocab: int) -> list[dict]:
    rows = []

    def add(measurement, setting, value, unit, per=None, speedup=None):
        rows.append({"config": p.name, "measurement": measurement, "setting": setting, "value": value,
                     "unit": unit, "per_item": per, "speedup": speedup, "other_load": TIMING.last_other_load})
        print(f"  {measurement:<18} {setting:<42} {value:10.2f} {unit:<9} {per or '':<16} "
              + (f"x{speedup:<6.2f}" if speedup else " " * 7)
              + f" (others: {TIMING.last_other_load:.2f} cores)", flush=True)

    overrides = dict(p.overrides)
    if p.name != "tiny" and mid_vocab:
        overrides["vocab_size"] = mid_vocab
    model_dir = init_tiny_easygen(workdir / p.name, bidiffuser_dir, seed=0, **overrides)
    loaded = load_pretrained(model_dir, device=device, load_bidiffuser=False)
    model, processor, c = loaded.model, loaded.processor, loaded.model.config
    ids = build_prompt_ids(processor)
    n_image = sum(i == IMAGE_TOKEN_ID for i in ids)
    x = torch.tensor([ids], device=device)
    torch.manual_seed(0)
    feats = torch.randn(1, c.num_image_tokens, c.mm_hidden_size, device=device)  # stands in for BiDiffuser's
    print(f"\n[{p.name}] EasyGen {n_params(model)} params: {c.num_hidden_layers} layers x {c.hidden_size}, "
          f"{c.num_attention_heads} heads ({c.num_key_value_heads} KV) of {c.head_dim}, MLP {c.intermediate_size}, "
          f"vocab {c.vocab_size} (tokenizer {len(loaded.tokenizer)}), projector {c.mm_hidden_size}->"
          f"{c.projector_hidden_size}->{c.hidden_size}; prompt {len(ids)} tokens ({n_image} image + "
          f"{len(ids) - n_image} text); {repeat} repeats", flush=True)

    t = bench_prefill(model, x, feats, repeat)
    add("prefill", f"{len(ids)}-token prompt, last logits", len(ids) / t, "tok/s", f"{1e3 * t:.1f} ms/prompt")

    n = p.decode_tokens
    no_cache = decode_rate(lambda k: greedy_loop(model, x, feats, k, False), n, repeat)
    add("decode no cache", f"greedy loop, {n} new tokens", no_cache, "tok/s", f"{1e3 / no_cache:.2f} ms/token")
    cached = decode_rate(lambda k: greedy_loop(model, x, feats, k, True), n, repeat)
    add("decode KV cache", f"greedy loop, {n} new tokens", cached, "tok/s", f"{1e3 / cached:.2f} ms/token",
        cached / no_cache)
    gen = decode_rate(lambda k: generate_call(model, x, feats, k), n, repeat)
    add("decode KV cache", f"model.generate, {n} new tokens", gen, "tok/s", f"{1e3 / gen:.2f} ms/token",
        gen / no_cache)
    same = generate_call(model, x, feats, n) == greedy_loop(model, x, feats, n, True) == greedy_loop(
        model, x, feats, n, False)
    print(f"  (greedy tokens of generate, the cached loop and the uncached loop {'agree' if same else 'DIFFER'})",
          flush=True)
    return rows


def run_features(repeat: int, device, bidiffuser_dir: Path, workdir: Path) -> list[dict]:
    rows = []
    pipe = BiDiffuser.from_pretrained(bidiffuser_dir, device=device)
    images = write_images(workdir / "images", N_IMAGES, IMAGE_SIDE)
    u = pipe.config.uvit
    print(f"\n[features] tiny BiDiffuser: U-ViT width {u.embed_dim}, depth {u.depth}, "
          f"{pipe.config.resolution}px images ({IMAGE_SIDE}px PNG files resized), features 77 x "
          f"{pipe.config.caption_decoder.n_embd}; {N_IMAGES} images per call; {repeat} repeats", flush=True)

    def add(setting, value, unit, per):
        rows.append({"config": "tiny BiDiffuser", "measurement": "image features", "setting": setting,
                     "value": value, "unit": unit, "per_item": per, "speedup": None,
                     "other_load": TIMING.last_other_load})
        print(f"  {'image features':<18} {setting:<42} {value:10.2f} {unit:<9} {per:<16} {'':7}"
              f" (others: {TIMING.last_other_load:.2f} cores)", flush=True)

    for steps in FEATURE_STEPS:
        extractor = ImageFeatureExtractor(pipe, steps=steps)  # no store: every call runs BiDiffuser
        t = median_seconds(lambda: extractor(images), repeat)
        add(f"{steps} steps, scale 7, batch {N_IMAGES}, no store", N_IMAGES / t, "images/s",
            f"{1e3 * t / N_IMAGES:.0f} ms/image")

    extractor = ImageFeatureExtractor(pipe, steps=FEATURE_STEPS[0], cache_dir=workdir / "store")
    extractor(images)  # fills the store
    extractor.hits = extractor.misses = 0
    t = median_seconds(lambda: extractor(images), repeat * 4)
    if extractor.misses:
        raise AssertionError(f"{extractor.misses} cache misses in the cache-hit measurement")
    add(f"store hit ({N_IMAGES} images, all stored)", N_IMAGES / t, "images/s", f"{1e3 * t / N_IMAGES:.2f} ms/image")
    return rows


# -- report -----------------------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    lines = ["| config | measurement | setting | result | per item | speed-up | other load (cores) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else ""
        lines.append(f"| {r['config']} | {r['measurement']} | {r['setting']} | {r['value']:.2f} {r['unit']} "
                     f"| {r['per_item'] or ''} | {speedup} | {r['other_load']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,mid,features",
                    help="comma-separated parts: " + ", ".join(PRESETS) + ", features (default: all)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per figure (mid runs 60%% of them)")
    ap.add_argument("--mid-vocab", type=int, default=32000,
                    help="vocabulary of the mid LLaMA (default 32000, LLaMA's; 0: the tiny tokenizer's)")
    add_common_args(ap)
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in PRESETS and n != "features"]
    if unknown:
        ap.error(f"unknown config(s): {', '.join(unknown)} (choose from {', '.join(PRESETS)}, features)")
    device = apply_common_args(args)

    info = machine_info(device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("note: decode tok/s = (N - 1) / (t(decode N tokens) - t(decode 1 token)); prompt image features "
          "are random (the LLM cost does not depend on their values)")
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        bidiffuser_dir = Path(tmp) / "bidiffuser"
        init_tiny(bidiffuser_dir, seed=0)
        for name in names:
            if name == "features":
                rows += run_features(args.repeat, device, bidiffuser_dir, Path(tmp))
            else:
                repeat = max(1, round(args.repeat * PRESETS[name].repeat_scale))
                rows += run_preset(PRESETS[name], repeat, device, bidiffuser_dir, Path(tmp), args.mid_vocab)
    report(markdown_table(rows), info, start, args, rows)

if __name__ == "__main__":
    main()
