"""The user's cache folder for everything kcd_fast caches (teachers, the NVRTC fallback's PTX)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$KCD_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/kcd_fast`` (an absolute path, as the XDG
    spec asks), else ``~/.cache/kcd_fast``; never the current folder."""
    if os.environ.get("KCD_FAST_CACHE_DIR"):
        return Path(os.environ["KCD_FAST_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "kcd_fast"
