"""Stage 3 — Profile: what each unit costs at a workload, in bytes.

One interface, two sources: :func:`estimate` (analytic, from config values) and the
simulator (measured on fake devices, ``fitmap.simulate``). The planner only reads
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

import math
from dataclasses import dataclass
from typing import Callable

from fitmap import configs
from fitmap.skeleton import Skeleton
from fitmap.workload import Workload

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class UnitCost:
    name: str
    weight_bytes: int
    kv_bytes: int
    act_bytes: int


@dataclass(frozen=True)
class Profile:
    method: str                      # "analytic" | "simulate"
    workload: Workload
    costs: tuple[UnitCost, ...]      # in skeleton unit order
    image_tokens: int                # per sequence, all images
    seq_len: int                     # prompt + image tokens + new
    boundary_bytes: int              # hidden state crossing a device boundary at prefill

    def cost(self, name: str) -> UnitCost:
        return next(c for c in self.costs if c.name == name)


# --------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageShape:
    tokens: int        # tokens the image adds to the text sequence
    patches: int       # sequence length through the vision tower (all tiles)
    tiles: int         # separate vision passes (batch of the tower)


# Pixel limits of the Qwen-VL families' published preprocessor_config.json (size.shortest_edge and
# size.longest_edge, in pixels), for a config that comes without its processor's files.
QWEN_PIXELS = {"qwen2_vl": (56 * 56, 12845056), "qwen2_5_vl": (56 * 56, 12845056),
               "qwen3_vl": (65536, 16777216), "qwen3_vl_moe": (65536, 16777216)}


def qwen_pixel_limits(cfg) -> tuple[int, int]:
    """(min, max) pixels an image is resized between: the model's image processor settings when
    known (its files, or the catalog's copy), else its family's published ones."""
    lo, hi = QWEN_PIXELS.get(configs.model_type(cfg), QWEN_PIXELS["qwen2_vl"])
    proc = configs.image_processor_config(cfg) or {}
    size = proc.get("size") if isinstance(proc.get("size"), dict) else {}
    lo = size.get("shortest_edge") or proc.get("min_pixels") or lo
    hi = size.get("longest_edge") or proc.get("max_pixels") or hi
    return int(lo), int(hi)


def _qwen2_vl(cfg, w: int, h: int) -> ImageShape:
    vc = configs.vision_config(cfg)
    patch, merge = vc.patch_size, vc.spatial_merge_size
    factor = patch * merge
    min_px, max_px = qwen_pixel_limits(cfg)
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_px:
        beta = math.sqrt(h * w / max_px)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_px:
        beta = math.sqrt(min_px / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    patches = (hb // patch) * (wb // patch)
    return ImageShape(patches // (merge * merge), patches, 1)


# Longest edge Mistral 3 (Pixtral) images are scaled within: Mistral-Small-3.1's published
# preprocessor_config.json, for a config without its processor's files.
PIXTRAL_LONGEST_EDGE = 1540


def _pixtral(cfg, w: int, h: int) -> ImageShape:
    """Mistral 3: scaled (floor) to fit the longest edge, padded up to whole patches; one token per
    2x2 merged patches, a break token ending each row (text, counted in the prompt)."""
    vc = configs.vision_config(cfg)
    proc = configs.image_processor_config(cfg) or {}
    longest = (proc.get("size") or {}).get("longest_edge") or PIXTRAL_LONGEST_EDGE
    step = proc.get("patch_size") or vc.patch_size
    step = step["height"] if isinstance(step, dict) else step
    ratio = max(h / longest, w / longest)
    if ratio > 1:
        h, w = int(math.floor(h / ratio)), int(math.floor(w / ratio))
    hb, wb = -(-h // step) * step, -(-w // step) * step
    merged = vc.patch_size * getattr(cfg, "spatial_merge_size", 1)
    return ImageShape((hb // merged) * (wb // merged), (hb // vc.patch_size) * (wb // vc.patch_size), 1)


def _glm4v(cfg, w: int, h: int) -> ImageShape:
    """GLM-4.1V: its image processor's own resize rule (transformers' ``smart_resize`` for GLM-4V, an
    image being two identical frames) and pixel limits; one token per 2x2 merged patches."""
    from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize

    vc = configs.vision_config(cfg)
    proc = configs.image_processor_config(cfg) or {}
    size = proc.get("size") if isinstance(proc.get("size"), dict) else {}
    patch, merge, frames = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    hb, wb = smart_resize(frames, h, w, temporal_factor=frames, factor=patch * merge,
                          min_pixels=size.get("shortest_edge", GLM4V_PIXELS[0]),
                          max_pixels=size.get("longest_edge", GLM4V_PIXELS[1]))
    patches = (hb // patch) * (wb // patch)
    return ImageShape(patches // (merge * merge), patches, 1)


# GLM-4.1V's image processor defaults (size.shortest_edge, size.longest_edge), for a config without files.
GLM4V_PIXELS = (112 * 112, 28 * 28 * 15000)


def _internvl(cfg, w: int, h: int) -> ImageShape:
    """Dynamic tiling: the grid (i x j <= 12 tiles) closest to the aspect ratio, plus a thumbnail."""
    vc = configs.vision_config(cfg)
    size = getattr(cfg, "force_image_size", None) or vc.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    best = _closest_grid(w, h, size, int(getattr(cfg, "max_dynamic_patch", None) or 12))
    thumbnail = getattr(cfg, "use_thumbnail", True) is not False
    tiles = best[0] * best[1] + (1 if thumbnail and best[0] * best[1] > 1 else 0)
    per_tile = (size // patch) ** 2
    ratio = getattr(cfg, "downsample_ratio", 0.5)
    return ImageShape(tiles * int(per_tile * ratio * ratio), tiles * (per_tile + 1), tiles)


def _closest_grid(w: int, h: int, size: int, max_tiles: int = 12) -> tuple[int, int]:
    """InternVL's rule: the closest aspect ratio; on a tie, the larger grid if the image is big enough."""
    grids = sorted({(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1) if i * j <= max_tiles},
                   key=lambda g: g[0] * g[1])
    aspect, best, best_diff = w / h, (1, 1), float("inf")
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff or (diff == best_diff and w * h > 0.5 * size * size * i * j):
            best, best_diff = (i, j), diff
    return best


def _cogvlm(cfg, w: int, h: int) -> ImageShape:
    """CogVLM2: resized to the tower's square; a 2x2 conv halves the grid; boi and eoi around it."""
    vc = configs.vision_config(cfg)
    grid = vc.image_size // vc.patch_size
    return ImageShape((grid // 2) ** 2 + 2, grid * grid + 1, 1)


# tokens per image where a config declares them (the projector pools the tower's grid to this many)
DECLARED_IMAGE_TOKENS = ("mm_tokens_per_image", "image_seq_length", "num_image_tokens")


def _fixed_size(cfg, w: int, h: int) -> ImageShape:
    """LLaVA-style: the image is resized to the tower's square input; it adds the tower's grid of
    tokens, or the count the config declares (Gemma 3's ``mm_tokens_per_image``: 256 pooled from
    64 x 64 patches)."""
    vc = configs.vision_config(cfg)
    grid = (vc.image_size // vc.patch_size) ** 2
    declared = next((getattr(cfg, k) for k in DECLARED_IMAGE_TOKENS if isinstance(getattr(cfg, k, None), int)), None)
    return ImageShape(declared or grid, grid + 1, 1)


def _llava_shape(cfg, w: int, h: int) -> ImageShape:
    """LLaVA: the projector keeps every patch of the tower's square (and the CLS position with the
    "full" feature strategy). Its ``image_seq_length`` is a class default, not always the tower's."""
    vc = configs.vision_config(cfg)
    grid = (vc.image_size // vc.patch_size) ** 2
    full = getattr(cfg, "vision_feature_select_strategy", "default") == "full"
    return ImageShape(grid + (1 if full else 0), grid + 1, 1)


def _idefics3(cfg, w: int, h: int) -> ImageShape:
    """Idefics3 / SmolVLM: the tiles its own image processor cuts (``fitmap.vision_inputs``)."""
    from fitmap.vision_inputs import idefics3_shape

    return idefics3_shape(cfg, w, h)


def _onevision(cfg, w: int, h: int) -> ImageShape:
    """LLaVA-OneVision: the tiles and token count of its own processor (``fitmap.vision_inputs``)."""
    from fitmap.vision_inputs import onevision_shape

    return onevision_shape(cfg, w, h)


def _llama4(cfg, w: int, h: int) -> ImageShape:
    """Llama 4: tiles of the tower's square on the canvas its image processor picks (the grid of at most
    ``max_patches`` tiles needing the least upscaling, else the least downscaling; the smallest on a
    tie), plus a global tile when there are several; each tile pixel-shuffled to a quarter."""
    vc = configs.vision_config(cfg)
    side = vc.image_size
    proc = configs.image_processor_config(cfg) or {}
    max_tiles = int(proc.get("max_patches") or LLAMA4_MAX_TILES)
    canvases = sorted({(a * side, n // a * side) for n in range(1, max_tiles + 1) for a in range(1, n + 1)
                       if n % a == 0})
    scales = [min(ch / h, cw / w) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    _, ch, cw = min((ch * cw, ch, cw) for (ch, cw), s in zip(canvases, scales) if s == chosen)
    grid = (ch // side) * (cw // side)
    tiles = grid + (1 if grid > 1 else 0)
    per_tile = (side // vc.patch_size) ** 2
    ratio = getattr(vc, "pixel_shuffle_ratio", 0.5)
    return ImageShape(tiles * int(per_tile * ratio * ratio), tiles * per_tile, tiles)


LLAMA4_MAX_TILES = 16    # Llama 4's published preprocessor_config.json (max_patches)


IMAGE_SHAPES: dict[str, Callable] = {
    "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_vl, "qwen3_vl": _qwen2_vl, "qwen3_vl_moe": _qwen2_vl,
    "internvl": _internvl, "mistral3": _pixtral, "glm4v": _glm4v, "idefics3": _idefics3, "smolvlm": _idefics3,
    "llava_onevision": _onevision, "llama4": _llama4,
    "llava": _llava_shape, "internvl_chat": _internvl, "CogVLMForCausalLM": _cogvlm,
}


def image_shape(config, w: int, h: int) -> ImageShape:
    fn = IMAGE_SHAPES.get(configs.model_type(config), _fixed_size)
    return fn(config, w, h)


# --------------------------------------------------------------------------- costs
def text_config(config):
    """The text model's config under any of the names model code uses (:mod:`fitmap.configs`)."""
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
        attn = batch * ctx_tokens * heads * (tc.qk_nope_head_dim + tc.qk_rope_head_dim + tc.v_head_dim) * b \
            + tokens * heads * (tc.qk_nope_head_dim + tc.qk_rope_head_dim) * b * 2
    inter = getattr(tc, "intermediate_size", 4 * h)
    experts_per_tok = getattr(tc, "num_experts_per_tok", None)
    if experts_per_tok:
        moe_inter = getattr(tc, "moe_intermediate_size", None) or inter
        n_experts = getattr(tc, "num_local_experts", None) or getattr(tc, "n_routed_experts", 1)
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
            kv = workload.batch * peak_cached_tokens(tc, u.layer, seq, seq - workload.new) \
                * kv_bytes_per_token(tc, u.layer, b)
            act = max(_block_act(tc, prefill, prefill, workload.batch, b),
                      _block_act(tc, workload.batch, workload.batch * seq, workload.batch, b))
        elif u.kind == "vision" and images and u.numel > 0:
            act = _vision_act(cfg, images, workload.batch, b)
        elif u.kind == "input" and u.numel > 0:
            act = 2 * prefill * h * b
        elif u.kind == "output" and u.numel > 0:
            # generate() asks for the last position's logits only; they are upcast to fp32
            act = prefill * h * b + workload.batch * vocab * (b + 4 + 4)
        costs.append(UnitCost(u.name, u.weight_bytes, kv, act))
    return Profile("analytic", workload, tuple(costs), img_tokens, seq, prefill * h * b)
