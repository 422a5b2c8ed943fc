"""Rows of transformers' ``DynamicCache`` moved between batches, layer by layer where each layer lives:
one cache stacked under another (both left-padded to a common width), rows kept, leading columns cut.
Layers a process does not run (another rank's stage) are left as they are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``t`` left-padded with zeros along ``dim`` to ``width``."""
    short = width - t.shape[dim]
    if short <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _held(layer: Any) -> bool:
    return getattr(layer, "keys", None) is not None and getattr(layer, "values", None) is not None


def stack(mine: Any, theirs: Any, width: int) -> None:
    """``theirs``'s rows under ``mine``'s, every layer left-padded to ``width`` tokens (in place)."""
    for a, b in zip(mine.layers, theirs.layers):
        if _held(a) and _held(b):
            a.keys = torch.cat([pad(a.keys, width), pad(b.keys, width)])
            a.values = torch.cat([pad(a.values, width), pad(b.values, width)])


def select(cache: Any, rows: Sequence[int], first: int) -> None:
    """Only ``rows`` kept, and the columns from ``first`` on (in place)."""
    for layer in cache.layers:
        if _held(layer):
            index = torch.tensor(list(rows), device=layer.keys.device)
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]


_KEYS = iter(range(1, 1 << 62))


def key(cache: Any) -> int:
    """A number naming ``cache`` for other processes (given on first use, kept on the object)."""
    if getattr(cache, "_fitmap_key", None) is None:
        cache._fitmap_key = next(_KEYS)
    return cache._fitmap_key
