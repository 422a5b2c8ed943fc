"""Simulated costs (and skeletons) kept between runs: a model's simulation is done once per
workload shape, its skeleton once.

A plan's simulated costs depend on the model (its config and dtype), the workload
(batch, prompt, new tokens, images) and the code that measured them (fitmap, torch,
transformers). The same request on other machines (``--gpus``, ``--cpu``, ``--disk``)
reuses them, so only the first plan of a model and workload pays for the simulation.
Kept as JSON in ``cache_dir()/costs``; an entry that cannot be read is simply measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from fitmap.cache import cache_dir

FORMAT = 1
# The modules whose code decides what a simulation measures: a change to any of them is a new key.
MEASURING = ("simulate.py", "hybrid.py", "profile.py", "hooks.py", "repairs.py", "vision_inputs.py", "compat.py",
             "skeleton.py", "costcache.py", "keys.py", "configs.py", "inventory.py")
_code_hash: str | None = None


def code_fingerprint() -> str:
    global _code_hash
    if _code_hash is None:
        here = Path(__file__).parent
        h = hashlib.sha256()
        for name in MEASURING:
            h.update((here / name).read_bytes())
        _code_hash = h.hexdigest()[:16]
    return _code_hash


def key(inventory, dtype: str, workload=None) -> str:
    """What the simulated costs depend on, hashed (without ``workload``: what the skeleton does)."""
    import torch
    import transformers

    import fitmap

    ident = {
        "format": FORMAT, "fitmap": fitmap.__version__, "code": code_fingerprint(), "torch": torch.__version__,
        "transformers": transformers.__version__, "source": inventory.source, "name": inventory.name,
        "config": inventory.config, "dtype": dtype, "task": inventory.task,
        "tensors": sorted((t.name, t.dtype, list(t.shape)) for t in inventory.tensors.values()),
        "workload": workload.to_json() if workload is not None else "skeleton",
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _path(k: str, kind: str = "costs") -> Path:
    return cache_dir() / kind / f"{k}.json"


def load(k: str):
    """The saved :class:`fitmap.simulate.SimulatedCosts` for ``k``, or None."""
    from fitmap.simulate import SimulatedCosts

    data = _read(k, "costs")
    try:
        return SimulatedCosts.from_json(data) if data is not None else None
    except (ValueError, KeyError, TypeError):
        return None


def save(k: str, costs) -> None:
    _write(k, "costs", costs.to_json())


def load_failure(k: str) -> str | None:
    """Why simulating ``k`` failed before (the same model code, fitmap, torch and transformers would
    fail the same way: the plan goes analytic at once), or None."""
    data = _read(k, "failures")
    return data.get("error") if isinstance(data, dict) and isinstance(data.get("error"), str) else None


def save_failure(k: str, error: str) -> None:
    _write(k, "failures", {"error": error})


def load_skeleton(k: str) -> dict | None:
    """A skeleton's JSON (units, groups, ties) saved for ``k``, or None."""
    return _read(k, "skeletons")


def save_skeleton(k: str, data: dict) -> None:
    _write(k, "skeletons", data)


def _read(k: str, kind: str):
    try:
        return json.loads(_path(k, kind).read_text())
    except (OSError, ValueError):
        return None


def _write(k: str, kind: str, data) -> None:
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
