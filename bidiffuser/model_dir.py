"""The BiDiffuser model directory: one small JSON (``bidiffuser.json``) naming each component file
and its config, so users point every command at one folder.

    bidiffuser.json         {"format": "bidiffuser", "version": 1, "resolution": 512, ...}
    uvit_v1.pth             U-ViT (official .pth, EasyGen's uvit_bi.pth, or our .safetensors)
    caption_decoder.pth     GPT-2 prefix decoder, with its tokenizer directory
    autoencoder_kl.pth      SD KL-f8 VAE in LDM key names
    clip_image/, clip_text/ transformers CLIP directories (image: ViT-B/32, text: ViT-L/14)

Component paths are relative to the directory (absolute paths are allowed too). An optional
``sampling_defaults`` says how this model samples best when a command is not told (the shapes demo draws
at 20 steps and guidance 0.2, not UniDiffuser's 50 and 7):

    "sampling_defaults": {"steps": 20, "scale": 0.2, "modes": {"i2t": {"scale": 1.0}}}

``steps`` and ``scale`` for every mode, ``modes`` (optional) overriding them per mode (t2i, i2t, ...).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .autoencoder import AutoencoderConfig, build_autoencoder, official_state_dict as vae_official_state_dict
from .caption_decoder import (CaptionDecoderConfig, build_tiny_tokenizer, init_caption_decoder,
                              official_state_dict as decoder_official_state_dict)
from .checkpoint import atomic_path, fingerprint_file, read_json, save_torch
from .clip import init_tiny_clip
from .clip_convert import convert_openai_clip_checkpoint
from .errors import BiDiffuserError
from .uvit import UViT, UViTConfig

CONFIG_NAME = "bidiffuser.json"
FORMAT_VERSION = 1
DEFAULT_STEPS, DEFAULT_SCALE = 50, 7.0  # UniDiffuser-v1's, for a directory that names none


@dataclass(frozen=True)
class SamplingDefaults:
    """What ``bidiffuser.json``'s ``sampling_defaults`` holds (see the module docstring)."""
    steps: int | None = None
    scale: float | None = None
    modes: dict[str, dict] = field(default_factory=dict)   # mode -> {"steps": .., "scale": ..}

    def for_mode(self, mode: str) -> tuple[int, float]:
        """(steps, scale) for ``mode``: its own, else the directory's, else UniDiffuser's 50 and 7."""
        own = self.modes.get(mode, {})
        steps = own.get("steps", self.steps if self.steps is not None else DEFAULT_STEPS)
        return steps, own.get("scale", self.scale if self.scale is not None else DEFAULT_SCALE)

    def to_json(self) -> dict:
        doc = {k: v for k, v in (("steps", self.steps), ("scale", self.scale)) if v is not None}
        return doc | ({"modes": self.modes} if self.modes else {})

    @classmethod
    def from_json(cls, raw) -> "SamplingDefaults":
        """Checked; a problem raises ValueError naming it."""
        from .modes import MODES

        def values(doc, where: str, allowed: tuple[str, ...]) -> dict:
            if not isinstance(doc, dict):
                raise ValueError(f"{where}expected a JSON object")
            for key in doc:
                if key not in allowed:
                    raise ValueError(f"{where}unknown key {key!r} (known: {', '.join(allowed)})")
            steps, scale = doc.get("steps"), doc.get("scale")
            if steps is not None and (type(steps) is not int or steps < 1):
                raise ValueError(f"{where}steps must be an integer >= 1 (got {steps!r})")
            if scale is not None and (type(scale) not in (int, float) or not 0 <= scale < float("inf")):
                raise ValueError(f"{where}scale must be a number >= 0 (got {scale!r})")
            return {k: v for k, v in (("steps", steps), ("scale", None if scale is None else float(scale)))
                    if v is not None}

        top = values(raw, "", ("steps", "scale", "modes"))
        modes = raw.get("modes", {})
        if not isinstance(modes, dict):
            raise ValueError("modes: expected a JSON object")
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
        return cls(top.get("steps"), top.get("scale"),
                   {m: values(v, f"modes.{m}: ", ("steps", "scale")) for m, v in modes.items()})


@dataclass
class BiDiffuserConfig:
    """What ``bidiffuser.json`` holds. ``root`` is the directory it was read from (not saved)."""
    root: Path
    resolution: int                      # image side in pixels (512 for v1)
    uvit: UViTConfig
    caption_decoder: CaptionDecoderConfig
    autoencoder: AutoencoderConfig
    files: dict[str, str] = field(default_factory=dict)  # component -> path (relative to root)
    data_type: int = 1                   # v1 samples with the "high quality" data-type token
    clip_backend: str = "transformers"
    sampling_defaults: SamplingDefaults | None = None  # how this model samples when not told (optional)

    def path(self, component: str) -> Path:
        p = Path(self.files[component])
        return p if p.is_absolute() else self.root / p

    def fingerprint(self) -> str:
        """sha256 (hex) identifying this checkpoint by content, for cache keys and result files.

        Covers the canonical JSON of the config and ``fingerprint_file`` of every component file
        (a directory: every file inside, by relative path, skipping dot-entries such as download
        caches). The component paths themselves are left out, so a copied, moved or renamed model
        directory keeps its fingerprint; changing any weight file or config value changes it.
        """
        h = hashlib.sha256()
        # sampling defaults are advice on using the weights, not part of them
        config = {k: v for k, v in self.to_json().items() if k not in ("files", "sampling_defaults")}
        h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
        for component in sorted(self.files):
            path = self.path(component)
            if not path.is_dir():
                entries = [("", fingerprint_file(path))]
            else:
                entries = []
                for parent, dirs, names in os.walk(path, followlinks=True):
                    dirs[:] = [d for d in dirs if not d.startswith(".")]  # e.g. .cache/huggingface
                    entries += [(Path(parent, n).relative_to(path).as_posix(), fingerprint_file(Path(parent, n)))
                                for n in names if not n.startswith(".")]
                entries.sort()
            h.update(json.dumps([component, entries]).encode())
        return h.hexdigest()

    @property
    def latent_size(self) -> int:
        return self.resolution // self.autoencoder.downsample_factor

    def to_json(self) -> dict:
        return {
            "format": "bidiffuser", "version": FORMAT_VERSION, "resolution": self.resolution,
            "data_type": self.data_type, "clip_backend": self.clip_backend, "files": self.files,
            "uvit": self.uvit.to_dict(), "caption_decoder": self.caption_decoder.to_dict(),
            "autoencoder": self.autoencoder.to_dict(),
        } | ({"sampling_defaults": self.sampling_defaults.to_json()} if self.sampling_defaults is not None else {})

    def validate(self) -> None:
        """Cross-component consistency; each failure is one line naming both sides."""
        u, c, a = self.uvit, self.caption_decoder, self.autoencoder
        checks = [
            (u.in_chans == a.embed_dim, f"uvit.in_chans={u.in_chans} but autoencoder.embed_dim={a.embed_dim}"),
            (u.text_dim == c.hidden_dim, f"uvit.text_dim={u.text_dim} but caption_decoder.hidden_dim={c.hidden_dim}"),
            (u.num_text_tokens == c.prefix_length,
             f"uvit.num_text_tokens={u.num_text_tokens} but caption_decoder.prefix_length={c.prefix_length}"),
            (self.resolution % a.downsample_factor == 0 and self.latent_size % u.patch_size == 0,
             f"resolution {self.resolution} gives a latent of {self.resolution / a.downsample_factor:g} px, "
             f"not a multiple of the U-ViT patch size {u.patch_size}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise BiDiffuserError(f"inconsistent model config {self.root / CONFIG_NAME}: {msg}")
        for component in ("uvit", "caption_decoder", "tokenizer", "autoencoder", "clip_image", "clip_text"):
            if component not in self.files:
                raise BiDiffuserError(f"{self.root / CONFIG_NAME} names no file for '{component}'")


def read_config(directory: str | os.PathLike) -> BiDiffuserConfig:
    """Read and validate ``DIR/bidiffuser.json``."""
    root = Path(directory)
    cfg_path = root / CONFIG_NAME
    if not root.is_dir():
        raise BiDiffuserError(f"BiDiffuser model directory not found: {root}")
    if not cfg_path.is_file():
        raise BiDiffuserError(f"{root} is not a BiDiffuser model directory (no {CONFIG_NAME}); "
                              f"create one with `bidiffuser init` or `bidiffuser assemble`")
    raw = read_json(cfg_path, "BiDiffuser config")
    try:
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object")
        if raw.get("format") != "bidiffuser":
            raise ValueError("'format' is not 'bidiffuser'")
        if raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported version {raw.get('version')!r} (expected {FORMAT_VERSION})")
        cfg = BiDiffuserConfig(
            root=root, resolution=int(raw["resolution"]), files=dict(raw["files"]),
            uvit=UViTConfig.from_dict(raw["uvit"]),
            caption_decoder=CaptionDecoderConfig.from_dict(raw["caption_decoder"]),
            autoencoder=AutoencoderConfig.from_dict(raw["autoencoder"]),
            data_type=int(raw.get("data_type", 1)), clip_backend=raw.get("clip_backend", "transformers"))
    except (KeyError, TypeError, ValueError) as e:
        raise BiDiffuserError(f"{cfg_path}: bad config: {e}") from None
    if "sampling_defaults" in raw:
        try:
            cfg.sampling_defaults = SamplingDefaults.from_json(raw["sampling_defaults"])
        except ValueError as e:
            raise BiDiffuserError(f"{cfg_path}: bad sampling_defaults: {e}") from None
    cfg.validate()
    return cfg


def write_config(cfg: BiDiffuserConfig) -> Path:
    path = Path(cfg.root) / CONFIG_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    return path


def set_sampling_defaults(directory: str | os.PathLike, steps: int | None = None, scale: float | None = None,
                          modes: dict[str, dict] | None = None) -> BiDiffuserConfig:
    """Record in ``DIR/bidiffuser.json`` how the model samples when not told (all None: the record is removed)."""
    cfg = read_config(directory)
    doc = {k: v for k, v in (("steps", steps), ("scale", scale), ("modes", modes)) if v is not None}
    try:
        cfg.sampling_defaults = SamplingDefaults.from_json(doc) if doc else None
    except ValueError as e:
        raise BiDiffuserError(f"sampling defaults for {cfg.root}: {e}") from None
    write_config(cfg)
    return cfg


def place_component(src: str | os.PathLike, dst: Path, copy: bool = False) -> None:
    """Put a component file or directory at ``dst``: a symlink to ``src`` (or a copy).

    Only what this tool put there before (a symlink) is replaced; a real file or directory at
    ``dst`` is the user's and is never deleted. ``src`` already at ``dst`` is left as it is."""
    src = Path(src).resolve()
    if dst.exists() and dst.resolve() == src:
        return
    if dst.is_symlink():
        dst.unlink()
    elif dst.exists():
        raise BiDiffuserError(f"{dst} already exists and is not a link this tool made; move it away first")
    if copy:
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    else:
        dst.symlink_to(src, target_is_directory=src.is_dir())


OFFICIAL_FILES = {
    "uvit": "uvit_v1.pth", "caption_decoder": "caption_decoder.pth", "tokenizer": "gpt2_tokenizer",
    "autoencoder": "autoencoder_kl.pth", "clip_image": "clip_image", "clip_text": "clip_text",
}


def init_tiny(directory: str | os.PathLike, seed: int = 0, resolution: int = 32, *,
              uvit: UViTConfig | None = None, autoencoder: AutoencoderConfig | None = None,
              caption_decoder: CaptionDecoderConfig | None = None, corpus: list[str] | None = None,
              clip_layers: int = 2, sampling_defaults: SamplingDefaults | None = None) -> BiDiffuserConfig:
    """Write a complete random-initialised small BiDiffuser directory in the official file formats.

    Without component configs it is the test size. Given configs set the sizes; the fields that
    must agree across components are derived here: the tokenizer is trained on ``corpus`` and sets
    the vocabulary, CLIP text is as wide as the caption decoder and reads ``uvit.num_text_tokens``
    tokens, and the U-ViT takes its latent size, channels and input widths from the others.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():  # reproducible weights without touching the caller's RNG
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer(root / OFFICIAL_FILES["tokenizer"], corpus)
        vae_cfg = autoencoder or AutoencoderConfig.tiny()
        uvit_cfg = uvit or UViTConfig.tiny()
        dec_cfg = caption_decoder or CaptionDecoderConfig.tiny()
        dec_cfg = CaptionDecoderConfig.from_dict({**dec_cfg.to_dict(), "vocab_size": len(tokenizer),
                                                  "prefix_length": uvit_cfg.num_text_tokens})
        clip_image_dim, _ = init_tiny_clip(root / OFFICIAL_FILES["clip_image"], root / OFFICIAL_FILES["clip_text"],
                                           tokenizer, seed, image_size=min(resolution, 224), width=dec_cfg.n_embd,
                                           layers=clip_layers, projection_dim=uvit_cfg.clip_img_dim,
                                           max_length=uvit_cfg.num_text_tokens)
        uvit_cfg = UViTConfig.from_dict({**uvit_cfg.to_dict(), "img_size": resolution // vae_cfg.downsample_factor,
                                         "clip_img_dim": clip_image_dim, "in_chans": vae_cfg.embed_dim,
                                         "text_dim": dec_cfg.hidden_dim})
        save_torch(UViT(uvit_cfg).state_dict(), root / OFFICIAL_FILES["uvit"])
        decoder = init_caption_decoder(dec_cfg, tokenizer, seed)
        save_torch(decoder_official_state_dict(decoder), root / OFFICIAL_FILES["caption_decoder"])
        save_torch(vae_official_state_dict(build_autoencoder(vae_cfg), vae_cfg), root / OFFICIAL_FILES["autoencoder"])
    cfg = BiDiffuserConfig(root=root, resolution=resolution, uvit=uvit_cfg, caption_decoder=dec_cfg,
                           autoencoder=vae_cfg, files=dict(OFFICIAL_FILES), sampling_defaults=sampling_defaults)
    cfg.validate()
    write_config(cfg)
    return cfg


def assemble(directory: str | os.PathLike, *, uvit: str, caption_decoder: str, autoencoder: str,
             clip_image: str, clip_text: str, gpt2_tokenizer: str, copy: bool = False) -> BiDiffuserConfig:
    """Build a v1 directory from the official downloads.

    ``.pth`` files are symlinked (or copied with ``copy=True``); an OpenAI CLIP checkpoint file for
    the image encoder is converted to a transformers directory; HF directories are linked as they are.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    sources = {"uvit": uvit, "caption_decoder": caption_decoder, "autoencoder": autoencoder,
               "clip_image": clip_image, "clip_text": clip_text, "tokenizer": gpt2_tokenizer}
    for name, src in sources.items():
        if not Path(src).exists():
            raise BiDiffuserError(f"--{name.replace('_', '-')}: not found: {src}")
    files = {}
    for name, src in sources.items():
        src = Path(src).resolve()
        if name in ("clip_image", "clip_text") and src.is_file():
            dst = root / OFFICIAL_FILES[name]
            convert_openai_clip_checkpoint(src, dst, part="visual" if name == "clip_image" else "text")
        else:
            dst = root / (src.name if src.is_file() else OFFICIAL_FILES[name])
            place_component(src, dst, copy)
        files[name] = dst.name
    cfg = BiDiffuserConfig(root=root, resolution=512, uvit=UViTConfig.v1(),
                           caption_decoder=CaptionDecoderConfig.official(), autoencoder=AutoencoderConfig.sd(),
                           files=files)
    cfg.validate()
    write_config(cfg)
    return cfg
