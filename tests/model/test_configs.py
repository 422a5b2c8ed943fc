"""Config values under the names model code uses (fitmap.model.configs)."""

import pytest

from fitmap.model.configs import MissingConfigValue, text_config, vision_config

CHATGLM3_6B = {
    "model_type": "chatglm",
    "num_layers": 28,
    "padded_vocab_size": 65024,
    "hidden_size": 4096,
    "ffn_hidden_size": 13696,
    "kv_channels": 128,
    "num_attention_heads": 32,
    "seq_length": 8192,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
}


def test_chatglm_names():
    tc = text_config(CHATGLM3_6B)
    assert (
        tc.num_hidden_layers,
        tc.num_key_value_heads,
        tc.head_dim,
        tc.vocab_size,
        tc.intermediate_size,
        tc.max_position_embeddings,
    ) == (28, 2, 128, 65024, 13696, 8192)


def test_chatglm_without_multi_query_has_a_kv_head_per_head():
    tc = text_config(CHATGLM3_6B | {"multi_query_attention": False})
    assert getattr(tc, "num_key_value_heads", None) is None and tc.num_attention_heads == 32


def test_text_config_under_llm_config_and_vision_config_as_dict():
    internvl = {
        "model_type": "internvl_chat",
        "llm_config": {
            "hidden_size": 2048,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
        },
        "vision_config": {"image_size": 448, "patch_size": 14},
    }
    assert text_config(internvl).num_key_value_heads == 8
    assert vision_config(internvl).image_size == 448


def test_a_missing_value_is_one_clear_error_and_getattr_defaults_still_work():
    tc = text_config({"model_type": "odd", "hidden_size": 8})
    assert getattr(tc, "num_key_value_heads", None) is None
    with pytest.raises(MissingConfigValue, match="num_hidden_layers, num_layers, n_layer"):
        _ = tc.num_hidden_layers
