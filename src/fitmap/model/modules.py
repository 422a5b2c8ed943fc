"""Facts about a torch module tree that every stage asks (no fitmap import, no model code)."""

from __future__ import annotations

from torch import nn


def tied_parameters(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    by_storage: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(id(p), []).append(name)
    return tuple(tuple(names) for names in by_storage.values() if len(names) > 1)


def has_state(module: nn.Module) -> bool:
    """The module or one under it holds a parameter or a buffer."""
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())
