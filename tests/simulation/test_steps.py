"""The simulator's steps: what the cache holds per layer and device, in every layout it comes in."""

from types import SimpleNamespace

import pytest
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


def test_a_sparse_attention_layers_indexer_keys_grow_with_its_keys_and_are_counted():
    """DeepSeek-V3.2 / Mistral Large 4 keep an indexer cache beside keys and values (transformers'
    ``DynamicIndexedLayer``): a decode step after the grown cache sees them at the same length."""
    cache_utils = pytest.importorskip("transformers.cache_utils")
    if not hasattr(cache_utils, "DynamicIndexedLayer"):
        pytest.skip("this transformers has no indexed cache layer")
    layer = cache_utils.DynamicIndexedLayer()
    layer.update(_t(2, 2, 7, 16), _t(2, 2, 7, 16))
    layer.update_indexer(_t(2, 7, 32))
    grow_cache(SimpleNamespace(layers=[layer]), 100, 7)
    assert layer.keys.shape[-2] == layer.indexer_keys.shape[1] == 100
    kv = 2 * (2 * 2 * 100 * 16) * 2
    assert cache_bytes(SimpleNamespace(layers=[layer])) == {("cpu", 0): kv + 2 * 100 * 32 * 2}


def test_deepseek_v32_plans_from_its_simulation(tmp_path):
    """Its indexer selects keys with a mask as long as the cache: before the indexer cache grew with the
    keys, the decode step failed and the plan fell back to the analytic estimate."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV32Config"):
        pytest.skip("this transformers has no DeepSeek-V3.2")
    import fitmap
    from tests.tiny import config

    ds = config("deepseek_v3").to_dict()
    ds = {k: v for k, v in ds.items() if k not in ("model_type", "architectures", "transformers_version")}
    cfg = transformers.DeepseekV32Config(**ds, index_topk=8, index_head_dim=16, index_n_heads=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    plan = fitmap.plan(str(tmp_path), "2x1GiB", prompt=16, new=8, reserve="0MiB")
    assert plan.estimate == "simulate", plan.estimate
