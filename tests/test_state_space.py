"""State-space and hybrid models (Mamba, Falcon-Mamba, Mamba-2, Jamba, Zamba2, Granite-MoE-Hybrid,
Qwen3-Next), each a tiny random-weight model of the real transformers class: planned from the
simulation, checked clean on two fake GPUs with each layer's cache (KV or conv + recurrent state) on
its own device, a cpu + disk split generating from_pretrained's greedy tokens, and the state a layer
keeps, from its config, equal to what transformers' cache holds for it (the same at any length)."""

from __future__ import annotations

import pytest
import torch
import transformers

import fitmap
from fitmap import pipeline
from fitmap.planning.devices import make_machine
from fitmap.planning.profile import (
    estimate,
    kv_bytes_per_token,
    layer_caches,
    state_bytes,
    text_config,
)
from fitmap.planning.workload import Workload
from fitmap.runtime import loader
from fitmap.simulation.check import check
from fitmap.simulation.costs import simulated_costs
from fitmap.simulation.steps import cache_bytes
from tests.runtime.test_loader import plan_for

TOKENS = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ATTENTION = dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def config(family: str) -> transformers.PretrainedConfig:
    if family in ("mamba", "falcon_mamba"):
        cls = transformers.MambaConfig if family == "mamba" else transformers.FalconMambaConfig
        return cls(hidden_size=64, num_hidden_layers=4, state_size=8, expand=2, conv_kernel=4, **TOKENS)
    if family == "mamba2":  # the conv also carries B and C of each group; per-head states
        return transformers.Mamba2Config(
            hidden_size=64, num_hidden_layers=4, state_size=16, expand=2, conv_kernel=4, n_groups=2, num_heads=8,
            head_dim=16, chunk_size=8, **TOKENS,
        )  # fmt: skip
    if family == "jamba":  # Mamba and attention layers alternate, MoE on every other layer
        return transformers.JambaConfig(
            hidden_size=64, num_hidden_layers=4, **ATTENTION, attn_layer_period=2, attn_layer_offset=1,
            expert_layer_period=2, expert_layer_offset=1, num_experts=2, num_experts_per_tok=1, mamba_d_state=8,
            mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, **TOKENS,
        )  # fmt: skip
    if family == "zamba2":  # Mamba-2 layers; "hybrid" layers add one shared attention block (tied weights)
        return transformers.Zamba2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, n_mamba_heads=4,
            mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=1, chunk_size=8,
            layers_block_type=["mamba", "mamba", "hybrid", "mamba", "mamba", "hybrid"], **TOKENS,
        )  # fmt: skip
    if family == "granitemoehybrid":
        return transformers.GraniteMoeHybridConfig(
            hidden_size=64, num_hidden_layers=4, **ATTENTION, num_local_experts=2, num_experts_per_tok=1,
            shared_intermediate_size=64, layer_types=["linear_attention", "full_attention"] * 2, mamba_n_heads=4,
            mamba_n_groups=1, mamba_d_state=8, mamba_d_head=32, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
            **TOKENS,
        )  # fmt: skip
    if family == "qwen3_next":  # Gated DeltaNet linear attention, one full-attention layer in four
        return transformers.Qwen3NextConfig(
            hidden_size=64, num_hidden_layers=4, **ATTENTION, head_dim=16, linear_conv_kernel_dim=4,
            linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            layer_types=["linear_attention"] * 3 + ["full_attention"], **TOKENS,
        )  # fmt: skip
    if family == "zamba":  # Mamba layers; every third adds one shared attention block (tied weights)
        return transformers.ZambaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
            attention_hidden_size=128, attention_head_dim=32, attn_layer_period=3, attn_layer_offset=2,
            n_mamba_heads=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, **TOKENS,
        )  # fmt: skip
    if family == "nemotron_h":  # one mixer per layer: Mamba-2, MLP, attention, MoE
        return transformers.NemotronHConfig(
            hidden_size=64, num_hidden_layers=4, layer_types=["linear_attention", "mlp", "full_attention", "moe"],
            **ATTENTION, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=8, n_groups=2,
            conv_kernel=4, expand=2, chunk_size=8, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1, **TOKENS,
        )  # fmt: skip
    if family == "falcon_h1":  # attention and Mamba-2 side by side in every layer
        return transformers.FalconH1Config(
            hidden_size=64, num_hidden_layers=2, **ATTENTION, head_dim=16, mamba_d_ssm=128, mamba_n_heads=8,
            mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
            **TOKENS,
        )  # fmt: skip
    if family == "bamba":  # attention layers by index
        return transformers.BambaConfig(
            hidden_size=64, num_hidden_layers=2, **ATTENTION, attn_layer_indices=[1], mamba_n_heads=4,
            mamba_d_head=32, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
            **TOKENS,
        )  # fmt: skip
    if family == "lfm2":  # short convolutions: a conv state, no recurrent one
        return transformers.Lfm2Config(
            hidden_size=64, num_hidden_layers=2, **ATTENTION, full_attn_idxs=[1], conv_L_cache=3, **TOKENS
        )
    if family == "kimi_linear":  # Kimi delta attention: one head count and dim for q, k and v; MLA layers
        return transformers.KimiLinearConfig(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=16,
            qk_nope_head_dim=8, mlp_layer_types=["dense", "sparse", "sparse"],
            layer_types=["linear_attention", "linear_attention", "full_attention"], linear_head_dim=16,
            linear_num_heads=4, **TOKENS,
        )  # fmt: skip
    if family in ("deepseek_v32", "glm_moe_dsa"):  # sparse attention: an indexer's keys cached beside MLA's
        from bench.zoo import tiny_config

        return tiny_config(family)
    raise ValueError(family)


FAMILIES = ["mamba", "falcon_mamba", "mamba2", "jamba", "zamba2", "granitemoehybrid", "qwen3_next"]
# checked against transformers' cache only
LAYOUTS = ["zamba", "nemotron_h", "falcon_h1", "bamba", "lfm2", "kimi_linear", "deepseek_v32", "glm_moe_dsa"]
STATE_EVERYWHERE = {"mamba", "falcon_mamba", "mamba2", "zamba", "zamba2", "falcon_h1"}
NO_KV = {"mamba", "falcon_mamba", "mamba2"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("state-space")
    made: dict[str, object] = {}

    def get(family: str):
        if family not in made:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config(family)).eval()
            model.save_pretrained(root / family, max_shard_size="200KB")
            made[family] = root / family
        return made[family]

    return get


def _prep(d, workload=Workload(1, 16, 4)):
    return pipeline.prepare(pipeline.PlanRequest(str(d), make_machine("1x1GiB", "1GiB"), workload))


@pytest.mark.parametrize("family", FAMILIES)
def test_planned_from_the_simulation_and_checked_clean_with_each_cache_on_its_layers_gpu(tiny, family):
    d = tiny(family)
    plan = fitmap.plan(str(d), gpus="2x1GiB", prompt=16, new=4)
    assert plan.fits and plan.estimate == "simulate", plan.estimate
    blocks = [u for u, dev in plan.device_map.items() if ".layers." in u]
    assert {plan.device_map[u] for u in blocks} == {0, 1}
    report = check(*_checked(d), plan)
    assert report.clean and not report.mismatches
    simulated = {p.device: p.kv_bytes for p in report.devices}
    for ledger in plan.devices:
        if ledger.device in ("0", "1"):  # the states and KV of its own layers, as planned
            assert simulated[ledger.device] == ledger.kv_bytes > 0, ledger.device


def _checked(d):
    prep = _prep(d)
    return prep.skeleton.config, prep.inventory.task, prep.skeleton


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_and_disk_split_generates_from_pretraineds_tokens(tiny, family):
    d = tiny(family)
    ids = torch.tensor([[1, 17, 33, 41, 99, 250, 7, 300, 5, 9, 11, 13]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    expected = transformers.AutoModelForCausalLM.from_pretrained(d).eval().generate(**inputs)
    layers = [u for u in plan_for(d).device_map if ".layers." in u]  # a state layer, and Jamba's attention
    with loader.load(d, plan_for(d, {layers[0]: "disk", layers[1]: "disk"}), progress=False) as lm:
        got = lm.model.generate(**inputs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", FAMILIES + LAYOUTS)
def test_a_layers_state_from_its_config_is_what_transformers_cache_holds(family):
    """bfloat16, batch 2: the conv state (model dtype) and recurrent state (float32) per state layer,
    keys and values per attention layer, the states the same at 5 and at 9 tokens."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(family), dtype=torch.bfloat16).eval()
    tc = text_config(model.config)
    measured = {}
    for length in (5, 9):
        with torch.no_grad():
            out = model(input_ids=torch.ones(2, length, dtype=torch.long), use_cache=True)
        measured[length] = cache_bytes(out.past_key_values)
    layers = tc.num_hidden_layers
    kinds = [layer_caches(tc, i) for i in range(layers)]
    assert all(state for _, state in kinds) == (family in STATE_EVERYWHERE)
    assert any(kv for kv, _ in kinds) == (family not in NO_KV)
    for length, got in measured.items():
        for i in range(layers):
            want = 2 * (state_bytes(tc, i, 2) + length * kv_bytes_per_token(tc, i, 2))
            assert got.get(("cpu", i), 0) == want, (length, i)
    for i, (kv, state) in enumerate(kinds):
        if state and not kv:
            assert state_bytes(tc, i, 2) > 0 and measured[5][("cpu", i)] == measured[9][("cpu", i)]


@pytest.mark.parametrize("family", ["mamba", "jamba", "zamba2", "qwen3_next"])
def test_the_analytic_cache_is_the_simulated_one(tiny, family):
    """Per block: the config's state and KV equal what the simulation measured and split into a part
    that grows per token and one that does not; a longer context adds KV on attention layers only."""
    prep = _prep(tiny(family), Workload(2, 16, 4))
    costs = simulated_costs(prep, Workload(2, 16, 4))
    for w in (Workload(2, 16, 4), Workload(2, 64, 32)):
        analytic, simulated = estimate(prep.skeleton, w), costs.profile(prep.skeleton, w)
        for u in prep.skeleton.units:
            assert analytic.cost(u.name).kv_bytes == simulated.cost(u.name).kv_bytes, (u.name, w)
    tc = text_config(prep.skeleton.config)
    for u in prep.skeleton.units:
        if u.layer is not None:
            per_token, state = costs.cache_split(prep.skeleton, u)
            assert state == state_bytes(tc, u.layer, 4) and per_token == kv_bytes_per_token(tc, u.layer, 4)


def test_a_mamba_config_without_attention_heads_is_sized_analytically(tiny):
    """The analytic estimate (the planner's fallback) of a pure Mamba model: no attention heads to ask."""
    plan = fitmap.plan(str(tiny("mamba")), gpus="2x1GiB", prompt=16, new=4, estimate="analytic")
    assert plan.fits and plan.estimate == "analytic"
    # four layers, batch 1, float32: conv 128 x 4 + state 128 x 8, float32
    assert sum(d.kv_bytes for d in plan.devices) == 4 * (128 * 4 * 4 + 128 * 8 * 4)
