"""DynamicCache rows moved between batches (runtime/kv.py): stacked with left padding, selected with
leading columns cut; layers this process does not hold (another rank's stage) left alone."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from fitmap.runtime import kv
from tests import tiny


def _cache(rows: int, length: int, fill: float, layers=(0, 1)) -> DynamicCache:
    cache = DynamicCache(config=tiny.config("llama"))
    for i in layers:  # the layers this process runs; the others stay empty
        k = torch.full((rows, 2, length, 16), fill)
        cache.update(k, k + 100, i)
    return cache


def test_stack_pads_on_the_left_and_select_cuts_what_no_row_needs():
    batch, newcomer = _cache(2, 3, 1.0), _cache(1, 5, 2.0)
    kv.stack(batch, newcomer, 5)
    keys = batch.layers[0].keys
    assert keys.shape == (3, 2, 5, 16)
    assert torch.equal(keys[:2, :, :2], torch.zeros(2, 2, 2, 16)) and torch.equal(keys[2], torch.full((2, 5, 16), 2.0))
    assert torch.equal(batch.layers[1].values[0, :, 2:], torch.full((2, 3, 16), 101.0))
    kv.select(batch, [2], 1)
    assert batch.layers[0].keys.shape == (1, 2, 4, 16) and batch.layers[1].values.shape == (1, 2, 4, 16)


def test_layers_another_rank_holds_are_left_alone():
    batch, newcomer = _cache(1, 3, 1.0, layers=(0,)), _cache(1, 4, 2.0, layers=(0,))
    kv.stack(batch, newcomer, 4)
    kv.select(batch, [1], 0)
    assert batch.layers[0].keys.shape == (1, 2, 4, 16)
    assert all(not layer.is_initialized for layer in batch.layers[1:])


def test_a_cache_keeps_its_number():
    a, b = DynamicCache(), DynamicCache()
    assert kv.key(a) == kv.key(a) != kv.key(b)
