"""Where fitmap keeps files between runs, and the keyed store of what it measured.

Files: the demo checkpoint, the machine's calibration (``cache_dir()``). The store keeps,
as JSON, a model's simulated costs per workload shape, the reason a simulation failed, and
a model's skeleton, so only the first plan of a model and workload pays for the simulation
and the same request on other machines (``--gpus``, ``--cpu``, ``--disk``) reuses it. Its
keys hash what the values depend on: the model (config, tensors, dtype), the workload, and
the code that measured them (fitmap's measuring modules, torch, transformers). The store
knows nothing of what it keeps: callers turn their values into JSON and back; an entry that
cannot be read is simply measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "FITMAP_CACHE"
FORMAT = 1
# The code that decides what a simulation measures (a change to any of it is a new key):
# folders and modules under the fitmap package.
MEASURING = ("model", "dispatch", "simulation", "planning/profile.py", "cache.py")
_code_hash: str | None = None


def cache_dir() -> Path:
    """``$FITMAP_CACHE``, else ``$XDG_CACHE_HOME/fitmap``, else ``~/.cache/fitmap``."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fitmap"
    return Path(root)


def writable_cache_dir() -> Path:
    """:func:`cache_dir`, made if missing; :class:`BadInput` when it cannot hold files (``$FITMAP_CACHE``
    naming a file, a directory this user cannot write)."""
    where = f"fitmap's cache (${CACHE_ENV})" if os.environ.get(CACHE_ENV) else "fitmap's cache"
    fix = f"point {CACHE_ENV} at a directory you can write to"
    return writable_dir(cache_dir(), where, fix)


def writable_dir(path: Path, what: str, fix: str) -> Path:
    """``path``, made with its parents if missing, when this process can create files in it; else one
    :class:`BadInput` line: ``what`` and ``path``, why not, then ``fix``."""
    from fitmap.errors import BadInput

    shown = shorten(str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BadInput(f"{what} {shown} is not a directory (a file is in the way); {fix}") from None
    except OSError as e:
        raise BadInput(f"cannot make {what} {shown}: {e.strerror or e}; {fix}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write in {what} {shown} (permission denied); {fix}")
    return path


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters for a message (a value is never echoed whole when huge)."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def code_fingerprint() -> str:
    """A hash of fitmap's measuring code, computed once per process."""
    global _code_hash
    if _code_hash is None:
        here = Path(__file__).parent
        h = hashlib.sha256()
        for name in MEASURING:
            path = here / name
            for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
                h.update(f.relative_to(here).as_posix().encode())
                h.update(f.read_bytes())
        _code_hash = h.hexdigest()[:16]
    return _code_hash


def key(inventory: Any, dtype: str, workload: Any = None) -> str:
    """What a model's simulated costs depend on, hashed (without ``workload``: what its skeleton
    depends on). ``inventory`` is a :class:`fitmap.model.inventory.Inventory`; ``workload`` has
    ``to_json()``."""
    import torch
    import transformers

    from fitmap.version import __version__

    ident = {
        "format": FORMAT,
        "fitmap": __version__,
        "code": code_fingerprint(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "source": inventory.source,
        "name": inventory.name,
        "config": inventory.config,
        "dtype": dtype,
        "task": inventory.task,
        "tensors": sorted((t.name, t.dtype, list(t.shape)) for t in inventory.tensors.values()),
        "workload": workload.to_json() if workload is not None else "skeleton",
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_costs(k: str) -> dict | None:
    """The simulated costs saved for ``k``, as the JSON they were saved as, or None."""
    data = _read(k, "costs")
    return data if isinstance(data, dict) else None


def save_costs(k: str, data: dict) -> None:
    _write(k, "costs", data)


def load_failure(k: str) -> str | None:
    """Why simulating ``k`` failed before (the same model code, fitmap, torch and transformers would
    fail the same way: the plan goes analytic at once), or None."""
    data = _read(k, "failures")
    return data.get("error") if isinstance(data, dict) and isinstance(data.get("error"), str) else None


def save_failure(k: str, error: str) -> None:
    _write(k, "failures", {"error": error})


def load_skeleton(k: str) -> dict | None:
    """A skeleton's JSON (units, groups, ties) saved for ``k``, or None."""
    data = _read(k, "skeletons")
    return data if isinstance(data, dict) else None


def save_skeleton(k: str, data: dict) -> None:
    _write(k, "skeletons", data)


def _path(k: str, kind: str) -> Path:
    return cache_dir() / kind / f"{k}.json"


def _read(k: str, kind: str) -> Any:
    try:
        return json.loads(_path(k, kind).read_text())
    except (OSError, ValueError):
        return None


def _write(k: str, kind: str, data: Any) -> None:
    """Write atomically; a cache that cannot be written is not an error (the plan stands)."""
    path = _path(k, kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass
