"""Signed training checkpoints. Resume and export unpickle what a checkpoint holds (DCP's ``.metadata``,
DeepSpeed's ``.pt`` files), so they read only checkpoints written with this installation's key.

The signature (``SIGNATURE_FILE`` beside the checkpoint's files) is an HMAC-SHA256 over the sorted
(relative path, SHA-256 of the file) of every other file in the directory, keyed by a local secret:
the file named by $EASYGEN_CHECKPOINT_KEY_FILE (multi-node runs point every node at one), else
``checkpoint.key`` in EasyGen's user cache folder; made on first use, 32 random bytes, mode 0600.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from pathlib import Path

from .checkpoint import atomic_path
from .errors import BiDiffuserError
from .user_cache import user_cache_dir

SIGNATURE_FILE = "easygen-signature.json"  # no DCP (.metadata, *.distcp) or DeepSpeed (*.pt) name
KEY_ENV = "EASYGEN_CHECKPOINT_KEY_FILE"
_FORMAT = "hmac-sha256 over sorted [relative path, sha256]"


def key_file() -> Path:
    """$EASYGEN_CHECKPOINT_KEY_FILE, else $XDG_CACHE_HOME/easygen/checkpoint.key (~/.cache without it)."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    return user_cache_dir() / "checkpoint.key"


def _key() -> bytes:
    path = key_file()
    try:
        if not path.exists():
            _create_key(path)
        key = path.read_bytes()
    except OSError as e:
        raise BiDiffuserError(f"cannot use the checkpoint key {path}: {e.strerror or e}") from None
    if len(key) < 16:
        raise BiDiffuserError(f"checkpoint key {path} holds {len(key)} bytes; a key needs at least 16")
    return key


def _create_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-key.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        with contextlib.suppress(FileExistsError):  # another process made one first: use that
            os.link(tmp, path)  # appears whole, never replaces an existing key
    finally:
        os.unlink(tmp)


def _hashes(directory: Path) -> dict[str, str]:
    found = {}
    for p in directory.rglob("*"):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != SIGNATURE_FILE:
            with p.open("rb") as f:
                found[rel] = hashlib.file_digest(f, "sha256").hexdigest()
    return found


def _mac(files: dict[str, str], key: bytes) -> str:
    entries = sorted([name, digest] for name, digest in files.items())
    return hmac.new(key, json.dumps(entries, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


def sign_checkpoint(directory: str | Path, pending: dict[str, bytes] | None = None) -> None:
    """Sign every file in ``directory``; ``pending`` (name -> content) are files written right after,
    signed as if present: the file that marks a checkpoint complete comes last, after its signature."""
    directory = Path(directory)
    files = _hashes(directory)
    files.update({name: hashlib.sha256(data).hexdigest() for name, data in (pending or {}).items()})
    record = {"format": _FORMAT, "files": dict(sorted(files.items())), "hmac": _mac(files, _key())}
    with atomic_path(directory / SIGNATURE_FILE) as p:
        p.write_bytes(json.dumps(record, indent=1).encode())


def _problem(directory: Path) -> str | None:
    try:
        record = json.loads((directory / SIGNATURE_FILE).read_bytes())
        signed, mac = dict(record["files"]), record["hmac"]
    except FileNotFoundError:
        return f"not signed (no {SIGNATURE_FILE})"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable signature {SIGNATURE_FILE}"
    if not isinstance(mac, str) or not hmac.compare_digest(_mac(signed, _key()), mac):
        return f"not signed by this installation's checkpoint key ({key_file()})"
    present = _hashes(directory)
    diffs = [(what, sorted(names)) for what, names in (
        ("changed", [n for n in signed.keys() & present.keys() if signed[n] != present[n]]),
        ("added", present.keys() - signed.keys()), ("missing", signed.keys() - present.keys())) if names]
    return "; ".join(f"{what}: {', '.join(names)}" for what, names in diffs) or None


def verify_checkpoint(directory: str | Path) -> None:
    """Raise (one line) unless ``directory``'s files are exactly the ones signed with this installation's key."""
    directory = Path(directory)
    problem = _problem(directory)
    if problem:
        raise BiDiffuserError(f"refusing checkpoint {directory}: {problem}. Resume and export only read checkpoints "
                              f"written with this installation's key (set {KEY_ENV} to share one key file "
                              f"across machines)")
