"""Where EasyGen keeps what it makes for this user (feature cache, checkpoint key, demo evals)."""
import os
from pathlib import Path


def user_cache_dir() -> Path:
    """EasyGen's folder in the user's cache: $XDG_CACHE_HOME/easygen, else ~/.cache/easygen."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "easygen"
