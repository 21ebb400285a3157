"""``easygen demo build``: train every component of a small EasyGen on the shapes world, on CPU.

Each stage runs the same code a user runs for real models (the functions behind ``bidiffuser
train``, ``easygen features``, ``easygen train`` and ``easygen export``), only with small sizes:

    data              world images + captions/conversations + data configs     (easygen.demo.dataset)
    bidiffuser-init   random BiDiffuser, its tokenizer trained on the world's text
    clip              CLIP image and text encoders, contrastive objective        (bidiffuser.train_components)
    autoencoder       the VAE, trained on the images                            (bidiffuser.train_components)
    caption-decoder   the caption decoder, trained on the captions              (bidiffuser.train_components)
    unidiffuser       U-ViT from scratch, UniDiffuser's joint objective         (bidiffuser train)
    easygen-objective U-ViT fine-tuned with EasyGen's objective (+ text-to-image term)
    easygen-init      tiny LLaMA with a tokenizer trained on the world's text   (easygen init)
    features          BiDiffuser image features of every training image         (easygen features)
    stage1            projector alignment on captions                           (easygen train --stage pretrain)
    stage2            instruction tuning of LLM + projector                     (easygen train --stage instruct)

CLIP is trained (a random CLIP image embedding hardly changes from image to image; a trained one names
colour and shape, which the U-ViT reads when it turns an image into text).

Every stage writes ``stages/NAME.json`` when it completes; a rerun skips completed stages, so an
interrupted build continues where it stopped. The result is ``easygen/`` (an EasyGen directory whose
``bidiffuser`` link points at ``bidiffuser/``) plus ``demo.json`` naming the recipe.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bidiffuser.checkpoint import read_json, write_json

from ..errors import EasyGenError
from . import world

FORMAT = "easygen-demo-shapes"
VERSION = 7  # the default folder's name carries it: a new recipe never meets an old cache
Log = Callable[[str], None]
# The full recipe's build time on a clean cache, 2-core CPU: what the build messages promise (docs/demo.md:
# `easygen demo verify`'s rebuild of v7 took 1682 s on a quiet host).
BUILD_MINUTES = 30
FEATURE_SEED = 1234  # `easygen features`, `easygen train` and chat's default: one image, one feature


@dataclass(frozen=True)
class Recipe:
    """Sizes and step counts. ``full`` is the default; ``ci`` proves the plumbing in about a minute."""
    name: str = "full"
    train_images: int = 2000
    seed: int = 0
    # BiDiffuser (sizes: see _stage_bidiffuser_init)
    clip_steps: int = 1500
    vae_steps: int = 1000
    decoder_steps: int = 500
    # The joint objective only warms the U-ViT up; drawing is learnt in the EasyGen stage, whose
    # text-to-image term (weighted up, Min-SNR weighting) trains on the drawings (big, nearly centred
    # shapes): shapes come out after 2000 steps, where on the world's images 4000 drew blobs half the time;
    # colours need longer: 91% right at 2000 steps, 98% at 3000 (held-out seeds, benchmarks/demo_draw.py).
    unidiffuser_steps: int = 300
    easygen_steps: int = 3000
    uvit_batch: int = 32
    uvit_lr: float = 1e-3
    uvit_t2i_weight: float = 3.0
    uvit_snr_gamma: float | None = 5.0
    uvit_lr_schedule: str = "constant"
    uvit_ema_decay: float = 0.995
    uvit_t2i_uncond: float = 0.0
    uvit_width: int = 128
    uvit_depth: int = 6
    # BiDiffuser settings for reading images (features) and drawing (image replies). Little or no
    # guidance, unlike v1's 7: this small U-ViT's unconditional branch is barely trained, and strong
    # guidance amplifies its errors. Reading uses 1 all the same: unguided text latents vary between
    # paraphrases from sample to sample, and the LLM, trained on one sample per image, then fails to stop.
    feature_steps: int = 20
    feature_scale: float = 1.0
    image_steps: int = 20
    image_scale: float = 0.2
    # EasyGen LLM
    llm_width: int = 128
    llm_layers: int = 4
    stage1_steps: int = 200
    stage2_steps: int = 3600
    llm_batch: int = 16
    stage1_lr: float = 1e-3
    stage2_lr: float = 1e-3
    # Stage 2 data: scripted conversations (2-6 turns) beside the single-turn captions/questions/draws.
    conversations: int = 4000
    drawings: int = 540  # pictures as the assistant should draw them: the U-ViT's text-to-image data
    conversation_weight: float = 2.0
    # Questions about earlier pictures weighted by how many pictures there are (4 per earlier picture, not a
    # flat 5): "the first one" among three or four pictures is where the small LLM fails (docs/performance.md).
    earlier_per_picture: int = 4
    draw_copies: int = 8
    llm_context: int = 1024  # a 6-turn conversation with 6 pictures is ~300 tokens; chat keeps half for the answer
    # LLM bridge (the stage-2 LLM's states -> the U-ViT's 16 x 16 text slot), trained on the drawings with
    # their canonical caption first, their captions and long descriptions (dataset.write_bridge_captions).
    # Stage A distils the CLIP path, every row of an image towards CLIP's latent of its canonical caption
    # (CLIP reads 16 tokens: a long description's colour and shape lie past them); stage B is the
    # text-to-image objective with rank-8 LoRA on the U-ViT, at a tenth of the learning rate.
    # The layer: this 4-layer LLM learnt only the world's short sentences, and its contextual states of
    # unseen sentences drew the colour of a held-out long description 13/54 (last layer) and 17/54 (after
    # block 1) times; its input embeddings (hidden_states[0], layer -(llm_layers + 1)) 50/54.
    bridge_width: int = 128
    bridge_depth: int = 2
    bridge_heads: int = 4
    bridge_layer: int = -5
    bridge_max_length: int = 96  # the long descriptions are at most ~70 of the LLM's tokens
    bridge_distill_steps: int = 1500
    bridge_t2i_steps: int = 400
    bridge_batch: int = 32
    bridge_lr: float = 1e-3
    bridge_t2i_lr: float = 1e-4
    bridge_lora_rank: int = 8
    bridge_uncond: float = 0.1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


RECIPES = {
    "full": Recipe(),
    "ci": Recipe(name="ci", train_images=64, clip_steps=4, vae_steps=4, decoder_steps=4, unidiffuser_steps=2,
                 easygen_steps=2, uvit_batch=8, uvit_width=32, uvit_depth=2, feature_steps=2, llm_width=32,
                 llm_layers=1, stage1_steps=2, stage2_steps=400, llm_batch=8, stage2_lr=3e-3, conversations=64,
                 bridge_width=32, bridge_depth=1, bridge_layer=-2, bridge_distill_steps=4, bridge_t2i_steps=4,
                 bridge_batch=8),
}


def default_dir() -> Path:
    """Where the demo model lives unless told otherwise: $EASYGEN_DEMO_DIR, else the user cache."""
    from bidiffuser.user_cache import user_cache_dir
    if os.environ.get("EASYGEN_DEMO_DIR"):
        return Path(os.environ["EASYGEN_DEMO_DIR"])
    return user_cache_dir() / f"demo-shapes-v{VERSION}"


@dataclass(frozen=True)
class DemoModel:
    root: Path

    @property
    def easygen(self) -> Path:
        return self.root / "easygen"

    @property
    def bidiffuser(self) -> Path:
        return self.root / "bidiffuser"

    @property
    def manifest(self) -> Path:
        return self.root / "demo.json"

    def is_built(self) -> bool:
        return self.manifest.is_file()

    def recipe(self) -> Recipe:
        doc = read_json(self.manifest, "demo manifest")
        try:
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError("not a shapes-demo manifest")
            return Recipe(**doc["recipe"])
        except (KeyError, TypeError, ValueError) as e:
            raise EasyGenError(f"{self.manifest}: {e} (made by another version? delete the folder to rebuild)") from None


def recipe_of(model_path: str | Path) -> Recipe | None:
    """The recipe of a demo model, when ``model_path`` is a built demo's ``easygen`` directory."""
    path = Path(model_path).absolute()
    demo = DemoModel(path.parent)
    if path.name != "easygen" or not demo.is_built():
        return None
    try:
        return demo.recipe()
    except EasyGenError:
        return None


# ---------------------------------------------------------------------------------------- stages
def _llm_corpus() -> list[str]:
    """Every text the LLM meets: the world's, the caption instructions of stage 1, the eval prompts,
    and the conversation template's role names."""
    from ..data.readers import CAPTION_PROMPTS
    from .conversations import corpus as conversation_corpus
    from .dataset import EVAL_CAPTION_PROMPTS, VQA_TEMPLATES
    return (world.corpus() + conversation_corpus() + list(CAPTION_PROMPTS)
            + list(EVAL_CAPTION_PROMPTS) + [t.format(question="") for t in VQA_TEMPLATES] + ["USER: ASSISTANT:"])


def _stage_data(root: Path, r: Recipe, log: Log) -> None:
    from .dataset import write_training_data
    write_training_data(root / "data", r.train_images, r.seed, draw_copies=r.draw_copies,
                        n_conversations=r.conversations, conversation_weight=r.conversation_weight,
                        n_drawings=r.drawings, earlier_per_picture=r.earlier_per_picture)
    log(f"  {r.train_images} images, their captions and questions, {r.conversations} conversations in {root / 'data'}")


def _stage_bidiffuser_init(root: Path, r: Recipe, log: Log) -> None:
    from bidiffuser.autoencoder import AutoencoderConfig
    from bidiffuser.caption_decoder import CaptionDecoderConfig
    from bidiffuser.model_dir import init_tiny
    from bidiffuser.uvit import UViTConfig

    out = root / "bidiffuser-init"
    shutil.rmtree(out, ignore_errors=True)
    # 64 px images -> 8x8x4 latents (VAE factor 8) -> 16 patches; 16 text tokens (captions are short).
    init_tiny(out, seed=r.seed, resolution=world.IMAGE_SIZE, corpus=world.corpus(),
              uvit=UViTConfig(img_size=8, patch_size=2, embed_dim=r.uvit_width, depth=r.uvit_depth,
                              num_heads=4 if r.uvit_width % 4 == 0 else 2, num_text_tokens=16, clip_img_dim=32),
              autoencoder=AutoencoderConfig(ch=16, ch_mult=[1, 2, 2, 2], num_res_blocks=1, z_channels=4,
                                            embed_dim=4, norm_num_groups=8),
              caption_decoder=CaptionDecoderConfig(vocab_size=0, n_positions=96, n_embd=64, n_layer=2, n_head=2,
                                                   prefix_length=16, hidden_dim=16))


def _progress(log: Log, every: int) -> Callable[[int, int, float], None]:
    def report(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            log(f"  step {step}/{total} loss {loss:.4f}")
    return report


def _stage_clip(root: Path, r: Recipe, log: Log) -> None:
    from bidiffuser.captions import read_caption_tsv
    from bidiffuser.train_components import train_clip
    rows, _ = read_caption_tsv(root / "data" / "captions.tsv")
    train_clip(root / "bidiffuser-init", [p for p, _ in rows], [c for _, c in rows], steps=r.clip_steps,
               batch_size=min(64, len(rows)), lr=2e-3, seed=r.seed, progress=_progress(log, 250))


def _stage_autoencoder(root: Path, r: Recipe, log: Log) -> None:
    from bidiffuser.train_components import train_autoencoder
    images = sorted(str(p) for p in (root / "data" / "images").glob("*.png"))
    train_autoencoder(root / "bidiffuser-init", images, steps=r.vae_steps, batch_size=min(16, len(images)),
                      lr=2e-3, seed=r.seed, progress=_progress(log, 100))


def _stage_caption_decoder(root: Path, r: Recipe, log: Log) -> None:
    from bidiffuser.train_components import train_caption_decoder
    captions = [c for colour in world.COLOURS for shape in world.SHAPES for c in world.captions(colour, shape)]
    train_caption_decoder(root / "bidiffuser-init", captions, steps=r.decoder_steps, lr=2e-3, seed=r.seed,
                          progress=_progress(log, 100))


def _train_uvit(root: Path, r: Recipe, source: str, out: str, objective: str, steps: int, copy: bool) -> None:
    from bidiffuser.train import TrainConfig, train
    easygen = objective == "easygen"
    train(TrainConfig(model=str(root / source), data=str(root / "data" / "captions.tsv"), out=str(root / out),
                      objective=objective, t2i_weight=r.uvit_t2i_weight if easygen else 0.0,
                      t2i_uncond=r.uvit_t2i_uncond if easygen else 0.0,
                      t2i_data=str(root / "data" / "draw_captions.tsv") if easygen else None,
                      snr_gamma=r.uvit_snr_gamma, steps=steps, batch_size=r.uvit_batch, lr=r.uvit_lr,
                      warmup_ratio=0.02, lr_schedule=r.uvit_lr_schedule, ema_decay=r.uvit_ema_decay,
                      save_every=max(steps // 2, 1), log_every=max(steps // 20, 1), seed=r.seed, device="cpu",
                      copy=copy, encode_once=True))


def _stage_unidiffuser(root: Path, r: Recipe, log: Log) -> None:
    _train_uvit(root, r, "bidiffuser-init", "bidiffuser-joint", "unidiffuser", r.unidiffuser_steps, copy=False)


def _stage_easygen_objective(root: Path, r: Recipe, log: Log) -> None:
    # copy=True: the final BiDiffuser directory holds its own files (no links into the build's stages).
    # Copies from an interrupted earlier attempt are removed first (the run's checkpoints are kept).
    out = root / "bidiffuser"
    for entry in out.iterdir() if out.is_dir() else []:
        if entry.name != "checkpoints":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    _train_uvit(root, r, "bidiffuser-joint", "bidiffuser", "easygen", r.easygen_steps, copy=True)


def _stage_easygen_init(root: Path, r: Recipe, log: Log) -> None:
    from ..tiny import init_tiny_easygen
    out = root / "easygen-init"
    shutil.rmtree(out, ignore_errors=True)
    init_tiny_easygen(out, root / "bidiffuser", seed=r.seed, corpus=_llm_corpus(), hidden_size=r.llm_width,
                      num_hidden_layers=r.llm_layers, intermediate_size=4 * r.llm_width,
                      projector_hidden_size=4 * r.llm_width, max_position_embeddings=r.llm_context)


def _cli(*argv: str) -> None:
    from ..cli import main
    code = main(list(argv))
    if code:
        raise EasyGenError(f"`easygen {argv[0]}` failed (exit {code})")


def _stage_features(root: Path, r: Recipe, log: Log) -> None:
    _cli("features", "--data", str(root / "data" / "instruct_data.json"), "--model", str(root / "bidiffuser"),
         "--out", str(root / "features"), "--steps", str(r.feature_steps), "--scale", str(r.feature_scale),
         "--seed", str(FEATURE_SEED), "--batch-size", "64", "--device", "cpu")


def _train_stage(root: Path, r: Recipe, stage: str, model: Path, data: str, steps: int, lr: float) -> None:
    run = root / f"run-{stage}"
    _cli("train", "--stage", stage, f"model={model}", f"data={root / 'data' / data}",
         f"features={root / 'features'}", f"output_dir={run}", f"max_steps={steps}",
         f"micro_batch_size={r.llm_batch}", f"lr={lr}", "warmup_ratio=0.03", "precision=fp32",
         f"save_every={steps}", "log_every=20", f"seed={r.seed}", f"max_length={r.llm_context // 2}",
         f"feature_steps={r.feature_steps}", f"feature_scale={r.feature_scale}", f"feature_seed={FEATURE_SEED}",
         "group_by_length=true")


def _stage_stage1(root: Path, r: Recipe, log: Log) -> None:
    _train_stage(root, r, "pretrain", root / "easygen-init", "pretrain_data.json", r.stage1_steps, r.stage1_lr)


def _stage_stage2(root: Path, r: Recipe, log: Log) -> None:
    _train_stage(root, r, "instruct", root / "run-pretrain" / "final", "instruct_data.json", r.stage2_steps,
                 r.stage2_lr)
    out = root / "easygen"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(root / "run-instruct" / "final", out, symlinks=True)
    link = out / "bidiffuser"  # export links the BiDiffuser by absolute path; relative lets the cache move
    link.unlink(missing_ok=True)
    link.symlink_to(Path("..") / "bidiffuser", target_is_directory=True)


def _train_bridge(root: Path, r: Recipe, stage: str, steps: int, lr: float, init: Path | None, out: Path) -> None:
    from bidiffuser.train_bridge import BridgeTrainConfig, train_bridge
    train_bridge(BridgeTrainConfig(
        model=str(root / "bidiffuser"), data=str(root / "data" / "bridge_captions.tsv"), out=str(out),
        text_model=str(root / "easygen"), stage=stage, init=None if init is None else str(init),
        width=r.bridge_width, depth=r.bridge_depth, heads=r.bridge_heads, layer=r.bridge_layer,
        max_length=r.bridge_max_length, distill_teacher="first", uvit_lora_rank=r.bridge_lora_rank,
        uncond_prob=r.bridge_uncond, snr_gamma=r.uvit_snr_gamma, steps=steps, batch_size=r.bridge_batch, lr=lr,
        warmup_ratio=0.02, lr_schedule="constant", save_every=max(steps // 2, 1), log_every=max(steps // 20, 1),
        seed=r.seed, device="cpu", encode_once=True))


def _stage_bridge_distill(root: Path, r: Recipe, log: Log) -> None:
    from .dataset import write_bridge_captions
    write_bridge_captions(root / "data", r.seed + 5)
    _train_bridge(root, r, "distill", r.bridge_distill_steps, r.bridge_lr, None, root / "bridge-distill")


def _stage_bridge_t2i(root: Path, r: Recipe, log: Log) -> None:
    _train_bridge(root, r, "t2i", r.bridge_t2i_steps, r.bridge_t2i_lr, root / "bridge-distill", root / "bridge")
    link = root / "easygen" / "bridge"  # where the builder looks; relative, so the folder can move
    link.unlink(missing_ok=True)
    link.symlink_to(Path("..") / "bridge", target_is_directory=True)


STAGES: list[tuple[str, str, Callable[[Path, Recipe, Log], None]]] = [
    ("data", "generate the shapes world", _stage_data),
    ("bidiffuser-init", "random BiDiffuser, tokenizer trained on the world's text", _stage_bidiffuser_init),
    ("clip", "train the CLIP image and text encoders", _stage_clip),
    ("autoencoder", "train the VAE", _stage_autoencoder),
    ("caption-decoder", "train the caption decoder", _stage_caption_decoder),
    ("unidiffuser", "train the U-ViT: UniDiffuser objective", _stage_unidiffuser),
    ("easygen-objective", "fine-tune the U-ViT: EasyGen objective", _stage_easygen_objective),
    ("easygen-init", "tiny LLaMA, tokenizer trained on the world's text", _stage_easygen_init),
    ("features", "BiDiffuser features of the training images", _stage_features),
    ("stage1", "stage 1: projector alignment", _stage_stage1),
    ("stage2", "stage 2: instruction tuning", _stage_stage2),
    ("bridge-distill", "LLM bridge, stage A: distil the CLIP text path", _stage_bridge_distill),
    ("bridge-t2i", "LLM bridge, stage B: text-to-image with LoRA on the U-ViT", _stage_bridge_t2i),
]


def build(root: str | Path | None = None, recipe: Recipe | str = "full", log: Log = print,
          command: str | None = None) -> DemoModel:
    """Build (or finish building) the demo model in ``root``; returns it. A built model is left as it is.
    ``command``: the command line as typed, recorded in ``demo.json`` (see build_record)."""
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    demo = DemoModel(Path(root) if root else default_dir())
    if demo.is_built():
        if demo.recipe() != recipe:
            raise EasyGenError(f"{demo.root} holds a demo built with recipe '{demo.recipe().name}'; delete it, or "
                               f"build elsewhere (--out, or EASYGEN_DEMO_DIR for chat)")
        log(f"demo model already built: {demo.root}")
        return demo
    done_dir = demo.root / "stages"
    done_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(done_dir / ".lock", demo.root):
        return _build(demo, recipe, done_dir, log, command)


@contextlib.contextmanager
def _exclusive(lock_path: Path, root: Path):
    """One build per folder: a second one (say, two first-run chats) fails at once instead of racing."""
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EasyGenError(f"another process is building the demo in {root}; wait for it to finish") from None
        yield


def _build(demo: DemoModel, recipe: Recipe, done_dir: Path, log: Log, command: str | None) -> DemoModel:
    from .build_record import environment

    if demo.is_built():  # finished by the process that held the lock before us
        return demo
    settings = done_dir / "recipe.json"
    if settings.is_file() and read_json(settings, "demo recipe") != recipe.to_json():
        raise EasyGenError(f"{demo.root} holds a partial build with another recipe; delete it, or build elsewhere "
                           f"(--out, or EASYGEN_DEMO_DIR for chat)")
    write_json(settings, recipe.to_json())

    started, timings, earlier = time.time(), {}, []
    here = environment()
    for k, (name, what, run) in enumerate(STAGES, 1):
        marker = done_dir / f"{name}.json"
        if marker.is_file():
            timings[name] = read_json(marker, "stage record")["seconds"]
            earlier.append(name)
            log(f"[{k}/{len(STAGES)}] {name}: done before, skipped")
            continue
        log(f"[{k}/{len(STAGES)}] {name}: {what}")
        t0 = time.time()
        run(demo.root, recipe, log)
        timings[name] = round(time.time() - t0, 1)
        write_json(marker, {"seconds": timings[name], "git_commit": here["git_commit"]})
        log(f"[{k}/{len(STAGES)}] {name}: {timings[name]:.0f} s")
    # What happened, for `easygen demo ship` to copy into the shipped manifest: stages an earlier process
    # ran are named, so a resumed build never passes for one run.
    record = {"command": command, "stages_run_earlier": earlier, "seconds": timings,
              "total_seconds": round(sum(timings.values()), 1),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **here}
    write_json(demo.manifest, {"format": FORMAT, "version": VERSION, "recipe": recipe.to_json(), "build": record, "easygen": "easygen", "bidiffuser": "bidiffuser"})
    log(f"demo model built in {time.time() - started:.0f} s: {demo.easygen}")
    return demo
