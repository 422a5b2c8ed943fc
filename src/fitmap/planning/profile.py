"""Stage 3 — Profile: what each unit costs at a workload, in bytes.

One interface, two sources: :func:`estimate` (analytic, from config values) and the
simulator (measured on fake devices, ``fitmap.simulation.simulate``). The planner only reads
:class:`Profile`.

Per unit:

* ``weight_bytes`` — resident parameter bytes (exact header bytes when known);
* ``kv_bytes`` — KV cache at full context (prompt + image tokens + new), for the
  cache layout transformers actually keeps: K and V per KV head; sliding-window
  layers keep at most the window; DeepSeek MLA keeps the compressed latent
  (kv_lora_rank + rope dim) and expands it per step (counted as activation);
* ``act_bytes`` — the transient activation peak while the unit runs, prefill or
  decode, whichever is larger, for the attention kernels a GPU runs (flash /
  memory-efficient: no T x T score matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fitmap.model import configs
from fitmap.model.skeleton import Skeleton
from fitmap.planning.images import ImageShape, image_shape
from fitmap.planning.workload import Workload

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class UnitCost:
    name: str
    weight_bytes: int
    kv_bytes: int
    act_bytes: int


@dataclass(frozen=True)
class Profile:
    method: str  # "analytic" | "simulate"
    workload: Workload
    costs: tuple[UnitCost, ...]  # in skeleton unit order
    image_tokens: int  # per sequence, all images
    seq_len: int  # prompt + image tokens + new
    boundary_bytes: int  # hidden state crossing a device boundary at prefill

    def cost(self, name: str) -> UnitCost:
        return next(c for c in self.costs if c.name == name)


# --------------------------------------------------------------------------- costs
def text_config(config):
    """The text model's config under any of the names model code uses (:mod:`fitmap.model.configs`)."""
    return configs.text_config(config)


def head_dim(tc) -> int:
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def kv_bytes_per_token(tc, layer: int, dtype_bytes: int) -> int:
    """Bytes one token adds to layer ``layer``'s cache."""
    if getattr(tc, "kv_lora_rank", None):  # MLA: the compressed latent and the shared rope key
        return (tc.kv_lora_rank + tc.qk_rope_head_dim) * dtype_bytes
    kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    return 2 * kv_heads * head_dim(tc) * dtype_bytes


def cached_tokens(tc, layer: int, seq: int) -> int:
    """Tokens layer ``layer`` keeps in its cache after a decode step at context ``seq``."""
    types = getattr(tc, "layer_types", None)
    window = getattr(tc, "sliding_window", None)
    if types and layer < len(types) and types[layer] == "sliding_attention" and window:
        return min(seq, window)
    return seq


def peak_cached_tokens(tc, layer: int, seq: int, prompt: int) -> int:
    """The most tokens layer ``layer``'s cache holds at once: a sliding-window layer keeps the last
    window as a *view* of the prefill's keys and values, so the whole ``prompt`` (text and image
    tokens) stays allocated until the first decode step replaces it (transformers'
    ``DynamicSlidingWindowLayer``; Gemma 3 at a 2304-token prompt: 245 MiB more on a 24 GiB card)."""
    return min(seq, max(cached_tokens(tc, layer, seq), prompt))


def _block_act(tc, tokens: int, ctx_tokens: int, batch: int, b: int) -> int:
    """Peak bytes inside one decoder block: residual in/out plus the larger of attention and MLP.

    ``tokens`` are the query tokens of the whole batch, ``ctx_tokens`` the keys.
    Fused kernels (sdpa, flash) keep no score matrix; eager attention (Gemma-2's
    soft-capping has no fused path in transformers) holds batch x heads x T x S
    scores, upcast to fp32 for the softmax.
    """
    h = tc.hidden_size
    heads = tc.num_attention_heads
    hd = head_dim(tc)
    kvh = getattr(tc, "num_key_value_heads", None) or heads
    attn = tokens * (2 * heads * hd + 2 * kvh * hd) * b
    if getattr(tc, "_attn_implementation", None) == "eager":
        attn += heads * tokens * (ctx_tokens // max(1, batch)) * (2 * b + 4)
    if getattr(tc, "kv_lora_rank", None):  # MLA expands the whole context per step
        attn = (
            batch * ctx_tokens * heads * (tc.qk_nope_head_dim + tc.qk_rope_head_dim + tc.v_head_dim) * b
            + tokens * heads * (tc.qk_nope_head_dim + tc.qk_rope_head_dim) * b * 2
        )
    inter = getattr(tc, "intermediate_size", 4 * h)
    experts_per_tok = getattr(tc, "num_experts_per_tok", None)
    if experts_per_tok:
        moe_inter = getattr(tc, "moe_intermediate_size", None) or inter
        n_experts: Any = getattr(tc, "num_local_experts", None) or getattr(tc, "n_routed_experts", 1)  # config value
        mlp = tokens * (3 * moe_inter * experts_per_tok + n_experts * 4 + h * experts_per_tok) * b
        mlp = max(mlp, tokens * 3 * inter * b)  # dense layers of a mostly-MoE model
    else:
        mlp = tokens * 3 * inter * b
    return 2 * tokens * h * b + max(attn, mlp)


def _vision_act(config, images: list[ImageShape], batch: int, b: int) -> int:
    """Peak inside one vision block, all images of the batch at once."""
    vc = configs.vision_config(config)
    hv = getattr(vc, "embed_dim", None) or vc.hidden_size
    inter = getattr(vc, "intermediate_size", None) or int(hv * getattr(vc, "mlp_ratio", 4))
    patches = batch * sum(i.patches for i in images)
    return patches * (2 * hv + max(4 * hv, 2 * inter)) * b


def estimate(sk: Skeleton, workload: Workload) -> Profile:
    """Analytic per-unit costs of ``sk`` at ``workload``."""
    cfg = sk.config
    tc = text_config(cfg)
    b = _BYTES.get(sk.dtype, 2)
    images = [image_shape(cfg, w, h) for w, h in workload.images] if configs.vision_config(cfg) is not None else []
    img_tokens = sum(i.tokens for i in images)
    seq = workload.prompt + img_tokens + workload.new
    prefill = workload.batch * (workload.prompt + img_tokens)
    h = tc.hidden_size
    vocab = tc.vocab_size
    costs = []
    for u in sk.units:
        kv = act = 0
        if u.kind == "block":
            assert u.layer is not None  # skeleton.classify: the blocks are the units with a layer
            kv = (
                workload.batch
                * peak_cached_tokens(tc, u.layer, seq, seq - workload.new)
                * kv_bytes_per_token(tc, u.layer, b)
            )
            act = max(
                _block_act(tc, prefill, prefill, workload.batch, b),
                _block_act(tc, workload.batch, workload.batch * seq, workload.batch, b),
            )
        elif u.kind == "vision" and images and u.numel > 0:
            act = _vision_act(cfg, images, workload.batch, b)
        elif u.kind == "input" and u.numel > 0:
            act = 2 * prefill * h * b
        elif u.kind == "output" and u.numel > 0:
            # generate() asks for the last position's logits only; they are upcast to fp32
            act = prefill * h * b + workload.batch * vocab * (b + 4 + 4)
        costs.append(UnitCost(u.name, u.weight_bytes, kv, act))
    return Profile("analytic", workload, tuple(costs), img_tokens, seq, prefill * h * b)
