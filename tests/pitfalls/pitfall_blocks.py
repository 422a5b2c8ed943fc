"""Decoder pieces shared by the pitfall models (copied next to each model's own code).

Shapes: hidden states [batch, tokens, hidden]; per-head tensors [batch, heads, tokens, head_dim].
The models assume unpadded batches, so the attention mask is not read: prefill is
causal, a decode step attends to the whole cache.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(head_dim: int, theta: float = 10000.0):
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)


def rope_tables(inv_freq, positions):
    """cos, sin [batch, tokens, head_dim] for integer ``positions`` [batch, tokens]."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attend(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)


class RotaryEmbedding(nn.Module):
    """One per model, HF style: the tables are computed once and handed to every layer."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", rope_inv_freq(head_dim), persistent=False)

    def forward(self, positions):
        return rope_tables(self.inv_freq, positions)


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.heads, self.layer_idx = config.num_attention_heads, layer_idx
        self.head_dim = h // self.heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(h, h, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(h, h, bias=False)

    def split(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, cos, sin, cache=None):
        q, k, v = self.split(self.q_proj(x)), self.split(self.k_proj(x)), self.split(self.v_proj(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = attend(q, k, v).transpose(1, 2)
        return self.o_proj(out.reshape(*x.shape[:2], -1))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, one rotary module, blocks, final norm (no head)."""

    layer_class = DecoderLayer

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.hidden_size // config.num_attention_heads)
        self.layers = nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size)

    def forward(self, input_ids=None, inputs_embeds=None, positions=None, cache=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary_emb(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        return self.norm(x)


def positions_for(x, cache, cache_position=None, position_ids=None):
    """[batch, tokens] positions of ``x`` ([batch, tokens] ids or [batch, tokens, hidden])."""
    if position_ids is not None:
        return position_ids
    b, t = x.shape[:2]
    if cache_position is None:
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        cache_position = torch.arange(past, past + t, device=x.device)
    return cache_position[None].expand(b, -1)


def new_cache(model, past_key_values, use_cache):
    if use_cache and past_key_values is None:
        return DynamicCache(config=model.config)
    return past_key_values


class PitfallPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, rope_inv_freq(module.head_dim))


class PitfallTextConfig(PreTrainedConfig):
    """The text-model sizes every pitfall shares; each model names its own ``model_type``."""

    def __init__(self, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=2048, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


class PitfallCausalLM(PitfallPreTrainedModel, GenerationMixin):
    """A decoder (``decoder_class``) under an untied ``lm_head``; subclasses write ``forward``."""

    decoder_class = Decoder

    def __init__(self, config):
        super().__init__(config)
        self.model = self.decoder_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head
