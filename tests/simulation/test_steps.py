"""The simulator's steps: what the cache holds per layer and device, in every layout it comes in."""

from types import SimpleNamespace

import torch

from fitmap.simulation.steps import cache_bytes, grow_cache


def _t(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype)


def test_transformers_5_state_layers_count_their_conv_and_recurrent_states_and_do_not_grow():
    mamba = SimpleNamespace(conv_states={0: _t(2, 128, 4)}, recurrent_states={0: _t(2, 128, 8, dtype=torch.float32)})
    attention = SimpleNamespace(keys=_t(2, 2, 7, 16), values=_t(2, 2, 7, 16))
    hybrid = SimpleNamespace(
        keys=_t(2, 2, 7, 16), values=_t(2, 2, 7, 16), conv_states={0: _t(2, 128, 4)}, recurrent_states={0: None}
    )
    cache = SimpleNamespace(layers=[mamba, attention, hybrid])
    state, conv = 2 * 128 * 4 * 2 + 2 * 128 * 8 * 4, 2 * 128 * 4 * 2

    def kv(tokens: int) -> int:  # keys and values: batch 2, 2 heads of 16, bfloat16
        return 2 * (2 * 2 * tokens * 16) * 2

    assert cache_bytes(cache) == {("cpu", 0): state, ("cpu", 1): kv(7), ("cpu", 2): kv(7) + conv}
    grow_cache(cache, 100, 7)
    assert cache_bytes(cache) == {("cpu", 0): state, ("cpu", 1): kv(100), ("cpu", 2): kv(100) + conv}


def test_transformers_4_mamba_and_hybrid_caches_count_their_states_by_layer():
    mamba = SimpleNamespace(
        conv_states={0: _t(2, 128, 4), 1: _t(2, 128, 4)}, ssm_states={0: _t(2, 128, 8), 1: _t(2, 128, 8)}
    )
    assert cache_bytes(mamba) == {("cpu", 0): 6144, ("cpu", 1): 6144}
    jamba = SimpleNamespace(  # HybridMambaAttentionDynamicCache: empty keys on Mamba layers, empty states elsewhere
        key_cache=[_t(2, 0), _t(2, 2, 7, 16)],
        value_cache=[_t(2, 0), _t(2, 2, 7, 16)],
        conv_states=[_t(2, 128, 4), _t(2, 0)],
        ssm_states=[_t(2, 128, 8), _t(2, 0)],
    )
    grow_cache(jamba, 100, 7)
    assert cache_bytes(jamba) == {("cpu", 0): 6144, ("cpu", 1): 2 * (2 * 2 * 100 * 16) * 2}
