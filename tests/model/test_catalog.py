"""The built-in catalog: every entry builds offline at full size with its public parameter count."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from fitmap.errors import BadInput
from fitmap.model.catalog_models import (
    build_config,
    catalog_entry,
    catalog_names,
    is_catalog_name,
)

_MODEL_CLASS = {
    "causal-lm": AutoModelForCausalLM,
    "image-text-to-text": AutoModelForImageTextToText,
}
_WEIGHT_DTYPES = {"bfloat16", "float16", "float32", "float8_e4m3fn"}


def _meta_model(name: str) -> torch.nn.Module:
    entry = catalog_entry(name)
    with torch.device("meta"):
        return _MODEL_CLASS[entry.task].from_config(build_config(entry))


def test_catalog_lists_the_expected_models() -> None:
    assert set(catalog_names()) == {
        "llama-3.1-8b",
        "llama-3.1-70b",
        "llama-3.1-405b",
        "mixtral-8x7b",
        "qwen2.5-72b",
        "gemma-2-27b",
        "deepseek-v3",
        "qwen2-vl-7b",
        "qwen2-vl-72b",
        "internvl-78b",
        "llava-1.5-13b",
        "glm-4-9b",
        "gpt-oss-120b",
        "llama-3.1-70b-awq",
        "qwen3-235b-a22b",
        "gemma-3-27b",
        "qwen2.5-vl-72b",
        "qwen3-vl-235b-a22b",
        "mistral-small-3.1-24b",
        "glm-4.1v-9b",
        "deepseek-v3.1",
        "llama-4-scout",
        "qwen3.5-27b",
        "qwen3.5-397b-a17b",
        "gemma-4-31b",
        "glm-4.6v",
    }


@pytest.mark.parametrize("name", catalog_names())
def test_entry_is_well_formed(name: str) -> None:
    entry = catalog_entry(name)
    assert is_catalog_name(name)
    assert entry.name == name and "/" in entry.hf_id
    assert entry.task in _MODEL_CLASS
    assert entry.weight_dtype in _WEIGHT_DTYPES
    assert entry.fp8_linear == (entry.weight_dtype == "float8_e4m3fn")
    assert {"model_type", "architectures"} <= entry.config.keys()
    assert "auto_map" not in entry.config
    # a quantization_config only where it fixes the released layout sizing needs (gpt-oss: MXFP4 experts)
    assert entry.config.get("quantization_config", {"quant_method": "mxfp4"})["quant_method"] in ("mxfp4", "awq")


@pytest.mark.parametrize("name", catalog_names())
def test_meta_model_matches_public_parameter_count(name: str) -> None:
    entry = catalog_entry(name)
    model = _meta_model(name)
    assert all(p.is_meta for p in model.parameters())
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(entry.params_billion, rel=0.02)


def test_config_is_a_fresh_copy_and_build_does_not_change_it() -> None:
    entry = catalog_entry("deepseek-v3")
    before = catalog_entry("deepseek-v3").config
    build_config(entry)
    entry.config["hidden_size"] = 1
    assert catalog_entry("deepseek-v3").config == before


def test_deepseek_v3_keeps_mla_and_moe_fields() -> None:
    entry = catalog_entry("deepseek-v3")
    cfg = build_config(entry)
    assert cfg.model_type == "deepseek_v3"
    assert (cfg.kv_lora_rank, cfg.q_lora_rank) == (512, 1536)
    assert (cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim) == (64, 128, 128)
    assert (cfg.n_routed_experts, cfg.first_k_dense_replace) == (256, 3)
    assert (cfg.num_hidden_layers, cfg.moe_intermediate_size) == (61, 2048)
    assert entry.fp8_linear and entry.weight_dtype == "float8_e4m3fn"


def test_gemma_2_ties_embeddings_and_slides() -> None:
    cfg = build_config(catalog_entry("gemma-2-27b"))
    assert cfg.tie_word_embeddings
    assert (cfg.sliding_window, cfg.head_dim, cfg.query_pre_attn_scalar) == (4096, 128, 144)


def test_llama_3_1_keeps_llama3_rope_scaling() -> None:
    cfg = build_config(catalog_entry("llama-3.1-405b"))
    assert cfg.rope_parameters["rope_type"] == "llama3"
    assert cfg.rope_parameters["factor"] == 8.0


@pytest.mark.parametrize(
    ("name", "hidden", "layers", "kv_heads"),
    [("qwen2-vl-7b", 3584, 28, 4), ("qwen2-vl-72b", 8192, 80, 8)],
)
def test_qwen2_vl_sizes(name: str, hidden: int, layers: int, kv_heads: int) -> None:
    cfg = build_config(catalog_entry(name))
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers) == (hidden, layers)
    assert (text.num_key_value_heads, text.vocab_size) == (kv_heads, 152064)
    assert (vision.embed_dim, vision.depth, vision.hidden_size) == (1280, 32, hidden)


@pytest.mark.parametrize(
    ("name", "model_type", "layers", "hidden", "kv_heads", "vision_depth"),
    [
        ("qwen3.5-27b", "qwen3_5", 64, 5120, 4, 27),
        ("qwen3.5-397b-a17b", "qwen3_5_moe", 60, 4096, 2, 27),
        ("gemma-4-31b", "gemma4", 60, 5376, 16, 27),
        ("glm-4.6v", "glm4v_moe", 46, 4096, 8, 24),
    ],
)
def test_newest_flagship_sizes(
    name: str, model_type: str, layers: int, hidden: int, kv_heads: int, vision_depth: int
) -> None:
    cfg = build_config(catalog_entry(name))
    text, vision = cfg.text_config, cfg.vision_config
    assert cfg.model_type == model_type
    assert (text.num_hidden_layers, text.hidden_size) == (layers, hidden)
    # first layer's: Gemma 4's global layers have their own KV heads, so transformers keeps them per layer
    assert text.per_layer_config[0].num_key_value_heads == kv_heads
    assert vision.num_hidden_layers == vision_depth


def test_newest_flagship_layer_mix_and_experts() -> None:
    qwen_moe = build_config(catalog_entry("qwen3.5-397b-a17b")).text_config
    assert qwen_moe.layer_types.count("full_attention") == 15  # every 4th layer; the rest Gated DeltaNet
    assert (qwen_moe.num_experts, qwen_moe.num_experts_per_tok, qwen_moe.linear_num_value_heads) == (512, 10, 64)
    assert build_config(catalog_entry("qwen3.5-27b")).text_config.intermediate_size == 17408
    gemma = build_config(catalog_entry("gemma-4-31b")).text_config
    assert gemma.layer_types.count("full_attention") == 10 and gemma.sliding_window == 1024
    assert gemma.attention_k_eq_v and gemma.tie_word_embeddings
    assert (gemma.per_layer_config[5].num_key_value_heads, gemma.per_layer_config[5].head_dim) == (4, 512)
    glm = build_config(catalog_entry("glm-4.6v")).text_config
    assert (glm.n_routed_experts, glm.num_experts_per_tok, glm.first_k_dense_replace) == (128, 8, 1)


def test_internvl_is_native_with_internvit_6b_and_untied_head() -> None:
    cfg = build_config(catalog_entry("internvl-78b"))
    assert cfg.model_type == "internvl" and not cfg.tie_word_embeddings
    vision = cfg.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (3200, 45, 25)
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers) == (8192, 80)


def test_unknown_name_suggests_the_close_one_and_lists_the_catalog() -> None:
    assert not is_catalog_name("llama-70b")
    with pytest.raises(BadInput) as caught:
        catalog_entry("llama-70b")
    message = str(caught.value)
    assert "'llama-70b'" in message
    assert "did you mean llama-3.1-70b" in message
    assert all(name in message for name in catalog_names())


def test_unknown_name_without_close_match_still_lists_the_catalog() -> None:
    with pytest.raises(BadInput, match="not a catalog name. Catalog: llama-3.1-8b"):
        catalog_entry("zzz")
