"""The analytic cost model: KV bytes, image tokens, activations against the simulation."""

import pytest

from fitmap import pipeline
from fitmap.planning.devices import make_machine
from fitmap.planning.images import image_shape
from fitmap.planning.profile import estimate, kv_bytes_per_token
from fitmap.planning.workload import Workload
from fitmap.simulation.costs import simulated_costs


def _prep(model, workload=Workload(1, 1024, 256)):
    req = pipeline.PlanRequest(model, make_machine("1x80GiB", "1GiB"), workload, estimate="analytic")
    return pipeline.prepare(req)


def test_llama_kv_per_token_from_config():
    prep = _prep("llama-3.1-8b")
    tc = prep.skeleton.config
    assert kv_bytes_per_token(tc, 0, 2) == 2 * 8 * 128 * 2  # K and V, 8 KV heads, head dim 128, bf16
    prof = estimate(prep.skeleton, Workload(2, 1000, 24))
    assert sum(c.kv_bytes for c in prof.costs) == 32 * 2 * 1024 * 2 * 8 * 128 * 2


def test_deepseek_mla_caches_the_compressed_latent():
    tc = _prep("deepseek-v3").skeleton.config
    assert kv_bytes_per_token(tc, 0, 2) == (512 + 64) * 2


@pytest.mark.parametrize(
    "model,size,tokens",
    [
        ("qwen2-vl-7b", (1344, 1344), 2304),  # (1344/28)^2 merged patches
        ("qwen2-vl-7b", (448, 300), 16 * 11),  # resized to multiples of 28
        ("internvl-78b", (1344, 1344), 2560),  # 3x3 tiles + thumbnail, 256 tokens each
        ("internvl-78b", (800, 400), 768),  # 2x1 tiles + thumbnail
        ("llava-1.5-13b", (1344, 1344), 576),  # fixed 336 px, 24x24 patches
    ],
)
def test_image_tokens_follow_the_processor(model, size, tokens):
    cfg = _prep(model).skeleton.config
    assert image_shape(cfg, *size).tokens == tokens


@pytest.mark.parametrize("model", ["llama-3.1-8b", "mixtral-8x7b"])
def test_analytic_activations_track_the_simulation(model):
    """Block activation peaks: the config formulas stay within 40% of the measured ones."""
    w = Workload(1, 2048, 256)
    prep = _prep(model, w)
    analytic = estimate(prep.skeleton, w)
    simulated = simulated_costs(prep, w).profile(prep.skeleton, w)
    block = "model.layers.1"
    a, s = analytic.cost(block), simulated.cost(block)
    assert a.kv_bytes == pytest.approx(s.kv_bytes, rel=0.01)
    assert a.act_bytes == pytest.approx(s.act_bytes, rel=0.40), (a.act_bytes, s.act_bytes)


def test_eager_attention_counts_the_score_matrix():
    """Gemma-2 runs eager attention in transformers: T x T scores per head."""
    prep = _prep("gemma-2-27b")
    short = estimate(prep.skeleton, Workload(1, 1024, 0)).cost("model.layers.0").act_bytes
    long = estimate(prep.skeleton, Workload(1, 4096, 0)).cost("model.layers.0").act_bytes
    assert long > 8 * short  # quadratic, not linear


def test_a_declared_image_token_count_is_used():
    """Gemma 3 pools its 64 x 64 SigLIP patches to mm_tokens_per_image = 256 (the grid would say 4096)."""
    import transformers

    from fitmap.planning.images import image_shape

    cfg = transformers.Gemma3Config(vision_config=dict(image_size=896, patch_size=14))
    assert image_shape(cfg, 896, 896).tokens == 256
    assert image_shape(cfg, 1344, 448).tokens == 256  # resized to the tower's square, whatever it is
    assert image_shape(transformers.LlavaConfig(), 336, 336).tokens == 576


@pytest.mark.parametrize(
    "config,kinds",
    [  # as transformers 4.x configs say which layers attend (transformers 5 says layer_types)
        ({"layers_block_type": ["mamba", "attention"]}, ["linear_attention", "full_attention"]),  # Jamba, Granite
        ({"layers_block_type": ["mamba", "hybrid"]}, ["linear_attention", "hybrid"]),  # Zamba
        ({"hybrid_override_pattern": "M-*E"}, ["linear_attention", "mlp", "full_attention", "moe"]),  # Nemotron-H
        ({"attn_layer_indices": [1]}, ["linear_attention", "full_attention"]),  # Bamba
        ({"attn_layer_period": 2, "attn_layer_offset": 1}, ["linear_attention", "full_attention"]),  # Jamba
        ({"state_size": 16, "num_heads": 8, "head_dim": 64}, ["linear_attention", "linear_attention"]),  # Mamba-2
        ({"num_attention_heads": 8}, ["full_attention", "full_attention"]),
    ],
)
def test_which_layers_attend_and_which_keep_a_state(config, kinds):
    from fitmap.model.configs import ConfigView
    from fitmap.planning.profile import layer_caches, layer_type

    tc = ConfigView(config)
    assert [layer_type(tc, i) for i in range(len(kinds))] == kinds
    caches = {"linear_attention": (False, True), "full_attention": (True, False), "hybrid": (True, True)}
    caches |= {"mlp": (False, False), "moe": (False, False)}
    assert [layer_caches(tc, i) for i in range(len(kinds))] == [caches[k] for k in kinds]


def test_qwen3_5_keeps_a_state_on_its_linear_attention_layers_and_kv_on_the_others():
    """Qwen3.5-27B: 48 Gated DeltaNet layers (conv over q, k, v: (2 x 16 x 128 + 48 x 128) x 4 in bf16;
    state 48 heads x 128 x 128 in fp32) the same at any context, 16 attention layers with 4 KV heads of 256."""
    prep = _prep("qwen3.5-27b")
    state = (2 * 16 * 128 + 48 * 128) * 4 * 2 + 48 * 128 * 128 * 4
    for prompt in (1000, 100_000):
        costs = estimate(prep.skeleton, Workload(2, prompt, 24)).costs
        blocks = [c.kv_bytes for c in costs if ".layers." in c.name]
        assert blocks[0] == blocks[1] == blocks[2] == 2 * state
        assert blocks[3] == 2 * (prompt + 24) * 2 * 4 * 256 * 2


def test_a_state_layer_whose_size_the_config_does_not_give_is_one_line():
    from fitmap.model.configs import ConfigView, MissingConfigValue
    from fitmap.planning.profile import state_bytes

    with pytest.raises(MissingConfigValue, match="layer 0 of the model keeps a linear_attention state") as e:
        state_bytes(ConfigView({"layer_types": ["linear_attention"], "hidden_size": 64}), 0, 2)
    assert "\n" not in str(e.value)
