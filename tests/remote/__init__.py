"""Remote-code models written the way the real ones are (see each ``modeling_*.py``).

Each subdirectory imitates one family's published code at tiny size: its own config
attribute names, forward signatures without ``**kwargs``, no ``GenerationMixin`` base,
tuple KV caches, its own ``chat()``, TorchScript helpers, tensor math in ``__init__``.
They are written for the transformers 4.x their model cards pin, as the real ones are;
:func:`make_remote` saves one with random weights (``from_pretrained`` on that
transformers is the reference).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

HERE = Path(__file__).parent

CHATGLM = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    },
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True, "ffn_hidden_size": 96, "fp32_residual_connection": False, "hidden_dropout": 0.0,
    "hidden_size": 64, "kv_channels": 16, "layernorm_epsilon": 1e-05, "multi_query_attention": True,
    "multi_query_group_num": 2, "num_attention_heads": 4, "num_layers": 4, "original_rope": True,
    "padded_vocab_size": 320, "post_layer_norm": True, "rmsnorm": True, "seq_length": 1024, "use_cache": True,
    "torch_dtype": "float32", "transformers_version": "4.30.2", "tie_word_embeddings": False,
    "eos_token_id": 2, "pad_token_id": 0,
}
INTERNVL = {
    "model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
    "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                 "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                 "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
    "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": 56, "max_dynamic_patch": 6,
    "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1, "template": "Hermes-2", "use_thumbnail": True,
    "use_backbone_lora": 0, "use_llm_lora": 0, "torch_dtype": "float32", "transformers_version": "4.37.2",
    "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
                   "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "num_hidden_layers": 2, "vocab_size": 320, "max_position_embeddings": 2048,
                   "rope_theta": 1000000.0, "tie_word_embeddings": False, "bos_token_id": 257, "eos_token_id": 256,
                   "torch_dtype": "float32"},
    "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 32,
                      "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "image_size": 56,
                      "patch_size": 14, "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
                      "drop_path_rate": 0.1, "layer_norm_eps": 1e-6, "initializer_factor": 1.0},
}
COGVLM = {
    "architectures": ["CogVLMForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                 "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"},
    "bos_token_id": 256, "eos_token_id": [257, 261], "pad_token_id": 300, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 8192, "num_attention_heads": 4,
    "num_hidden_layers": 2, "num_multi_query_heads": 2, "rms_norm_eps": 1e-05, "template_version": "chat",
    "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.41.2", "use_cache": True,
    "vocab_size": 320,
    "vision_config": {"dropout_prob": 0.0, "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 2,
                      "hidden_size": 32, "patch_size": 14, "num_heads": 2, "intermediate_size": 64,
                      "layer_norm_eps": 1e-06, "num_positions": 17, "image_size": 56},
}
SPECIAL = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<|endoftext|>"]   # ids from 256 on
TOKENIZER_CONFIGS = {
    "chatglm": {"remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}},
}
CONFIGS = {"chatglm": CHATGLM, "internvl": INTERNVL, "cogvlm": COGVLM}


def byte_tokenizer(directory: Path) -> None:
    """A byte-level tokenizer (ids 0-255) with InternVL's chat and image tokens, saved as
    ``PreTrainedTokenizerFast`` files (Qwen2's tokenizer is byte-level BPE too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=SPECIAL)
    fast.save_pretrained(directory)


def _model(name: str):
    """(source directory under tests/remote, config, tokenizer writer) of fixture ``name``: the families
    above, or the seed models of :mod:`tests.remote.seeds`."""
    if name in CONFIGS:
        if name in TOKENIZER_CONFIGS:
            def write(directory: Path) -> None:
                (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIGS[name], indent=2))
            return name, CONFIGS[name], write
        return name, CONFIGS[name], byte_tokenizer
    from tests.remote.seeds import SEEDS   # imports this package: on first use only

    return SEEDS[name]


def make_remote(name: str, root: Path, seed: int = 0, std: float = 0.5, **config) -> Path:
    """Save remote-code model ``name`` with random weights (normal, ``std``: wide enough that
    greedy decoding does not repeat one token) under ``root``; its directory."""
    import transformers

    source, base, write_tokenizer = _model(name)
    cfg = base | config
    sources = sorted((HERE / source).glob("*.py"))
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode() + transformers.__version__.encode()
                          + b"".join(s.read_bytes() for s in sources)).hexdigest()[:10]
    directory = root / f"{name}_{digest}"
    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for src in sources:
        shutil.copy(src, directory / src.name)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(directory)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(directory, trust_remote_code=True), trust_remote_code=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std) if p.dim() > 1 else p.fill_(1.0)
    model.eval().save_pretrained(directory, safe_serialization=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))   # keep auto_map as written
    for src in sources:
        shutil.copy(src, directory / src.name)
    return directory
