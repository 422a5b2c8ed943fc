"""The remote-code fixtures of the models users' documents name (``make_remote`` takes these
names too):

* ``minicpmv25`` — MiniCPM-Llama3-V 2.5 (``tests/remote/minicpmv25``): a ``LlamaConfig``
  top config, transformers' ``Idefics2VisionTransformer`` as ``vpm``, a perceiver
  ``resampler``, ``LlamaForCausalLM`` as ``llm``, ``chat(image, msgs, tokenizer)`` through
  its own ``AutoProcessor`` (preprocessor_config.json + a Llama-3 chat template);
* ``glm4v`` — GLM-4V-9B (``tests/remote/glm4v``): the ChatGLM4 text model plus the EVA2-CLIP
  tower ``transformer.vision``; the prompt comes from the tokenizer's
  ``apply_chat_template([{"role", "image", "content"}], return_dict=True)`` (input_ids,
  attention_mask, position_ids, images) and the answer from ``model.generate(**inputs)``;
* ``cogvlm1`` — CogVLM v1 (THUDM/cogvlm-chat-hf, ``tests/remote/cogvlm1``): a Vicuna / Llama-2 text
  model with full multi-head attention and torch rotary, vision experts per token, the EVA2-CLIP-E
  tower ``model.vision`` without CogVLM2's 2x2 conv (one token per patch); the prompt comes from
  ``model.build_conversation_input_ids(tokenizer, query=..., history=..., images=[...])`` and the
  answer from ``generate``; a Llama-2 style tokenizer (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2);
* ``internvl_llama3`` — InternVL2-Llama3-76B's layout on the existing ``internvl`` sources:
  ``llm_config.architectures = ["LlamaForCausalLM"]`` and InternViT-6B's flags
  (``qk_normalization``, ``norm_type="rms_norm"``, no qkv bias, an odd head count).

Each entry of :data:`SEEDS` names its source directory, its config and the writer of the
tokenizer / processor files it needs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from . import INTERNVL, byte_tokenizer

HERE = Path(__file__).parent

# ids 256 on, in this order (Llama 3's names; "!" is id 0 as in Llama 3, the pad id chat() decodes away)
MINICPMV_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "<unk>", "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
                    "<point>", "</point>", "<slice>", "</slice>"]
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")

MINICPMV25 = {
    "version": "2.5", "model_type": "minicpmv", "architectures": ["MiniCPMV"],
    "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
                 "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"},
    "attention_bias": False, "attention_dropout": 0.0, "batch_vision_input": True, "bos_token_id": 256,
    "eos_token_id": 257, "drop_vision_last_layer": False, "hidden_act": "silu",
    # hidden_size >= 256: the resampler takes embed_dim // 128 heads
    "hidden_size": 256, "image_size": 448, "initializer_range": 0.02, "intermediate_size": 512,
    "max_position_embeddings": 2048, "mm_use_im_start_end": True, "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "patch_size": 14, "pretraining_tp": 1, "query_num": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 500000.0,
    "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"}, "slice_mode": True,
    "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.40.0",
    "use_cache": False,   # as the release's config.json: Llama decodes without a KV cache unless told
    "vision_config": {"hidden_size": 32, "image_size": 70, "intermediate_size": 64, "model_type": "idefics2",
                      "num_attention_heads": 2, "num_hidden_layers": 2, "patch_size": 14},
    "vocab_size": 320,
}
MINICPMV25_PREPROCESSOR = {
    "image_processor_type": "MiniCPMVImageProcessor",
    "auto_map": {"AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                 "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
    "processor_class": "MiniCPMVProcessor", "max_slice_nums": 9, "scale_resolution": 28, "patch_size": 14,
    "image_feature_size": 8, "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>",
    "slice_end": "</slice>", "unk": "<unk>", "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5],
    "version": 2.5,
}

# GLM-4's special tokens, ids 256 on in this order (151329 on in the release)
GLM4_SPECIAL = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                "<|end_of_video|>"]
GLM4V = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    },
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True, "boi_token_id": 266, "eoi_token_id": 267, "eos_token_id": [256, 263, 265],
    "pad_token_id": 256, "ffn_hidden_size": 96, "fp32_residual_connection": False, "hidden_dropout": 0.0,
    "hidden_size": 64, "kv_channels": 16, "layernorm_epsilon": 1.5625e-07, "multi_query_attention": True,
    "multi_query_group_num": 2, "num_attention_heads": 4, "num_layers": 2, "original_rope": True,
    "padded_vocab_size": 320, "post_layer_norm": True, "rmsnorm": True, "rope_ratio": 1, "seq_length": 1024,
    "use_cache": True, "torch_dtype": "float32", "transformers_version": "4.40.2", "tie_word_embeddings": False,
    # 56 px / 14 = 4x4 patches (+ cls = 17 positions), the 2x2 conv leaves (56 // 14 // 2) ** 2 = 4 image tokens
    "vision_config": {"dropout_prob": 0.0, "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 2,
                      "hidden_size": 32, "patch_size": 14, "num_heads": 2, "intermediate_size": 64,
                      "layer_norm_eps": 1e-06, "num_positions": 17, "image_size": 56, "scaling_factor": 8},
}
GLM4V_TOKENIZER_CONFIG = {
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
    "tokenizer_class": "ChatGLM4Tokenizer", "image_size": 56, "padding_side": "left", "remove_space": False,
    "do_lower_case": False, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>", "model_max_length": 1000000000000000019884624838656,
}

# InternVL2-Llama3-76B: InternViT-6B-448px-V1-5 (3200 wide, 25 heads, 45 layers, RMSNorm, QK-norm, no qkv bias)
# in front of Hermes-2-Theta-Llama-3-70B; here 40 wide with 5 heads (head_dim 8), Llama 3 rope.
INTERNVL_LLAMA3 = copy.deepcopy(INTERNVL)
# tie_word_embeddings as InternVL's config code sets it (from llm_config): a config without the key
# is tied by from_pretrained on 4.40 (embed_tokens := lm_head), which fitmap's loader does not do
INTERNVL_LLAMA3.update({"force_image_size": 56, "max_dynamic_patch": 6, "template": "Hermes-2",
                        "transformers_version": "4.37.2", "tie_word_embeddings": False})
INTERNVL_LLAMA3["llm_config"] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 320,
    "max_position_embeddings": 2048, "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "hidden_act": "silu",
    "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 257, "eos_token_id": 256,
    "torch_dtype": "float32"}
INTERNVL_LLAMA3["vision_config"] = {
    "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 40,
    "intermediate_size": 80, "num_attention_heads": 5, "num_hidden_layers": 2, "image_size": 56, "patch_size": 14,
    "qkv_bias": False, "qk_normalization": True, "norm_type": "rms_norm", "use_flash_attn": True,
    "drop_path_rate": 0.0, "layer_norm_eps": 1e-6, "initializer_factor": 0.1, "initializer_range": 1e-10,
    "hidden_act": "gelu", "dropout": 0.0, "attention_dropout": 0.0, "num_channels": 3}


# CogVLM v1 (cogvlm-chat-hf): Vicuna-7B-v1.5 (32 layers, 4096 wide, 32 heads with their own keys and
# values) and EVA2-CLIP-E (490 px, patch 14: 35 x 35 = 1225 image tokens + boi / eoi). Here 56 px / 14 =
# 4 x 4 patches (+ cls = 17 positions), so 16 + 2 = 18 image slots.
COGVLM1 = {
    "architectures": ["CogVLMForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                 "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"},
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 2048, "num_attention_heads": 4,
    "num_hidden_layers": 2, "rms_norm_eps": 1e-05, "template_version": "chat", "tie_word_embeddings": False,
    "torch_dtype": "float32", "transformers_version": "4.35.0", "use_cache": True, "vocab_size": 320,
    "vision_config": {"dropout_prob": 0.0, "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 2,
                      "hidden_size": 32, "patch_size": 14, "num_heads": 2, "intermediate_size": 64,
                      "layer_norm_eps": 1e-06, "num_positions": 17, "image_size": 56},
}
LLAMA2_SPECIAL = ["<unk>", "<s>", "</s>"]   # ids 0, 1, 2 as in Llama 2; the bytes follow from id 3


def llama2_tokenizer(directory: Path) -> None:
    """Byte-level fast tokenizer laid out as Llama 2's (``<unk>``, ``<s>``, ``</s>`` first, then the
    bytes, as its byte-fallback pieces start at id 3), ``<s>`` put in front when special tokens are
    added, ``<unk>`` as the pad token (Vicuna's); CogVLM v1's card loads Vicuna-7B-v1.5's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(LLAMA2_SPECIAL)}
    vocab.update({c: i + len(LLAMA2_SPECIAL) for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(LLAMA2_SPECIAL)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[
        ("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.save_pretrained(directory)


def minicpmv_tokenizer(directory: Path) -> None:
    """Byte-level fast tokenizer with Llama 3's and MiniCPM-V's special tokens, its class
    ``MiniCPMVTokenizerFast`` (tokenization_minicpmv_fast.py), the Llama-3 chat template,
    and the processor's preprocessor_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}   # "!" -> 0
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(MINICPMV_SPECIAL)   # ids 256.. in list order
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   unk_token="<unk>", pad_token="!",
                                   additional_special_tokens=[t for t in MINICPMV_SPECIAL if t not in (
                                       "<|begin_of_text|>", "<|end_of_text|>", "<unk>")])
    fast.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.update({"auto_map": {"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]},
                "tokenizer_class": "MiniCPMVTokenizerFast", "chat_template": LLAMA3_CHAT_TEMPLATE,
                "padding_side": "right", "clean_up_tokenization_spaces": True})
    path.write_text(json.dumps(cfg, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps(MINICPMV25_PREPROCESSOR, indent=2))


def glm4v_tokenizer(directory: Path) -> None:
    (directory / "tokenizer_config.json").write_text(json.dumps(GLM4V_TOKENIZER_CONFIG, indent=2))


# name -> (source directory under tests/remote, config, tokenizer writer)
SEEDS = {
    "minicpmv25": ("minicpmv25", MINICPMV25, minicpmv_tokenizer),
    "glm4v": ("glm4v", GLM4V, glm4v_tokenizer),
    "internvl_llama3": ("internvl", INTERNVL_LLAMA3, byte_tokenizer),
    "cogvlm1": ("cogvlm1", COGVLM1, llama2_tokenizer),
}
