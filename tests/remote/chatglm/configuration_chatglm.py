"""A ChatGLM3-style config, written as that family writes it: its own attribute names
(``num_layers``, ``padded_vocab_size``, ``ffn_hidden_size``, ``kv_channels``,
``multi_query_group_num``, ``seq_length``) and no ``hidden_layers`` / ``key_value_heads``."""

from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(self, num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696,
                 kv_channels=128, num_attention_heads=32, seq_length=2048, hidden_dropout=0.0,
                 attention_dropout=0.0, layernorm_epsilon=1e-5, rmsnorm=True, add_bias_linear=False,
                 add_qkv_bias=False, post_layer_norm=True, multi_query_attention=False, multi_query_group_num=1,
                 original_rope=True, fp32_residual_connection=False, quantization_bit=0, pre_seq_len=None,
                 prefix_projection=False, **kwargs):
        self.num_layers = num_layers
        self.vocab_size = padded_vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.post_layer_norm = post_layer_norm
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.original_rope = original_rope
        self.fp32_residual_connection = fp32_residual_connection
        self.quantization_bit = quantization_bit
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        super().__init__(**kwargs)
