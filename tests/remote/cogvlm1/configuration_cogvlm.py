"""CogVLM (v1, cogvlm-chat-hf)'s config: a Vicuna / Llama-2 text model's sizes (every head has its
own keys and values: no KV-head count) and Llama-2's special ids; ``vision_config`` is not a
parameter and arrives through ``**kwargs`` as the plain dict config.json holds."""

from typing import Literal

from transformers import PretrainedConfig


class CogVLMConfig(PretrainedConfig):
    _auto_class = "AutoConfig"

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_hidden_layers=32, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
                 rms_norm_eps=1e-06, template_version: Literal["base", "chat"] = "chat", pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, use_cache=True, **kwargs):
        self.hidden_size = hidden_size
        self.initializer_range = initializer_range
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.vocab_size = vocab_size
        self.num_hidden_layers = num_hidden_layers
        self.hidden_act = hidden_act
        self.template_version = template_version
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
