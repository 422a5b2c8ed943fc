"""MiniCPM-V's perceiver resampler: learned queries cross-attend to the vision tower's
patches once. As in the release:

* the 2-D sin/cos position table is computed with numpy in ``__init__`` for a 70x70 grid
  (``max_size``) and registered as a *non-persistent* buffer on the CPU (not in the
  checkpoint, so it is wherever ``__init__`` left it unless the module is moved);
  ``forward`` grows it (``_adjust_pos_cache``) when an image has more patches per side;
* the attention is a ``nn.MultiheadAttention`` subclass whose ``out_proj`` is swapped for a
  plain ``nn.Linear`` and whose ``forward`` is rewritten in Python (the release copies
  torch's ``multi_head_attention_forward``); it runs sequence-first (L, B, D);
* ``proj`` is a bare ``nn.Parameter`` drawn with ``torch.randn`` in ``__init__``.
"""

from functools import partial
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_


def get_2d_sincos_pos_embed(embed_dim, image_size):
    """(H, W, embed_dim) table for a grid of ``image_size`` (int or (H, W))."""
    grid_h_size, grid_w_size = (image_size, image_size) if isinstance(image_size, int) else image_size
    grid = np.meshgrid(np.arange(grid_w_size, dtype=np.float32), np.arange(grid_h_size, dtype=np.float32))
    grid = np.stack(grid, axis=0)   # width first, as the release does
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid)


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0
    emb_h = get_1d_sincos_pos_embed_from_grid_new(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid_new(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=-1)


def get_1d_sincos_pos_embed_from_grid_new(embed_dim, pos):
    assert embed_dim % 2 == 0
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float32) / (embed_dim / 2.0))
    out = np.einsum("hw,d->hwd", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


class Resampler(nn.Module):
    def __init__(self, num_queries, embed_dim, num_heads, kv_dim=None, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 adaptive=False, max_size=(70, 70)):
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.adaptive = adaptive
        self.max_size = max_size
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        if kv_dim is not None and kv_dim != embed_dim:
            self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        else:
            self.kv_proj = nn.Identity()
        self.attn = MultiheadAttention(embed_dim, num_heads)
        self.ln_q = norm_layer(embed_dim)
        self.ln_kv = norm_layer(embed_dim)
        self.ln_post = norm_layer(embed_dim)
        self.proj = nn.Parameter((embed_dim ** -0.5) * torch.randn(embed_dim, embed_dim))
        self._set_2d_pos_cache(self.max_size)

    def _set_2d_pos_cache(self, max_size, device="cpu"):
        pos_embed = torch.from_numpy(get_2d_sincos_pos_embed(self.embed_dim, max_size)).float().to(device)
        self.register_buffer("pos_embed", pos_embed, persistent=False)

    def _adjust_pos_cache(self, tgt_sizes, device):
        max_h = torch.max(tgt_sizes[:, 0])
        max_w = torch.max(tgt_sizes[:, 1])
        if max_h > self.max_size[0] or max_w > self.max_size[1]:
            self.max_size = [max(max_h, self.max_size[0]), max(max_w, self.max_size[1])]
            self._set_2d_pos_cache(self.max_size, device)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x, tgt_sizes=None):
        assert x.shape[0] == tgt_sizes.shape[0]
        bs = x.shape[0]
        device, dtype = x.device, x.dtype
        patch_len = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        self._adjust_pos_cache(tgt_sizes, device=device)
        max_patch_len = torch.max(patch_len)
        key_padding_mask = torch.zeros((bs, max_patch_len), dtype=torch.bool, device=device)
        pos_embed = []
        for i in range(bs):
            tgt_h, tgt_w = tgt_sizes[i]
            # the table keeps its own device: only the dtype follows x
            pos_embed.append(self.pos_embed[:tgt_h, :tgt_w, :].reshape((tgt_h * tgt_w, -1)).to(dtype))
            key_padding_mask[i, patch_len[i]:] = True
        pos_embed = torch.nn.utils.rnn.pad_sequence(pos_embed, batch_first=True, padding_value=0.0).permute(1, 0, 2)
        x = self.kv_proj(x)
        x = self.ln_kv(x).permute(1, 0, 2)           # L, B, D
        q = self.ln_q(self.query)                     # Q, D
        out = self.attn(self._repeat(q, bs), x + pos_embed, x, key_padding_mask=key_padding_mask)[0]
        x = out.permute(1, 0, 2)                      # B, Q, D
        x = self.ln_post(x)
        return x @ self.proj

    def _repeat(self, query, N: int):
        return query.unsqueeze(1).repeat(1, N, 1)


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with a plain ``nn.Linear`` out_proj and a Python forward
    (sequence-first; ``in_proj_weight``/``in_proj_bias`` packed q, k, v as torch packs them)."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        head_dim = embed_dim // self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        q = q.reshape(tgt_len, bsz * self.num_heads, head_dim).transpose(0, 1)
        k = k.reshape(src_len, bsz * self.num_heads, head_dim).transpose(0, 1)
        v = v.reshape(src_len, bsz * self.num_heads, head_dim).transpose(0, 1)
        mask = None
        if key_padding_mask is not None:
            mask = torch.zeros_like(key_padding_mask, dtype=q.dtype).masked_fill_(key_padding_mask, float("-inf"))
            mask = mask.view(bsz, 1, 1, src_len).expand(-1, self.num_heads, -1, -1).reshape(
                bsz * self.num_heads, 1, src_len)
        if attn_mask is not None:
            mask = attn_mask if mask is None else mask + attn_mask
        scores = torch.bmm(q / head_dim ** 0.5, k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tgt_len * bsz, embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, embed_dim)
        if not need_weights:
            return out, None
        weights = weights.view(bsz, self.num_heads, tgt_len, src_len)
        return out, (weights.mean(dim=1) if average_attn_weights else weights)
