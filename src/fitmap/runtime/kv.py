"""Rows of transformers' ``DynamicCache`` moved between batches, layer by layer where each layer lives:
one cache stacked under another (both left-padded to a common width), rows kept, leading columns cut.
Layers a process does not run (another rank's stage) are left as they are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# the keyword under which a block takes its KV cache (transformers 5, 4.x, remote code)
NAMES = ("past_key_values", "cache", "past_key_value", "layer_past", "kv_cache")
PER_LAYER = ("kv_cache", "layer_past")  # names under which a block takes its own layer's (key, value)


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


def stage_cache(config: Any) -> Any:
    """A pipeline stage's cache for its own layers (:mod:`fitmap.runtime.distributed`)."""
    try:
        from transformers import DynamicCache
    except ImportError:
        return None
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers 4.x: its layers a list from 0; this rank's start further on
        return _from_layer(DynamicCache)()
    except (AttributeError, ValueError):  # a remote-code config naming its text model otherwise: layers
        return DynamicCache()  # made as they come (InternVL2's llm_config)


def _from_layer(base: type) -> type:
    class Stage(base):
        def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *rest: Any) -> Any:
            while len(self.key_cache) < layer_idx:  # the layers of the ranks before: never filled here
                self.key_cache.append(key.new_empty(0))
                self.value_cache.append(value.new_empty(0))
            return super().update(key, value, layer_idx, *rest)

    return Stage


# what a stage sends back for its cache: transformers 4.x blocks return the cache they updated in place,
# and the model carries it on to the next step (rank 0 puts its own cache object back)
_CACHE = "fitmap:cache"


def stage_cache_out(out: Any, cache: Any) -> Any:
    return tuple(_CACHE if x is cache and cache is not None else x for x in out) if isinstance(out, tuple) else out


def stage_cache_in(out: Any, kwargs: dict) -> Any:
    if not isinstance(out, tuple) or _CACHE not in [x for x in out if isinstance(x, str)]:
        return out
    mine = next((v for k, v in kwargs.items() if k in NAMES and v is not None and not isinstance(v, str)), None)
    if mine is None:  # a layer's own (key, value): the stage keeps it; the model carries the marker on
        return out
    return tuple(mine if isinstance(x, str) and x == _CACHE else x for x in out)


def keep_present(out: Any, kept: dict, name: str) -> Any:
    """A block keeping its layer's (key, value) as 4.x remote code does (ChatGLM's ``(output, kv_cache)``):
    the stage keeps it under ``name`` and sends the marker in its place."""
    if not isinstance(out, tuple):
        return out
    at = max((i for i, x in enumerate(out) if i and isinstance(x, (torch.Tensor, tuple))), default=None)
    if at is None:
        return out
    kept[name] = out[at]
    return out[:at] + (_CACHE,) + out[at + 1 :]
