"""Pitfall 1 (ChatGLM2/3, GLM-4 before its fix): the KV cache is one tensor,
[layers, 2, batch, heads, tokens, head_dim], built in the parent's forward with
``torch.cat((presents, kv_cache))`` across layers. With the blocks split over two
GPUs, the cat meets the first layers' KV on cuda:0 and a later layer's on cuda:1.
The module layout follows ChatGLM's (``transformer.embedding.word_embeddings``,
``transformer.rotary_pos_emb``, ``transformer.encoder.layers``, ``transformer.output_layer``).
"""

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_pitfall_glm import PitfallGlmConfig
from .pitfall_blocks import MLP, PitfallPreTrainedModel, RMSNorm, RotaryEmbedding, apply_rope, attend


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, h // config.num_attention_heads
        self.query_key_value = nn.Linear(h, 3 * h, bias=True)
        self.dense = nn.Linear(h, h, bias=False)

    def forward(self, x, cos, sin, kv_cache=None, use_cache=True):
        b, t, _ = x.shape
        q, k, v = self.query_key_value(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = torch.cat((kv_cache[0], k), dim=2), torch.cat((kv_cache[1], v), dim=2)
        out = self.dense(attend(q, k, v).transpose(1, 2).reshape(b, t, -1))
        return out, (torch.stack((k, v))[None] if use_cache else None)


class GLMBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, kv_cache=None, use_cache=True):
        attn, kv_cache = self.self_attention(self.input_layernorm(x), cos, sin, kv_cache, use_cache)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv_cache


class GLMTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size)

    def forward(self, x, cos, sin, kv_caches=None, use_cache=True):
        presents = None
        for i, layer in enumerate(self.layers):
            x, kv_cache = layer(x, cos, sin, kv_cache=None if kv_caches is None else kv_caches[i], use_cache=use_cache)
            if use_cache:
                presents = kv_cache if presents is None else torch.cat((presents, kv_cache), dim=0)
        return self.final_layernorm(x), presents


class Embedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class ChatGLMModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config.hidden_size // config.num_attention_heads)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, kv_caches=None, use_cache=True):
        b, t = input_ids.shape
        past = 0 if kv_caches is None else kv_caches.shape[4]
        positions = torch.arange(past, past + t, device=input_ids.device)[None].expand(b, -1)
        cos, sin = self.rotary_pos_emb(positions)
        return self.encoder(self.embedding(input_ids), cos, sin, kv_caches, use_cache)


class PitfallGlmForConditionalGeneration(PitfallPreTrainedModel, GenerationMixin):
    config_class = PitfallGlmConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]

    def __init__(self, config):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False   # the cache is this model's own tensor

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        if past_key_values is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "use_cache": True}

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0, **kwargs):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        hidden, presents = self.transformer(input_ids, past_key_values, use_cache)
        logits = self.transformer.output_layer(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=presents)
