"""Coverage of the installed transformers' model types, at tiny size, as a user runs them.

For every model type in transformers' causal-LM mapping and image-text-to-text mapping: a tiny
random-weight checkpoint of the type's own config, then

  1. reference: ``AutoModelFor...from_pretrained(dir)``, greedy ``generate`` of ``--new`` tokens on
     fixed input ids (a type whose reference fails is left out of the percentages);
  2. ``fitmap plan DIR --gpus 2x<size>`` (each GPU 60 % of the checkpoint, so the model splits over
     both; more where fitmap says it needs more): did it simulate, or fall back to
     ``analytic (simulation failed: ...)``;
  3. ``fitmap check DIR --plan p.json``: clean or not;
  4. ``fitmap plan DIR --cpu ... --disk ... --pin BLOCK=disk`` (the text model's first and last
     blocks on disk: two layers alone are never worth streaming), loaded with
     ``fitmap.runtime.loader`` and generated from (random checkpoints have no tokenizer for
     ``fitmap run``): the tokens compared with the reference's;
  5. image-text-to-text types: ``fitmap plan ... --image 64x48`` simulated or not, and its check;
     beside it whether the model's own forward takes those image inputs on the CPU.

Tiny configs come from the config class's own defaults, shrunk (layers, widths, heads, experts,
vision tower, vocabulary down to the special token ids), or with ``--tests DIR`` from transformers'
model tests (``tests/models/<type>/test_modeling_<type>.py``'s ModelTester), a source checkout of
the installed release (``git clone --depth 1 -b vX.Y.Z https://github.com/huggingface/transformers``).
Each type runs in its own process with a time-out. Not a test; it takes a while (hours for all):

    .venv/bin/python bench/zoo.py --out zoo.md
    .venv/bin/python bench/zoo.py --types llama,qwen2_vl,mamba --out zoo.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

PROMPT = 16  # fixed input ids per sequence (and --prompt of the plans)
IMAGE = "64x48"
GPU_SHARE = 0.6  # each GPU's size as a share of the checkpoint's bytes (more where fitmap says it needs more)
CPU_SHARE = 1.0  # --cpu of the cpu + disk plan, as a share of the checkpoint's bytes; where that is too
# little, the --cpu fitmap's advice names (streaming a unit from disk needs room for it on the CPU)

# ---------------------------------------------------------------------------------------------
# Tiny configs: the config class's defaults, shrunk


D = 64  # every hidden width (text, vision, projector): widths between towers stay consistent
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
FF, MOE_FF = 128, 32
EXPERTS, TOP_K = 4, 2
LAYERS, MAX_LAYERS = 2, 4  # at least 2 layers; up to 4 to keep one layer of each kind
VOCAB = 512
MAX_PARAMS = 200_000_000  # a tiny config with more than this was not shrunk: refused
GRID = 4  # a vision tower's image is GRID x GRID patches

LAYER_KEYS = {
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "n_layers",
    "depth",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
    "num_encoder_layers",
    "layers",
    "resampler_depth",
    "decoder_num_layers",
    "num_global_layers",
    "text_layers",
    "vision_layers",
}
HIDDEN_KEYS = {
    "hidden_size",
    "d_model",
    "n_embd",
    "n_embed",
    "embed_dim",
    "emb_dim",
    "hidden_dim",
    "dim",
    "word_embed_proj_dim",
    "out_hidden_size",
    "projection_dim",
    "projector_hidden_size",
    "projector_input_dim",
    "projector_output_dim",
    "projection_hidden_dim",
    "text_hidden_size",
    "vision_hidden_size",
    "encoder_hidden_size",
    "vision_output_dim",
    "mm_hidden_size",
    "image_text_hidden_size",
    "attention_hidden_size",
    "hidden_size_global",
    "embedding_size",
    "decoder_hidden_size",
    "downsample_hidden_size",
    "adapter_in_dim",
    "adapter_out_dim",
    "output_dim",
}
HEAD_KEYS = {
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_heads",
    "attention_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "resampler_n_heads",
    "linear_num_heads",
    "swa_num_attention_heads",
    "linear_num_value_heads",
}
KV_HEAD_KEYS = {
    "num_key_value_heads",
    "swa_num_key_value_heads",
    "multi_query_group_num",
    "num_kv_heads",
    "n_kv_heads",
    "linear_num_key_heads",
    "decoder_attention_num_groups",
}
HEAD_DIM_KEYS = {
    "head_dim",
    "kv_channels",
    "attention_head_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_head_dim",
    "swa_head_dim",
    "index_head_dim",
    "resampler_head_dim",
    "d_kv",
    "d_head",
    "dim_head",
    "v_head_dim",
}
MLA = {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}
FF_KEYS = {"d_ff", "dff", "dim_ff", "n_inner", "mlp_dim", "ffn_hidden_size"}
EXPERT_KEYS = {
    "num_experts",
    "n_routed_experts",
    "num_local_experts",
    "moe_num_experts",
    "num_routed_experts",
    "n_experts",
}
TOP_K_KEYS = {
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_k",
    "moe_topk",
    "top_k",
    "num_selected_experts",
    "router_topk",
    "moe_top_k",
}
VISION_LAYER_REFS = ("vision_feature_layer", "vision_feature_layers", "select_layer", "mm_vision_select_layer")
IMAGE_TOKEN_COUNTS = ("num_image_tokens", "image_seq_length", "mm_tokens_per_image", "image_token_len")
DEFAULT_KEYS = {  # PretrainedConfig's own fields: never shrunk
    "id2label",
    "label2id",
    "transformers_version",
    "architectures",
    "_name_or_path",
    "model_type",
    "dtype",
}


def _is_config(key: str, value: Any) -> bool:
    if not isinstance(value, dict) or _per_layer(value):
        return False
    return "model_type" in value or key.endswith("_config")


def _per_layer(value: Any) -> bool:
    """A dict of per-layer overrides keyed by layer index ({"02": {...}})."""
    return isinstance(value, dict) and bool(value) and all(str(x).isdigit() for x in value)


def special_ids(d: dict) -> list[int]:
    """Every special token id in a config tree (image, video, audio, bos/eos/pad, ...)."""
    found: list[int] = []
    for k, v in d.items():
        if not isinstance(k, str) or k in DEFAULT_KEYS:
            continue
        if isinstance(v, dict):
            found += special_ids(v)
        elif re.search(r"token_(id|index|ids)$|_token$", k):
            vals = v if isinstance(v, list) else [v]
            found += [x for x in vals if isinstance(x, int) and not isinstance(x, bool) and x >= 0]
    return found


def shrink(config_dict: dict) -> dict:
    """A tiny, self-consistent version of a config tree (``PretrainedConfig.to_dict()``)."""
    d = copy.deepcopy(config_dict)
    top = max(special_ids(d), default=-1) + 1
    for k in ("image_token_index", "image_token_id"):  # left to the processor (BLIP-2): give it one
        if k in d and d[k] is None and top <= VOCAB - 1:
            d[k] = VOCAB - 1
    widths = {D: _values(d, lambda k: k in HIDDEN_KEYS), FF: _values(d, lambda k: k == "intermediate_size")}
    if _values(d, lambda k: k.endswith("token_offset")):  # token ranges (codebooks) past the offsets: keep
        top = max(_values(d, lambda k: "vocab_size" in k))
    _shrink(d, max(VOCAB, top), widths)
    _vision_refs(d)
    return d


def _values(d: dict, key) -> set[int]:
    """The int values of the keys ``key`` accepts, anywhere in a config tree."""
    found: set[int] = set()
    for k, v in d.items():
        if isinstance(v, dict):
            found |= _values(v, key)
        elif isinstance(k, str) and key(k) and isinstance(v, int) and not isinstance(v, bool) and v > 0:
            found.add(v)
    return found


# keys that never hold a width, though they may equal one
NOT_A_WIDTH = re.compile(
    r"position|vocab|token|window|length|rate|max|seq|chunk|bucket|_id|size_per|period|theta|scale"
)


def _shrink(d: dict, vocab: int, widths: dict[int, set[int]]) -> dict:
    old = copy.deepcopy(d)
    for k, v in list(d.items()):
        if _is_config(k, v):
            _shrink(v, vocab, widths)
    _layers(d)
    for k, v in list(d.items()):
        if k in DEFAULT_KEYS or isinstance(v, bool):
            continue
        if isinstance(v, dict) and not _is_config(k, v) and k not in ("rope_parameters", "rope_scaling"):
            if _per_layer(v):
                for inner in v.values():
                    if isinstance(inner, dict):
                        _widths(inner, vocab)
            continue
        _width(d, k, v, vocab)
        # a width the rules do not know by name, equal to one of the tree's hidden or FF sizes
        # (an adapter's input = the encoder's hidden size): it follows that size
        if d[k] == v and isinstance(v, int) and not NOT_A_WIDTH.search(k):
            for to, olds in widths.items():
                if v > to and v in olds:
                    d[k] = to
                    break
    _consistency(d, old)
    return d


def _widths(d: dict, vocab: int) -> None:
    for k, v in list(d.items()):
        if not isinstance(v, bool):
            _width(d, k, v, vocab)


def _small(v: Any, to: int) -> Any:
    """``v`` (an int or a list of ints) made at most ``to``."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return min(v, to) if v > 0 else v
    if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return [min(x, to) if x > 0 else x for x in v]
    return v


def _width(d: dict, k: str, v: Any, vocab: int) -> None:
    if k in MLA and isinstance(v, int):
        d[k] = min(v, MLA[k])
    elif k in HEAD_DIM_KEYS or k.endswith("_head_dim") or k.endswith("_d_head"):
        d[k] = _small(v, HEAD_DIM)
    elif k in HIDDEN_KEYS or (k.endswith("hidden_size") and "intermediate" not in k):
        d[k] = _small(v, D)
    elif k in ("index_n_heads", "index_num_heads"):  # at most the query heads that share a key head
        d[k] = _small(v, HEADS // KV_HEADS)
    elif k in KV_HEAD_KEYS or k.endswith("key_value_heads"):
        d[k] = _small(v, KV_HEADS)
    elif k in HEAD_KEYS or k.endswith("_n_heads") or k.endswith("_num_heads"):
        d[k] = _small(v, HEADS)
    elif "intermediate" in k or "ffn" in k or k in FF_KEYS:
        d[k] = _small(v, MOE_FF if ("moe" in k or "expert" in k or "shared" in k) else FF)
    elif k in EXPERT_KEYS:
        d[k] = _small(v, EXPERTS)
    elif k in TOP_K_KEYS:
        d[k] = _small(v, TOP_K)
    elif k in ("n_group", "num_expert_group"):
        d[k] = _small(v, 2)
    elif k == "topk_group":
        d[k] = _small(v, 1)
    elif k in ("n_shared_experts", "num_shared_experts"):
        d[k] = _small(v, 1)
    elif "vocab_size" in k and isinstance(v, int) and v > VOCAB:
        d[k] = vocab
    elif k in ("laurel_rank", "loop_gate_rank", "hc_lowrank", "gated_norm_rank", "o_lora_rank") or (
        "per_layer" in k and "hidden" in k
    ):
        d[k] = _small(v, 8)
    elif k == "axial_pos_embds_dim" and isinstance(v, list):  # Reformer: they sum to the hidden size
        d[k] = _split(D, v)
    elif k in ("hidden_sizes", "embed_dims") and isinstance(v, list) and v and all(isinstance(x, int) for x in v):
        top = max(v)  # widths per stage: the last one D, the others in proportion
        d[k] = [max(8, x * D // top) for x in v] if top > D else v
    elif k == "depths":
        d[k] = _small(v, 1)
    elif k == "base_channels":
        d[k] = _small(v, 32)
    elif k in ("num_query_tokens", "resampler_n_latents", "latent_query_num"):
        d[k] = _small(v, 8)


def _layers(d: dict) -> None:
    """Layer counts down to 2-4, keeping one layer of each kind; per-layer lists and layer indices
    follow the layers kept."""
    for key in [k for k in LAYER_KEYS if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)]:
        n = d[key]
        for k in ("attn_layer_indices", "attention_layer_indices"):  # none: all SSM, which some cannot run
            if k in d and d[k] is None:
                d[k] = [min(n, LAYERS) - 1]
        if n <= LAYERS:
            continue
        per_layer = {k: v for k, v in d.items() if isinstance(v, list) and len(v) == n and k not in DEFAULT_KEYS}
        indices = {
            k: v
            for k, v in d.items()
            if isinstance(v, list)
            and k not in per_layer
            and v
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n for x in v)
            and re.search(r"layer|index|indexes|indices|block", k)
        }
        keep = {0}
        for v in per_layer.values():
            if len({json.dumps(x, sort_keys=True) for x in v}) > MAX_LAYERS:
                continue  # per-layer sizes or layer references, not kinds of layer
            seen: set = set()
            for i, x in enumerate(v):
                marker = json.dumps(x, sort_keys=True)
                if marker not in seen:
                    seen.add(marker)
                    keep.add(i)
        keep |= {min(v) for v in indices.values()}
        new_n = min(n, max(LAYERS, min(len(keep), MAX_LAYERS)))
        chosen = sorted(keep)[:new_n]
        chosen += [i for i in range(n) if i not in chosen][: new_n - len(chosen)]
        chosen.sort()
        for k, v in list(d.items()):  # a pattern cycled over the layers (RecurrentGemma's block_types)
            if (
                k.endswith("types")
                and isinstance(v, list)
                and LAYERS < len(v) < n
                and all(isinstance(x, str) for x in v)
            ):
                d[k] = list(dict.fromkeys(v)) + [x for i, x in enumerate(v) if x in v[:i]]
        d[key] = new_n
        if isinstance(d.get("num_layers_per_stack"), int):  # HRM: counted again from num_hidden_layers
            d["num_layers_per_stack"] = None
        for k, v in per_layer.items():
            d[k] = [v[i] for i in chosen]
            refs = all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n for x in v)
            if refs and "layer" in k and sum(x == i for i, x in enumerate(v)) * 2 >= n:
                # layer references (the layer whose KV a layer reads): to the kept layers' new indices
                d[k] = [chosen.index(v[i]) if v[i] in chosen else j for j, i in enumerate(chosen)]
        for k, v in indices.items():
            mapped = [chosen.index(x) for x in v if x in chosen]
            d[k] = mapped or [new_n - 1]
        for k, v in list(d.items()):  # per-layer dicts keyed by layer index ("02": {...})
            if isinstance(v, dict) and v and all(str(x).isdigit() for x in v):
                d[k] = {
                    str(chosen.index(int(x))).zfill(len(str(x))): inner for x, inner in v.items() if int(x) in chosen
                }
        for k, v in list(d.items()):
            if isinstance(v, bool) or not isinstance(v, int):
                continue
            if k.endswith("_period") and v > new_n:
                d[k] = new_n
            elif k.endswith("_offset") and "layer" in k and v >= new_n:
                d[k] = new_n - 1
            elif k in ("first_k_dense_replace", "num_kv_shared_layers") and v >= new_n:
                d[k] = 1
            elif k in ("max_window_layers",) and v > new_n:
                d[k] = new_n


def _split(total: int, parts: list[int]) -> list[int]:
    """``total`` split in proportion to ``parts``, each at least 1 (largest remainders first)."""
    s = sum(parts)
    raw = [p * total / s for p in parts]
    out = [max(1, int(r)) for r in raw]
    while sum(out) < total:
        i = max(range(len(out)), key=lambda j: raw[j] - out[j])
        out[i] += 1
    while sum(out) > total:
        i = max((j for j in range(len(out)) if out[j] > 1), key=lambda j: out[j] - raw[j])
        out[i] -= 1
    return out


def _head_dim(d: dict) -> int | None:
    if isinstance(d.get("head_dim"), int) and d["head_dim"] > 0:
        return d["head_dim"]
    hidden = next((d[k] for k in ("hidden_size", "d_model", "n_embd", "embed_dim") if isinstance(d.get(k), int)), None)
    heads = next((d[k] for k in ("num_attention_heads", "n_head", "num_heads") if isinstance(d.get(k), int)), None)
    return hidden // heads if hidden and heads else None


def _consistency(d: dict, old: dict) -> None:
    """What must agree after the widths changed: rotary sections, MLA's head dims, SSM heads, the
    vision tower's image and its token counts, layers referenced by index."""
    if "head_dim" in d and d["head_dim"] is None and _head_dim(d):  # derived: now named, as some code wants
        d["head_dim"] = _head_dim(d)
    hd_old, hd_new = _head_dim(old), _head_dim(d)
    ratio = hd_new / hd_old if hd_old and hd_new else 1.0
    if isinstance(old.get("qk_rope_head_dim"), int) and old["qk_rope_head_dim"] > 0 and d.get("qk_rope_head_dim"):
        ratio = d["qk_rope_head_dim"] / old["qk_rope_head_dim"]  # MLA: rotary sections are of the rope part
    if "qk_rope_head_dim" in d and isinstance(d.get("head_dim"), int):
        if old.get("head_dim") == old.get("qk_rope_head_dim"):
            d["head_dim"] = d["qk_rope_head_dim"]
        elif old.get("head_dim") == (old.get("qk_rope_head_dim") or 0) + (old.get("qk_nope_head_dim") or 0):
            d["head_dim"] = d["qk_rope_head_dim"] + d["qk_nope_head_dim"]
        if "qk_head_dim" in d:
            d["qk_head_dim"] = d["qk_rope_head_dim"] + d["qk_nope_head_dim"]
    elif "qk_head_dim" in d and "qk_rope_head_dim" in d:
        d["qk_head_dim"] = d["qk_rope_head_dim"] + d["qk_nope_head_dim"]
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        if isinstance(rope, dict):
            for r in [rope, *[v for v in rope.values() if isinstance(v, dict)]]:
                _rope(r, ratio)
    if isinstance(d.get("mrope_section"), list):
        d["mrope_section"] = _split(
            max(len(d["mrope_section"]), round(sum(d["mrope_section"]) * ratio)), d["mrope_section"]
        )
    if isinstance(d.get("rotary_dim"), int) and d["rotary_dim"] > 0:
        d["rotary_dim"] = max(2, int(d["rotary_dim"] * ratio) // 2 * 2)
    moe = any(isinstance(d.get(e), int) for e in EXPERT_KEYS | {"moe_intermediate_size"})
    for keys, value in ((EXPERT_KEYS, EXPERTS), (TOP_K_KEYS, TOP_K), ({"n_shared_experts"}, 1)):
        for k in keys:  # left unset in some defaults (DeepSeek-V2, dots1): a model with experts needs them
            if k in d and d[k] is None and moe:
                d[k] = value
    if d.get("default_language", 0) is None and isinstance(d.get("languages"), list) and d["languages"]:
        d["default_language"] = d["languages"][0]  # X-MOD: its forward needs one
    _same_heads(d, old)
    for kv in [k for k in d if k in KV_HEAD_KEYS and d[k] is None]:  # unset: as many as query heads
        heads = next((d[k] for k in ("num_attention_heads", "num_heads", "n_head") if isinstance(d.get(k), int)), None)
        if heads and kv in ("num_key_value_heads", "num_kv_heads"):
            d[kv] = heads
    sliding = "sliding" in json.dumps(d.get("layer_types")) or any("sliding" in k for k in d if k != "sliding_window")
    if d.get("sliding_window", 0) is None and sliding:
        d["sliding_window"] = 4096  # layers of sliding attention with no window set: one longer than the prompt
    for k, v in d.items():  # per-layer overrides ({"02": {...}}): the old entry of the same layer
        if isinstance(v, dict) and v and all(str(x).isdigit() for x in v) and isinstance(old.get(k), dict):
            first_old = next((o for o in old[k].values() if isinstance(o, dict)), {})
            for inner in v.values():
                if isinstance(inner, dict):
                    _same_heads(inner, first_old)
    _ssm(d)
    _vision(d, old)
    # sliding windows are kept: a 16-token prompt stays inside them, as a user's short prompt does


def _same_heads(d: dict, old: dict) -> None:
    """Multi-head attention stays multi-head: as many key/value heads as query heads."""
    for heads in [k for k in d if k in HEAD_KEYS]:
        for kv in [k for k in d if k in KV_HEAD_KEYS or k.endswith("key_value_heads")]:
            if old.get(kv) == old.get(heads) and isinstance(d[heads], int) and isinstance(d[kv], int):
                d[kv] = d[heads]


def _rope(r: dict, ratio: float) -> None:
    if isinstance(r.get("mrope_section"), list):
        sec = r["mrope_section"]
        r["mrope_section"] = _split(max(len(sec), round(sum(sec) * ratio)), sec)
    for k in ("short_factor", "long_factor"):
        if isinstance(r.get(k), list) and r[k]:
            r[k] = r[k][: max(1, round(len(r[k]) * ratio))]


def _ssm(d: dict) -> None:
    """Mamba-2 style heads: heads x head dim = expand x hidden; groups divide the heads."""
    hidden = d.get("hidden_size")
    ssm = any(k in d for k in ("state_size", "ssm_state_size", "mamba_d_state"))
    heads = next((k for k in ("mamba_num_heads", "mamba_n_heads") if isinstance(d.get(k), int)), None)
    if heads is None and ssm and isinstance(d.get("num_heads"), int):
        heads = "num_heads"
    head_dim = next((k for k in ("mamba_head_dim", "mamba_d_head", "head_dim") if isinstance(d.get(k), int)), None)
    expand = next((k for k in ("mamba_expand", "expand") if isinstance(d.get(k), (int, float))), None)
    if heads and head_dim and isinstance(hidden, int):
        d[head_dim] = min(d[head_dim], HEAD_DIM)
        if expand:
            d[heads] = max(1, int(d[expand] * hidden) // d[head_dim])
        if isinstance(d.get("mamba_d_ssm"), int):  # Falcon-H1: the SSM width, set apart from expand
            d["mamba_d_ssm"] = d[heads] * d[head_dim]
        for groups in ("n_groups", "mamba_n_groups"):
            if isinstance(d.get(groups), int) and d[heads] % d[groups]:
                d[groups] = math.gcd(d[heads], d[groups])
    for k in ("time_step_rank", "mamba_dt_rank", "dt_rank"):
        if isinstance(d.get(k), int) and not isinstance(d.get(k), bool) and d[k] > 8:
            d[k] = 8


def _vision(d: dict, old: dict) -> None:
    patch = d.get("patch_size")
    if isinstance(d.get("image_size"), (int, list)) and isinstance(patch, (int, list)):
        p = patch if isinstance(patch, int) else patch[0]
        if isinstance(p, int) and p > 0:
            d["image_size"] = GRID * p if isinstance(d["image_size"], int) else [GRID * p] * len(d["image_size"])
    for k in ("num_position_embeddings",):
        v = d.get(k)
        if isinstance(v, int) and v > GRID * GRID + 1:
            d[k] = GRID * GRID + (1 if math.isqrt(v - 1) ** 2 == v - 1 else 0)
    for k in ("pos_emb_height", "pos_emb_width", "posemb_grid_size"):
        if isinstance(d.get(k), int) and d[k] > GRID:
            d[k] = GRID
    if isinstance(d.get("num_patches"), int) and d["num_patches"] > GRID * GRID:
        d["num_patches"] = GRID * GRID
    if isinstance(d.get("pixel_shuffle_ratio"), float) and isinstance(d.get("hidden_size"), int):
        d["intermediate_size"] = int(d["hidden_size"] / d["pixel_shuffle_ratio"] ** 2)  # Llama 4's adapter input
    layers_out = d.get("intermediate_layers_indices")  # Mllama: the tower's output concatenates these layers
    if isinstance(layers_out, list) and isinstance(d.get("vision_output_dim"), int):
        if old.get("vision_output_dim") == old.get("hidden_size", 0) * (
            len(old.get("intermediate_layers_indices")) + 1
        ):
            d["vision_output_dim"] = d["hidden_size"] * (len(layers_out) + 1)
    vision = next((v for k, v in d.items() if "vision" in k and _is_config(k, v)), None)
    if vision is None:
        return
    old_vision = next((v for k, v in old.items() if "vision" in k and _is_config(k, v)), {})
    old_grid = _grid(old_vision)
    pins = d.get("image_grid_pinpoints")
    if isinstance(pins, list) and old_grid and _grid(vision):  # anyres tiles: multiples of the tower's image
        old_size, new_size = _size(old_vision), _size(vision)
        d["image_grid_pinpoints"] = [[x * new_size // old_size for x in p] for p in pins if isinstance(p, list)]
    for k in IMAGE_TOKEN_COUNTS:
        v = d.get(k)
        if isinstance(v, int) and v > GRID * GRID and old_grid:
            per_token = max(1, round(old_grid**2 / v))  # patches merged into one token
            d[k] = max(1, GRID * GRID // per_token)


def _size(vision: dict) -> int:
    size = vision.get("image_size")
    return size[0] if isinstance(size, list) else size


def _vision_refs(tree: dict) -> None:
    """Vision layers named by index (``vision_feature_layer``), wherever in the tree, within the
    tower's new depth."""
    towers = [c for k, c in _named_configs(tree) if "vision" in k]
    layers = next(
        (t[k] for t in towers for k in ("num_hidden_layers", "depth", "num_layers") if isinstance(t.get(k), int)), None
    )
    if not layers:
        return
    for c in _configs(tree):
        for k in VISION_LAYER_REFS:
            v = c.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                c[k] = max(-layers, min(v, layers - 1))
            elif isinstance(v, list):
                c[k] = [max(-layers, min(x, layers - 1)) if isinstance(x, int) else x for x in v]


def _named_configs(d: dict) -> list[tuple[str, dict]]:
    return [(k, c) for k, v in d.items() if _is_config(k, v) for c in [v]] + [
        kc for k, v in d.items() if _is_config(k, v) for kc in _named_configs(v)
    ]


def _grid(vision: dict) -> int | None:
    size, patch = vision.get("image_size"), vision.get("patch_size")
    size = size[0] if isinstance(size, list) else size
    patch = patch[0] if isinstance(patch, list) else patch
    return size // patch if isinstance(size, int) and isinstance(patch, int) and patch else None


def tiny_config(model_type: str):
    import transformers

    cls = transformers.CONFIG_MAPPING[model_type]
    base = cls().to_dict()
    tower = getattr(cls, "sub_configs", {}).get("vision_config")
    if kind_of(model_type) == "image-text-to-text" and base.get("vision_config") is None and tower is not None:
        base["vision_config"] = tower().to_dict()  # a VLM whose class defaults leave the tower out (Gemma 4)
    small = shrink(base)
    if kind_of(model_type) == "causal-lm" and "is_decoder" in small:
        small["is_decoder"] = True  # BERT-like encoders as causal LMs (BertLMHeadModel), as their docs say
    _code_defaults(small, model_type)
    _derived(small, model_type)
    _token_ids(small, model_type)
    return cls.from_dict(small)


def _token_ids(d: dict, model_type: str) -> None:
    """The special token ids the model's code reads from its config (``self.config.vision_start_token_id``)
    where the config class has no default for them (the published configs set them): ids from the top
    of the vocabulary, each its own."""
    vocab = next((c["vocab_size"] for c in _configs(d) if isinstance(c.get("vocab_size"), int)), None)
    if not vocab:
        return
    taken = {v for c in _configs(d) for k, v in c.items() if k.endswith("_token_id") and isinstance(v, int)}
    free = (i for i in range(vocab - 1, 0, -1) if i not in taken)
    for name in sorted(set(re.findall(r"self\.config\.(\w+_token_id)\b", _modeling_source(model_type)))):
        if d.get(name) is None:
            d[name] = next(free)


def _derived(d: dict, model_type: str) -> None:
    """Drop what a config computes from its fields (Zamba2's ``attention_hidden_size`` = 2 x hidden,
    DeepSeek-V3's ``qk_head_dim``): computed again from the shrunk fields, they agree with them."""
    import dataclasses

    import transformers

    base = set(transformers.PretrainedConfig().to_dict())
    for c in _configs(d):
        name = c.get("model_type") or model_type
        cls = transformers.CONFIG_MAPPING[name] if name in transformers.CONFIG_MAPPING else None
        if cls is None or not dataclasses.is_dataclass(cls):
            continue
        fields = {f.name for f in dataclasses.fields(cls)}
        for k in [k for k in c if k not in fields and k not in base and not k.startswith("_")]:
            if not isinstance(c[k], dict):
                del c[k]


def _code_defaults(d: dict, model_type: str) -> None:
    """Rotary sections the model's code supplies when the config has none (Qwen2-VL's
    ``rope_parameters.get("mrope_section", [16, 24, 24])``), made to fit the new head dim."""
    for c in _configs(d):
        rope = c.get("rope_parameters")
        if "vocab_size" not in c or not isinstance(rope, dict) or "rope_type" not in rope or "mrope_section" in rope:
            continue
        m = re.search(r"mrope_section[\"']\s*,\s*\[([\d,\s]+)\]", _modeling_source(c.get("model_type") or model_type))
        if m and _head_dim(c):
            default = [int(x) for x in m.group(1).split(",") if x.strip()]
            factor = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) or 1.0
            rope["mrope_section"] = _split(max(len(default), int(_head_dim(c) * factor) // 2), default)


def _configs(d: dict) -> list[dict]:
    """A config tree's configs, the top one first."""
    return [d] + [c for k, v in d.items() if _is_config(k, v) for c in _configs(v)]


def _modeling_source(model_type: str) -> str:
    """The text of the modeling file beside ``model_type``'s config class."""
    import transformers

    try:
        module = transformers.CONFIG_MAPPING[model_type].__module__.replace(".configuration_", ".modeling_")
        spec = importlib.util.find_spec(module)
        return Path(spec.origin).read_text() if spec and spec.origin else ""
    except (KeyError, ImportError, ValueError, OSError):
        return ""


def tester_config(tests: Path, model_type: str):
    """The config transformers' own model test builds (its ModelTester's ``get_config()``)."""
    import unittest

    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    root = tests.parent if tests.name == "tests" and (tests / "models").is_dir() else tests
    folder = model_type_to_module_name(model_type)
    path = root / "tests" / "models" / folder / f"test_modeling_{folder}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no {path.relative_to(root)} in {root}")
    for name in [m for m in sys.modules if m == "tests" or m.startswith("tests.")]:
        if not str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(root)):
            del sys.modules[name]  # another project's tests package: transformers' takes its place
    sys.path.insert(0, str(root))
    module = importlib.import_module(f"tests.models.{folder}.test_modeling_{folder}")
    want = transformers.CONFIG_MAPPING[model_type]
    testers = [c for n, c in vars(module).items() if isinstance(c, type) and n.endswith("Tester")]
    testers.sort(key=lambda c: (c.__module__ != module.__name__, "ModelTester" not in c.__name__))
    tried = []
    for cls in testers:
        try:
            tester = cls(unittest.TestCase())
        except Exception as e:  # a tester that wants other arguments
            tried.append(f"{cls.__name__}(): {type(e).__name__}")
            continue
        for how in ("get_config", "prepare_config_and_inputs_for_common"):
            fn = getattr(tester, how, None)
            if fn is None:
                continue
            try:
                config = fn()
            except Exception as e:
                tried.append(f"{cls.__name__}.{how}: {type(e).__name__}: {e}"[:160])
                continue
            config = config[0] if isinstance(config, tuple) else config
            if isinstance(config, want):
                return config
            tried.append(f"{cls.__name__}.{how} gives {type(config).__name__}")
    raise LookupError(f"no ModelTester in {path.name} gives a {want.__name__} ({'; '.join(tried) or 'none found'})")


# ---------------------------------------------------------------------------------------------
# One type, in its own process


def kind_of(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    vlm, lm = model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return "image-text-to-text" if vlm else "causal-lm" if lm else "?"


def auto_class(task: str):
    import transformers

    return (
        transformers.AutoModelForImageTextToText if task == "image-text-to-text" else transformers.AutoModelForCausalLM
    )


def first_line(e: BaseException | str) -> str:
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    lines = [x.strip() for x in str(text).splitlines() if x.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # a heading: its first item says what
        lines = [f"{lines[0]} {lines[1]}"]
    return lines[0][:300] if lines else str(text)[:300]


def where(e: BaseException) -> str:
    """The innermost frame of the exception in transformers' or the model's code: file:line."""
    frames = traceback.extract_tb(e.__traceback__)
    for f in reversed(frames):
        if "/transformers/" in f.filename:
            return f"{Path(f.filename).name}:{f.lineno}"
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""


def fixed_ids(config, vocab: int):
    import torch

    avoid = set(special_ids(config.to_dict()))
    pool = [i for i in range(3, min(vocab, 1000)) if i not in avoid]
    g = torch.Generator().manual_seed(0)
    pick = torch.randint(0, len(pool), (1, PROMPT), generator=g)
    return torch.tensor([[pool[i] for i in pick[0].tolist()]])


def text_vocab(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or VOCAB)


def greedy(model, inputs: dict, new: int, device=None) -> list[int]:
    import torch

    device = device or torch.device("cpu")
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.inference_mode():
        out = model.generate(**moved, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def text_inputs(ids) -> dict:
    import torch

    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def image_inputs(config, model) -> dict:
    """One image's inputs as fitmap's simulation makes them, with seeded random pixels."""
    import torch

    from fitmap.planning.workload import Workload
    from fitmap.simulation.vision_inputs import vision_inputs

    w, h = (int(x) for x in IMAGE.split("x"))
    inputs, _ = vision_inputs(config, Workload(1, PROMPT, 1, ((w, h),)), torch.device("cpu"), model=model)
    g = torch.Generator().manual_seed(0)
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            inputs[k] = torch.randn(v.shape, generator=g).to(v.dtype)
    return inputs


NEEDS_IMAGE = re.compile(r"pixel_values|image|vision", re.IGNORECASE)


def fitmap_cli(args: list[str], env: dict, timeout: float) -> tuple[int, str, str]:
    try:
        p = subprocess.run(
            [sys.executable, "-m", "fitmap.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=max(5.0, timeout),
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout:.0f} s"
    return p.returncode, p.stdout, p.stderr


def cli_error(rc: int, out: str, err: str) -> str:
    """fitmap's one-line error, or the last line of a traceback."""
    lines = [x.strip() for x in err.splitlines() if x.strip() and not x.lstrip().startswith("Writing")]
    if any(x.startswith("Traceback") for x in lines):
        return f"crash: {lines[-1]}"[:300]
    return (lines[0] if lines else f"exit {rc}: {out.strip().splitlines()[-1:] or ''}")[:300]


def checkpoint_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors")) or sum(p.stat().st_size for p in d.glob("*.bin"))


class Row(dict):
    """One type's results, written to its JSON file after every step (a time-out keeps what was done)."""

    def __init__(self, path: Path, **kw):
        super().__init__(**kw)
        self.path = path
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self))

    def note(self, text: str) -> None:
        self.setdefault("reasons", []).append(text)
        self.save()


def run_one(model_type: str, work: Path, result: Path, new: int, tests: Path | None, deadline: float) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    task = kind_of(model_type)
    row = Row(result, type=model_type, task=task, step="config")
    d = work / "model"

    # the tiny checkpoint
    source = "shrunk"
    try:
        if tests is not None:
            try:
                config = tester_config(tests, model_type)
                source = "tests"
            except Exception as e:
                row.note(f"tests config: {first_line(e)}; shrunk defaults instead")
                config = tiny_config(model_type)
        else:
            config = tiny_config(model_type)
        with torch.device("meta"):  # counted first: a width the shrinking missed could fill the RAM
            n_params = sum(p.numel() for p in auto_class(task).from_config(config).parameters())
        if n_params > MAX_PARAMS:
            raise ValueError(f"the tiny config still has {n_params / 1e6:.0f} M parameters")
        torch.manual_seed(0)
        model = auto_class(task).from_config(config).eval()
        inputs = text_inputs(fixed_ids(config, text_vocab(config)))
        try:
            with torch.inference_mode():
                model(**inputs)
        except Exception as e:  # a model that takes no text alone (BLIP-2): with one image
            if task != "image-text-to-text" or not NEEDS_IMAGE.search(str(e)):
                raise
            row["with_image"] = True
            try:
                inputs = image_inputs(config, model)
            except Exception as why:  # no inputs to compare with: the model is fine, the reference is not
                model.save_pretrained(d)
                row.update(config=source, params=n_params, reference="fails", step="done")
                row.note(f"reference needs an image ({first_line(e)[:80]}), and: {first_line(why)} [{where(why)}]")
                return
            with torch.inference_mode():
                model(**inputs)
        model.save_pretrained(d)
        del model
    except Exception as e:
        row.update(config=f"fails ({source})", step="done")
        row.note(f"tiny config ({source}): {first_line(e)} [{where(e)}]{_default_builds(model_type, task)}")
        return
    row.update(config=source, params=n_params, bytes=checkpoint_bytes(d), step="reference")
    row.save()

    # 1. the reference
    try:
        ref_model = auto_class(task).from_pretrained(d).eval()
        ref = greedy(ref_model, inputs, new)
    except Exception as e:
        row.update(reference="fails", step="done")
        row.note(f"reference{' (with an image)' if row.get('with_image') else ''}: {first_line(e)} [{where(e)}]")
        return
    row.update(reference="ok (with an image)" if row.get("with_image") else "ok", ref_tokens=ref, step="plan")
    image_forward = _image_forward(ref_model, config, task)
    del ref_model

    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TQDM_DISABLE="1",
        TOKENIZERS_PARALLELISM="false",
        FITMAP_CACHE=str(work / "cache"),
        PYTHONPATH=os.pathsep.join(x for x in (str(SRC), env.get("PYTHONPATH", "")) if x),
    )
    size = row["bytes"]
    left = lambda: deadline - time.time()  # noqa: E731
    work_args = ["--prompt", str(PROMPT), "--new", str(new)]

    # 2. a plan over two GPUs of about 60 % of the checkpoint each, 3. its check
    plan_json = work / "p.json"
    per_gpu, first, tries = int(size * GPU_SHARE), None, 0
    while True:
        gpus = f"2x{max(1, per_gpu // 1024)}KiB"
        rc, out, err = fitmap_cli(
            ["plan", str(d), "--gpus", gpus, "--reserve", "0MiB", *work_args, "--out", str(plan_json)], env, left()
        )
        short = re.search(r"needs ([\d.]+ ?\w+) more than 2 x ([\d.]+ ?\w+) GPUs", err)
        if rc == 0 or not short or tries == 3:
            break
        # one unit group (tied embeddings and head, a vision tower with them) is most of the model:
        # half the shortfall more per GPU, then all of it, then twice it (the sizes it prints are rounded)
        first = first or cli_error(rc, out, err)
        per_gpu += _bytes(short.group(1)) * (1 + tries) // 2 + 64 * 1024
        tries += 1
    if rc != 0 or not plan_json.is_file():
        row.update(plan="error", step="done")
        row.note(f"plan: {cli_error(rc, out, err)}")
        return
    plan = json.loads(plan_json.read_text())
    row.update(plan="simulated" if plan["estimate"] == "simulate" else "analytic", gpus=gpus, step="check")
    row["split"] = _on_gpus(plan_json) == {"0", "1"}
    if first:
        row["gpus_note"] = f"at {int(GPU_SHARE * 100)}% of the checkpoint per GPU: {first}"
    if plan["estimate"] != "simulate":
        row.note(f"plan: {plan['estimate']}")
    row["check"] = _check(d, plan_json, work / "pc.json", env, left(), row)
    row["step"] = "run"
    row.save()

    # 4. cpu + disk: planned by the CLI, loaded and run through fitmap's loader
    disk = work / "offload"
    disk.mkdir(exist_ok=True)
    cd_json = work / "cd.json"
    cpu_env = env | {"CUDA_VISIBLE_DEVICES": ""}
    pins = [f"--pin={u}=disk" for u in _text_blocks(plan)]  # a 2-layer model only streams what is pinned
    cpus = [f"{max(1, int(size * CPU_SHARE / 1024))}KiB"]
    while cpus:
        cpu = cpus.pop(0)
        rc, out, err = fitmap_cli(
            ["plan", str(d), "--cpu", cpu, "--disk", str(disk), *pins, *work_args, "--out", str(cd_json)],
            cpu_env,
            left(),
        )
        advice = re.search(r"Fits with --cpu (\S+?)[,.;]?(\s|$)", err)
        if rc == 0 or (not cpus and not advice):
            break
        if not cpus and advice and cpu != advice.group(1):
            cpus = [advice.group(1)]
    row["cpu"] = cpu
    if rc != 0 or not cd_json.is_file():
        row.update(run="plan error")
        row.note(f"cpu+disk plan: {cli_error(rc, out, err)}")
    else:
        row["run"] = _run(d, cd_json, inputs, new, ref, row)
    row["step"] = "image" if task == "image-text-to-text" else "done"
    row.save()

    # 5. one image
    if task == "image-text-to-text":
        img_json = work / "pi.json"
        for size in (gpus, "2x1GiB"):  # the image's activations may need more than the text plan's GPUs
            rc, out, err = fitmap_cli(
                [
                    "plan",
                    str(d),
                    "--gpus",
                    size,
                    "--reserve",
                    "0MiB",
                    *work_args,
                    "--image",
                    IMAGE,
                    "--out",
                    str(img_json),
                ],
                env,
                left(),
            )
            if rc == 0 or "more than" not in (out + err):
                break
        if rc != 0 or not img_json.is_file():
            row.update(image="error")
            row.note(f"image plan: {cli_error(rc, out, err)} ({image_forward})")
        else:
            est = json.loads(img_json.read_text())["estimate"]
            row["image"] = "simulated" if est == "simulate" else "analytic"
            if est != "simulate":
                row.note(f"image plan: {est} ({image_forward})")
            row["image_check"] = _check(d, img_json, work / "pic.json", env, left(), row, "image check")
        row["step"] = "done"
        row.save()


def _default_builds(model_type: str, task: str) -> str:
    """Whether the config class's defaults, unshrunk, build the model (on meta: no memory)."""
    import torch
    import transformers

    try:
        with torch.device("meta"):
            auto_class(task).from_config(transformers.CONFIG_MAPPING[model_type]())
    except Exception as e:
        return f" (the default config fails to build too: {first_line(e)[:120]})"
    return " (the default config builds)"


def _image_forward(model, config, task: str) -> str:
    """Whether the model's own forward takes fitmap's image inputs on the CPU."""
    if task != "image-text-to-text":
        return ""
    import torch

    try:
        inputs = image_inputs(config, model)
        with torch.inference_mode():
            model(**inputs)
    except Exception as e:
        return f"the model's own CPU forward with these inputs fails too: {first_line(e)} [{where(e)}]"
    return "the model's own CPU forward with these inputs runs"


def _text_blocks(plan: dict) -> list[str]:
    """The first and last block of the text model (the units the tests put on disk)."""
    ends = {u for g in plan.get("groups", {}).values() for u in g}
    blocks = [
        u
        for u in plan["device_map"]
        if u not in ends and not re.search(r"vision|visual|image|tower|projector|merger|audio|rotary", u)
    ]
    return sorted({blocks[0], blocks[-1]}, key=blocks.index) if blocks else []


def _bytes(text: str) -> int:
    from fitmap.sizes import parse_size

    return parse_size(text.replace(" ", ""))


def _on_gpus(plan_json: Path) -> set[str]:
    if not plan_json.is_file():
        return set()
    return {str(v) for v in json.loads(plan_json.read_text())["device_map"].values()} & {"0", "1"}


def _check(d: Path, plan_json: Path, out_json: Path, env: dict, timeout: float, row: Row, what: str = "check") -> str:
    rc, out, err = fitmap_cli(
        ["check", str(d), "--plan", str(plan_json), "--json", "--out", str(out_json)], env, timeout
    )
    if rc != 0:
        row.note(f"{what}: {cli_error(rc, out, err)}")
        return "peaks over capacity" if "exceed capacity" in err else "error"
    try:
        checked = json.loads(out)["check"]
    except (ValueError, KeyError) as e:
        row.note(f"{what}: unreadable output ({first_line(e)})")
        return "error"
    if checked.get("clean"):
        return "clean"
    first = (checked.get("mismatches") or checked.get("repairs") or ["not clean"])[0]
    row.note(f"{what}: not clean: {first_line(json.dumps(first) if not isinstance(first, str) else first)}")
    return "repairs"


def _run(d: Path, cd_json: Path, inputs: dict, new: int, ref: list[int], row: Row) -> str:
    from fitmap.planning.plan import Plan
    from fitmap.runtime import loader

    plan = Plan.load(str(cd_json))
    row["disk_units"] = sum(1 for v in plan.device_map.values() if v == "disk")
    try:
        with loader.load(d, plan, progress=False) as lm:
            got = greedy(lm.model, inputs, new, lm.input_device)
    except Exception as e:
        row.note(f"run: {first_line(e)} [{where(e)}]")
        return "error"
    if got == ref:
        return "same" if row["disk_units"] else "same (nothing on disk)"
    row["run_tokens"] = got
    row.note(f"run: tokens differ: {got} vs from_pretrained {ref}")
    return "differ"


# ---------------------------------------------------------------------------------------------
# The sweep


def all_types() -> list[str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES))


def sweep_one(model_type: str, args: argparse.Namespace, base: Path) -> dict:
    work = base / re.sub(r"[^A-Za-z0-9_.-]", "_", model_type)
    work.mkdir(parents=True, exist_ok=True)
    result = work / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", model_type, "--work", str(work)]
    cmd += ["--new", str(args.new), "--timeout", str(args.timeout)]
    if args.tests:
        cmd += ["--tests", str(args.tests)]
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(SRC), env.get("PYTHONPATH", "")) if x)
    start = time.time()
    limit = int(args.memory * 2**30)

    def cap() -> None:  # the type's process and the fitmap commands it starts: at most --memory each
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=cap, start_new_session=True
    )
    try:
        _, err = p.communicate(timeout=args.timeout + 30)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)  # its own process group: the type's process and the commands it started
        p.communicate()
        rc, err = 124, ""
    row = json.loads(result.read_text()) if result.is_file() else {"type": model_type, "step": "start"}
    row["seconds"] = round(time.time() - start, 1)
    if row.get("step") != "done":
        last = (err.strip().splitlines() or [""])[-1]
        why = f"timed out after {args.timeout} s" if rc == 124 else f"exit {rc}: {first_line(last)}"
        row.setdefault("reasons", []).append(f"{row.get('step')}: {why}")
    # no machine paths in the table: the model is MODEL, its other files WORK
    row["reasons"] = [
        r.replace(str(work / "model"), "MODEL").replace(str(work), "WORK") for r in row.get("reasons", [])
    ]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def passed(r: dict) -> bool:
    return r.get("plan") == "simulated" and r.get("check") == "clean" and str(r.get("run", "")).startswith("same")


def image_passed(r: dict) -> bool:
    return r.get("image") == "simulated" and r.get("image_check") == "clean"


def pct(a: int, b: int) -> str:
    return f"{a}/{b} = {100 * a / b:.0f}%" if b else "0/0"


def summary(rows: list[dict]) -> list[str]:
    lines = []
    for task, label in (("causal-lm", "causal-LM"), ("image-text-to-text", "image-text-to-text")):
        group = [r for r in rows if r.get("task") == task]
        ok = [r for r in group if str(r.get("reference", "")).startswith("ok")]
        no_model = sum(1 for r in group if str(r.get("config", "")).startswith("fails"))
        ref_fails = sum(1 for r in group if r.get("reference") == "fails")
        other = len(group) - len(ok) - no_model - ref_fails
        lines.append(
            f"{label}: {pct(sum(passed(r) for r in ok), len(ok))} pass plan (simulated) + check (clean) + run "
            f"(same tokens), of {len(ok)} types whose reference works ({len(group)} types: {no_model} without a tiny "
            f"model, {ref_fails} reference fails{f', {other} stopped before the reference' if other else ''})"
        )
        if task == "image-text-to-text":
            lines.append(
                f"image-text-to-text with one image ({IMAGE}): {pct(sum(image_passed(r) for r in ok), len(ok))} "
                "simulate with a clean check, of the types whose reference works"
            )
    return lines


def cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> list[str]:
    out = [
        "| type | task | reference | plan simulated? | check | run tokens equal? | with-image simulated? | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = r.get("reference") or ("no tiny model" if str(r.get("config", "")).startswith("fails") else "-")
        image = "-"
        if r.get("task") == "image-text-to-text" and r.get("image"):
            image = f"{r['image']}, check {r.get('image_check', '-')}"
        out.append(
            "| "
            + " | ".join(
                cell(x)
                for x in (
                    r["type"],
                    r.get("task", "?"),
                    ref,
                    r.get("plan", "-") + ("" if r.get("split", True) else " (on one GPU)"),
                    r.get("check", "-"),
                    r.get("run", "-"),
                    image,
                    "; ".join(r.get("reasons", [])),
                )
            )
            + " |"
        )
    return out


def by_reason(rows: list[dict]) -> list[str]:
    """Reasons alike but for numbers and names, together: the first one exactly, then the types."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for r in rows:
        for part in r.get("reasons", []):
            key = re.sub(r"tokens differ: .*", "tokens differ", part)
            key = re.sub(
                r" \(the model's own CPU forward with these inputs (runs|fails too).*", r" (own forward \1)", key
            )
            key = re.sub(r"'[^']*'|\b\d+(\.\d+)?\b", "N", key.replace(r["type"], "TYPE"))
            groups.setdefault(key, (part, []))[1].append(r["type"])
    out = []
    for first, types in sorted(groups.values(), key=lambda g: (-len(g[1]), g[0])):
        out.append(f"- {len(types)}: {', '.join(types)}")
        out.append(f"  `{first}`")
    return out


def write(path: Path, rows: list[dict], args: argparse.Namespace, seconds: float) -> None:
    import transformers

    head = [
        "# fitmap on transformers' model types",
        "",
        f"transformers {transformers.__version__}, tiny configs from "
        f"{'the model tests' if args.tests else 'the config classes, shrunk'}; prompt {PROMPT} ids, {args.new} new "
        f"tokens; two GPUs of {int(GPU_SHARE * 100)}% of the checkpoint each (more where fitmap says so); "
        "cpu + disk with the first and last text blocks pinned to disk, --cpu "
        f"{int(CPU_SHARE * 100)}% of the checkpoint or what fitmap's advice names; one image {IMAGE}. "
        f"{len(rows)} types, {sum(r.get('seconds', 0) for r in rows) / 60:.0f} min of runs.",
        "",
        *summary(rows),
        "",
    ]
    body = table(rows) + ["", "## Failures by reason", ""] + by_reason(rows)
    path.write_text("\n".join(head + body) + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def _check_release(tests: Path) -> None:
    """Say so when the checkout's transformers is not the installed one (its testers may not fit)."""
    import transformers

    root = tests.parent if tests.name == "tests" else tests
    init = root / "src" / "transformers" / "__init__.py"
    found = re.search(r'__version__ = "([^"]+)"', init.read_text()) if init.is_file() else None
    if found is None or found.group(1) != transformers.__version__:
        have = found.group(1) if found else "unknown"
        print(f"note: the checkout is transformers {have}, the installed one {transformers.__version__}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, help="the markdown table goes here")
    ap.add_argument("--types", help="a comma-separated subset of model types (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="types run at once (default 1)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per type (default 240)")
    ap.add_argument("--new", type=int, default=4, help="new tokens generated (default 4)")
    ap.add_argument("--tests", type=Path, help="a transformers source checkout of the installed release")
    ap.add_argument("--memory", type=float, default=8, help="GiB of memory a type's processes may take (default 8)")
    ap.add_argument("--resume", action="store_true", help="keep the types already in --out's .json; run the others")
    ap.add_argument("--keep", type=Path, help="keep each type's checkpoint and plans under this directory")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(SRC))
    if args.one:
        run_one(args.one, args.work, args.work / "result.json", args.new, args.tests, time.time() + args.timeout)
        return 0
    if args.out is None:
        ap.error("--out is required")
    types = all_types()
    if args.types:
        wanted = [t.strip() for t in args.types.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in types]
        if unknown:
            ap.error(f"not in either mapping: {', '.join(unknown)}")
        types = wanted
    if args.tests:
        _check_release(args.tests)
    base = args.keep or Path(tempfile.mkdtemp(prefix="fitmap-zoo-"))
    base.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows: dict[str, dict] = {}
    done = args.out.with_suffix(".json")
    if args.resume and done.is_file():  # a sweep cut short: what it measured stays
        rows = {r["type"]: r for r in json.loads(done.read_text()) if r["type"] in types}
        print(f"{len(rows)} types from {done}", flush=True)
    todo = [t for t in types if t not in rows]
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(sweep_one, t, args, base): t for t in todo}
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            r = fut.result()
            rows[r["type"]] = r
            mark = "pass" if passed(r) else "-"
            print(
                f"[{i}/{len(todo)}] {r['type']}: {mark} ({r['seconds']} s) {'; '.join(r.get('reasons', []))[:150]}",
                flush=True,
            )
            write(args.out, [rows[t] for t in types if t in rows], args, time.time() - start)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    ordered = [rows[t] for t in types]
    write(args.out, ordered, args, time.time() - start)
    print("\n".join(summary(ordered)))
    print(f"table: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
