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
  state-space and linear-attention layers (Mamba, Mamba-2, Gated DeltaNet) keep a
  conv state and a recurrent state per sequence, the same at any length, and no KV
  (hybrids: KV on their attention layers only);
* ``act_bytes`` — the transient activation peak while the unit runs, prefill or
  decode, whichever is larger, for the attention kernels a GPU runs (flash /
  memory-efficient: no T x T score matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fitmap.model import compat, configs
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
    """Bytes one token adds to layer ``layer``'s cache (none on a state-space layer)."""
    if not layer_caches(tc, layer)[0]:
        return 0
    indexer = _indexer_values(tc, layer) * dtype_bytes
    if getattr(tc, "kv_lora_rank", None):  # MLA: the compressed latent and the shared rope key
        return (tc.kv_lora_rank + tc.qk_rope_head_dim) * dtype_bytes + indexer
    kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    return 2 * kv_heads * head_dim(tc) * dtype_bytes + indexer


def _indexer_values(tc, layer: int) -> int:
    """Values per token a sparse-attention layer's indexer caches beside its keys (DeepSeek-V3.2,
    GLM-5, Mistral Large 4: its keys, ``index_head_dim``; GLM-5-Next's k-pools also a gate score per
    key dim and a validity channel)."""
    if layer_type(tc, layer) != "indexed_attention":
        return 0
    dim = getattr(tc, "index_head_dim", None) or 0
    return 2 * dim + 1 if getattr(tc, "index_kpool", None) else dim


# --------------------------------------------------------------------------- state-space layers
# transformers 4.x names of a layer's kind, as transformers 5 renames them
_LEGACY_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}
# Nemotron-H's ``hybrid_override_pattern``: one character per layer
_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
# (keeps KV, keeps a state) per kind, where transformers has no cache classes to ask (4.x)
_KINDS = {
    "linear_attention": (False, True),
    "conv": (False, True),
    "hybrid": (True, True),
    "hybrid_sliding": (True, True),
    "mlp": (False, False),
    "moe": (False, False),
    "dummy": (False, False),
}
_D_STATE = ("mamba_d_state", "state_size", "ssm_state_size")
_D_CONV = ("mamba_d_conv", "conv_kernel")
_GROUPS = ("mamba_n_groups", "mamba_ngroups", "n_groups")
_STATE_BYTES = 4  # recurrent states are float32 in transformers' scans and in mamba-ssm's and fla's kernels


def _first(tc, names: tuple[str, ...]) -> Any:
    return next((v for v in (getattr(tc, n, None) for n in names) if v is not None), None)


def _own(tc, name: str) -> Any:
    """``name`` exactly as the config gives it, no alias."""
    raw = object.__getattribute__(tc, "_config") if isinstance(tc, configs.ConfigView) else tc
    if isinstance(raw, dict):
        return raw.get(name)
    try:
        return getattr(raw, name, None)
    except Exception:  # transformers 5 configs raise on some removed attributes
        return None


def layer_type(tc, layer: int) -> str:
    """Layer ``layer``'s kind as transformers' cache names it (``full_attention``, ``sliding_attention``,
    ``linear_attention``, ``hybrid`` ...), from what the config says: ``layer_types``, else 4.x's
    ``layers_block_type``, Nemotron-H's ``hybrid_override_pattern``, Bamba's ``attn_layer_indices``, Jamba's
    ``attn_layer_period`` + ``attn_layer_offset``; a config with a state size and no attention heads
    (Mamba) is state-space throughout."""
    for name in ("layer_types", "layers_block_type"):
        types = getattr(tc, name, None)
        if isinstance(types, (list, tuple)) and layer < len(types):
            return _LEGACY_TYPES.get(str(types[layer]), str(types[layer]))
    pattern = getattr(tc, "hybrid_override_pattern", None)
    if isinstance(pattern, str) and layer < len(pattern):
        return _PATTERN.get(pattern[layer], "full_attention")
    indices = getattr(tc, "attn_layer_indices", None)
    if isinstance(indices, (list, tuple)):
        return "full_attention" if layer in indices else "linear_attention"
    period, offset = getattr(tc, "attn_layer_period", None), getattr(tc, "attn_layer_offset", None)
    if isinstance(period, int) and period > 0 and isinstance(offset, int):
        return "full_attention" if layer % period == offset else "linear_attention"
    if _first(tc, _D_STATE) is not None and _own(tc, "num_attention_heads") is None:
        return "linear_attention"  # (Mamba-2's ``num_heads`` are its scan's heads: not an alias here)
    return "full_attention"


def layer_caches(tc, layer: int) -> tuple[bool, bool]:
    """Does layer ``layer`` keep (KV that grows with the sequence, a fixed-size state)? Asked of the cache
    class transformers gives the layer's kind (``DYNAMIC_LAYER_TYPE_MAPPING``) where it has one."""
    kind = layer_type(tc, layer)
    try:
        from transformers import cache_utils

        cls = cache_utils.DYNAMIC_LAYER_TYPE_MAPPING.get(kind)
        if cls is not None:
            return issubclass(cls, cache_utils.DynamicLayer), issubclass(
                cls, cache_utils.LinearAttentionCacheLayerMixin
            )
    except (ImportError, AttributeError):  # transformers 4.x: no such classes
        pass
    return _KINDS.get(kind, (True, False))


def state_bytes(tc, layer: int, dtype_bytes: int) -> int:
    """Bytes layer ``layer`` keeps per sequence at any length: its conv state (the last kernel-width
    inputs of its causal convolution, model dtype) and its recurrent state (float32). Mamba: conv over
    the inner width, state inner x d_state; Mamba-2 (groups): the conv also carries B and C
    (2 x groups x d_state); Gated DeltaNet (Qwen3-Next): conv over q, k, v, state per value head
    key dim x value dim; LFM2's short conv: hidden x its cache length, no recurrent state."""
    if not layer_caches(tc, layer)[1]:
        return 0
    delta = _delta_rule(tc)
    if delta is not None:  # Gated DeltaNet, Kimi delta attention
        key_heads, value_heads, dk, dv = delta
        conv = (2 * key_heads * dk + value_heads * dv) * tc.linear_conv_kernel_dim
        return conv * dtype_bytes + value_heads * dk * dv * _STATE_BYTES
    d_state, d_conv = _first(tc, _D_STATE), _first(tc, _D_CONV)
    if d_state is not None and d_conv is not None:
        inner = mamba_inner(tc)
        groups = _first(tc, _GROUPS)
        conv_dim = inner + 2 * groups * d_state if groups else inner
        # transformers 4.x's Mamba caches hold the recurrent state in the model's dtype
        recurrent = _STATE_BYTES if compat.major() >= 5 else dtype_bytes
        return conv_dim * d_conv * dtype_bytes + inner * d_state * recurrent
    if getattr(tc, "conv_L_cache", None) is not None:  # LFM2
        return tc.hidden_size * tc.conv_L_cache * dtype_bytes
    raise configs.MissingConfigValue(
        f"layer {layer} of the model keeps a {layer_type(tc, layer)} state whose size its config does not "
        f"give (looked for {', '.join(_D_STATE)} with {', '.join(_D_CONV)}, or linear_key_head_dim); "
        "fitmap cannot size this model from its config: report it with the model's config.json"
    )


def _delta_rule(tc) -> tuple[int, int, int, int] | None:
    """(key heads, value heads, key dim, value dim) of a delta-rule linear attention: Gated DeltaNet
    (Qwen3-Next, Qwen3.5) names them apart; Kimi delta attention (GLM-5-Next) one head count and dim for
    q, k and v. None for other layers."""
    if getattr(tc, "linear_key_head_dim", None) is not None:
        return tc.linear_num_key_heads, tc.linear_num_value_heads, tc.linear_key_head_dim, tc.linear_value_head_dim
    heads, dim = getattr(tc, "linear_num_heads", None), getattr(tc, "linear_head_dim", None)
    if isinstance(heads, int) and isinstance(dim, int) and getattr(tc, "linear_conv_kernel_dim", None):
        return heads, heads, dim, dim
    return None


def mamba_inner(tc) -> int:
    """The width a Mamba mixer scans: Falcon-H1's ``mamba_d_ssm``, heads x head dim where the config
    names them (Granite, Nemotron-H), else ``expand`` x hidden size."""
    if getattr(tc, "mamba_d_ssm", None):
        return int(tc.mamba_d_ssm)
    for heads, dim in (("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim")):
        h, d = getattr(tc, heads, None), getattr(tc, dim, None)
        if isinstance(h, int) and isinstance(d, int):
            return h * d
    expand = _first(tc, ("mamba_expand", "expand"))
    return int((expand if expand is not None else tc.mamba_expand) * tc.hidden_size)


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


def _block_act(tc, layer: int, tokens: int, ctx_tokens: int, batch: int, b: int) -> int:
    """Peak bytes inside one decoder block: residual in/out plus the largest of its mixers (attention,
    a state-space scan: a hybrid layer runs both, one after the other) and its MLP."""
    kv, state = layer_caches(tc, layer)
    mixers = [_attention_act(tc, tokens, ctx_tokens, batch, b)] if kv else []
    if state:
        mixers.append(_state_act(tc, tokens, b))
    return 2 * tokens * tc.hidden_size * b + max([*mixers, _mlp_act(tc, tokens, b)])


def _attention_act(tc, tokens: int, ctx_tokens: int, batch: int, b: int) -> int:
    """``tokens`` are the query tokens of the whole batch, ``ctx_tokens`` the keys.
    Fused kernels (sdpa, flash) keep no score matrix; eager attention (Gemma-2's
    soft-capping has no fused path in transformers) holds batch x heads x T x S
    scores, upcast to fp32 for the softmax."""
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
    return attn


def _mlp_act(tc, tokens: int, b: int) -> int:
    h = tc.hidden_size
    inter = int(_widest(getattr(tc, "intermediate_size", 4 * h)))
    experts_per_tok = getattr(tc, "num_experts_per_tok", None)
    if experts_per_tok:  # per-modality values (ERNIE-4.5-VL's text and vision experts) count at their largest
        moe_inter = _widest(getattr(tc, "moe_intermediate_size", None) or inter)
        n_experts: Any = _widest(  # config value
            getattr(tc, "num_local_experts", None)
            or getattr(tc, "n_routed_experts", None)
            or getattr(tc, "moe_num_experts", None)
            or 1
        )
        mlp = tokens * (3 * moe_inter * experts_per_tok + n_experts * 4 + h * experts_per_tok) * b
        return max(mlp, tokens * 3 * inter * b)  # dense layers of a mostly-MoE model
    return tokens * 3 * inter * b


def _state_act(tc, tokens: int, b: int) -> int:
    """Peak inside a state-space mixer, as transformers' PyTorch scans run it (what runs without the
    mamba-ssm / fla kernels): Mamba discretises A, B and B.x for every token and state entry (float32);
    Mamba-2 and Gated DeltaNet scan in chunks, holding per-chunk position x position weights per head."""
    delta = _delta_rule(tc)
    if delta is not None:  # Gated DeltaNet, Kimi delta attention: chunks of 64
        key_heads, heads, dk, dv = delta
        qk, v = key_heads * dk, heads * dv
        # float32 copies of q, k (repeated to the value heads) and v through the chunked delta rule, and
        # the per-chunk position x position decays and attention per head
        scan = 4 * (2 * heads * dk + v) + 4 * 64 * heads
        return tokens * ((2 * qk + 2 * v) * b + scan * 4)
    d_state = _first(tc, _D_STATE)
    if d_state is None:  # LFM2's short conv: projections only
        return tokens * 4 * tc.hidden_size * b
    inner = mamba_inner(tc)
    groups = _first(tc, _GROUPS)
    if not groups:  # Mamba-1
        return tokens * (4 * inner * b + 3 * inner * d_state * 4)
    heads = _first(tc, ("mamba_n_heads", "mamba_num_heads", "n_mamba_heads", "num_heads")) or 1
    chunk = _first(tc, ("mamba_chunk_size", "chunk_size")) or 256
    proj = 2 * inner + 2 * groups * d_state + heads
    return tokens * (2 * proj * b + (4 * inner + 3 * heads * d_state + 3 * chunk * heads) * 4)


def _widest(value) -> int | float:
    """A width given per stage (a list) counts at its largest."""
    return max(value) if isinstance(value, (list, tuple)) else value


def _vision_act(config, images: list[ImageShape], batch: int, b: int) -> int:
    """Peak inside one vision block, all images of the batch at once."""
    vc = configs.vision_config(config)
    hv = _widest(getattr(vc, "embed_dim", None) or vc.hidden_size)  # per stage in DaViT towers (Florence-2)
    inter = _widest(getattr(vc, "intermediate_size", None) or int(hv * _widest(getattr(vc, "mlp_ratio", 4))))
    patches = batch * sum(i.patches for i in images)
    return int(patches * (2 * hv + max(4 * hv, 2 * inter)) * b)


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
            kv = workload.batch * (
                peak_cached_tokens(tc, u.layer, seq, seq - workload.new) * kv_bytes_per_token(tc, u.layer, b)
                + state_bytes(tc, u.layer, b)
            )
            act = max(
                _block_act(tc, u.layer, prefill, prefill, workload.batch, b),
                _block_act(tc, u.layer, workload.batch, workload.batch * seq, workload.batch, b),
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
