"""Pitfall 4 (OLMo's ``BufferCache``, and rotary caches like it): the rotary tables are
computed on first use, on the device of the layer that asks first, and kept in a cache
shared by all layers. Every later layer reads them from there: with the blocks split
over two GPUs, the layers on cuda:1 multiply their queries by tables on cuda:0.
"""

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_pitfall_rope import PitfallRopeConfig
from .pitfall_blocks import MLP, PitfallCausalLM, RMSNorm, attend, new_cache, rope_inv_freq


class CachedRotaryEmbedding(nn.Module):
    """No buffers: the tables live in ``shared`` (one dict for the whole model)."""

    def __init__(self, head_dim: int, shared: dict):
        super().__init__()
        self.head_dim, self.shared = head_dim, shared

    def tables(self, seq_len: int, device):
        cos, sin = self.shared.get("rope_pos_cos"), self.shared.get("rope_pos_sin")
        if cos is None or cos.shape[0] < seq_len:
            freqs = torch.arange(seq_len, device=device)[:, None].float() * rope_inv_freq(self.head_dim).to(device)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = self.shared["rope_pos_cos"], self.shared["rope_pos_sin"] = emb.cos(), emb.sin()
        return cos[:seq_len], sin[:seq_len]

    def forward(self, q, k):
        q_len, k_len = q.shape[2], k.shape[2]
        cos, sin = self.tables(k_len, q.device)
        return rotate(q, cos[k_len - q_len:], sin[k_len - q_len:]), rotate(k, cos, sin)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int, shared: dict):
        super().__init__()
        h = config.hidden_size
        self.heads, self.layer_idx = config.num_attention_heads, layer_idx
        self.head_dim = h // self.heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(h, h, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(h, h, bias=False)
        self.rotary_emb = CachedRotaryEmbedding(self.head_dim, shared)

    def forward(self, x, cache=None):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:   # keys are cached before rotation, as OLMo does
            k, v = cache.update(k, v, self.layer_idx)
        q, k = self.rotary_emb(q, k)
        return self.o_proj(attend(q, k, v).transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, config, layer_idx: int, shared: dict):
        super().__init__()
        self.attn_norm, self.ff_norm = RMSNorm(config.hidden_size), RMSNorm(config.hidden_size)
        self.attn = Attention(config, layer_idx, shared)
        self.ff = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cache=None):
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.ff(self.ff_norm(x))


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        shared: dict = {}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i, shared) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size)

    def forward(self, input_ids, cache=None):
        x = self.embed_tokens(input_ids)
        for block in self.blocks:
            x = block(x, cache)
        return self.norm(x)


class PitfallRopeForCausalLM(PitfallCausalLM):
    config_class = PitfallRopeConfig
    decoder_class = Model
    _no_split_modules = ["Block"]

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0, **kwargs):
        cache = new_cache(self, past_key_values, use_cache if use_cache is not None else self.config.use_cache)
        hidden = self.model(input_ids, cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)
