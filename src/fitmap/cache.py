"""Where fitmap keeps files between runs: the demo checkpoint, the machine's calibration."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FITMAP_CACHE"


def cache_dir() -> Path:
    """``$FITMAP_CACHE``, else ``$XDG_CACHE_HOME/fitmap``, else ``~/.cache/fitmap``."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fitmap"
    return Path(root)
