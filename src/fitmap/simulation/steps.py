"""The steps the simulator takes on the model, as ``generate()`` takes them: the prefill's
inputs, the KV cache grown to the full context, and one decode step's inputs (the model's own
generation owner and keywords, remote code included)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from fitmap.model import compat
from fitmap.simulation.fake import plan_device


def _accepted(fn: Any, kwargs: dict) -> dict:
    """The keyword arguments ``fn`` takes (all of them when it takes ``**kwargs``): remote code
    written for transformers 4.x has no ``logits_to_keep`` or ``cache_position``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def set_image_token(model: nn.Module, inputs: dict) -> None:
    """InternVL's ``chat()`` sets ``img_context_token_id`` from the tokenizer before it generates."""
    token = inputs.pop("_image_token_id", None)
    if token is not None and hasattr(model, "img_context_token_id") and model.img_context_token_id is None:
        model.img_context_token_id = int(token)


def _own_generation(model: nn.Module) -> bool:
    """Does the model's own code (remote code) define how generation prepares each step?"""
    fn = getattr(type(model), "prepare_inputs_for_generation", None)
    return fn is not None and getattr(fn, "__module__", "").startswith("transformers_modules")


def _requires(model: nn.Module, name: str) -> bool:
    """Does the model's forward or its own ``prepare_inputs_for_generation`` require ``name``?"""
    for fn in (model.forward, getattr(model, "prepare_inputs_for_generation", None)):
        try:
            param = inspect.signature(fn).parameters.get(name) if fn is not None else None
        except (TypeError, ValueError):
            continue
        if param is not None and param.default is inspect.Parameter.empty:
            return True
    return False


def _last_logit_only(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}
    if "return_last_logit" in params:  # ChatGLM's own name for it
        return {"return_last_logit": True}
    return {}


def prefill_inputs(model: nn.Module, inputs: dict) -> dict:
    """The prefill call as ``generate`` makes it: through the model's own
    ``prepare_inputs_for_generation`` when its code defines one; only arguments its forward takes."""
    kwargs = {**inputs, "use_cache": True, **_last_logit_only(model)}
    if "input_ids" in inputs and "token_type_ids" not in inputs and _requires(model, "token_type_ids"):
        kwargs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])  # CogVLM: all text tokens
    if _own_generation(model) and "input_ids" in inputs:
        rest = {k: v for k, v in kwargs.items() if k != "input_ids"}
        prepared = model.prepare_inputs_for_generation(  # type: ignore[operator]  # a PreTrainedModel method
            inputs["input_ids"], **_accepted(model.prepare_inputs_for_generation, rest)
        )
        kwargs = {**kwargs, **{k: v for k, v in prepared.items() if v is not None}}
    return _accepted(model.forward, kwargs)


def decode_inputs(model: nn.Module, inputs: dict, cache: Any, past: int) -> dict:
    """One decode step after ``past`` cached tokens, as ``generate()`` builds it. The next
    token is a stand-in id (0): what the step costs does not depend on its value."""
    ids = inputs["input_ids"]
    b, device = ids.shape[0], ids.device
    next_ids = torch.zeros(b, 1, dtype=torch.long, device=device)
    mask = torch.ones(b, past + 1, dtype=torch.long, device=device)
    if _own_generation(model):
        full_ids = torch.cat([ids, next_ids.expand(b, past + 1 - ids.shape[1])], dim=1)
        positions = torch.arange(past + 1, device=device).unsqueeze(0).expand(b, -1)
        given = {
            compat.cache_kwarg(model): cache,
            "attention_mask": mask,
            "use_cache": True,
            "is_first_forward": False,
            "cache_position": torch.arange(past, past + 1, device=device),
        }
        if "token_type_ids" in inputs or _requires(model, "token_type_ids"):  # CogVLM: new tokens are text
            types = inputs.get("token_type_ids", torch.zeros_like(ids))
            given["token_type_ids"] = torch.cat([types, torch.zeros_like(full_ids[:, types.shape[1] :])], dim=1)
        prepare = model.prepare_inputs_for_generation
        if "position_ids" in inspect.signature(prepare).parameters:  # type: ignore[arg-type]  # a PreTrainedModel method
            given["position_ids"] = positions  # ChatGLM's tokenizer makes them and generate extends them
        prepared = model.prepare_inputs_for_generation(  # type: ignore[operator]  # a PreTrainedModel method
            full_ids, **_accepted(model.prepare_inputs_for_generation, given)
        )
        step = {k: v for k, v in prepared.items() if v is not None}
    else:
        step = {
            "input_ids": next_ids,
            "attention_mask": mask,
            compat.cache_kwarg(model): cache,
            "use_cache": True,
            "cache_position": torch.arange(past, past + 1, device=device),
        }
        after = _decode_positions(model, inputs, past)
        if after is not None:
            step["position_ids"] = after
        elif "image_grid_thw" in inputs:  # Qwen2-VL keeps its rope deltas from the prefill
            step["position_ids"] = torch.full((3, b, 1), past, dtype=torch.long, device=device)
    return _accepted(model.forward, {**step, **_last_logit_only(model)})


def _decode_positions(model: nn.Module, inputs: dict, past: int) -> torch.Tensor | None:
    """The position ids of the token after ``past`` cached ones as ``generate`` makes them: the
    model's own ``_prepare_position_ids_for_generation`` on the prompt (text positions, or the
    3-D / 4-D multimodal ones of Qwen2-VL's kin), each axis counted on from its last prompt
    position. None where the model has no such method (transformers 4.x) or no ``input_ids``."""
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    ids = inputs.get("input_ids")
    if prepare is None or ids is None or "position_ids" not in inspect.signature(model.forward).parameters:
        return None
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    kwargs.setdefault("attention_mask", torch.ones_like(ids))
    positions = prepare(ids, kwargs)
    return positions[..., -1:] + (past + 1 - ids.shape[1])


def grow_cache(cache: Any, length: int, prefill: int) -> Any:
    """Give every cache layer ``length`` tokens (sliding layers keep their window). Cache
    objects are grown in place; tuple caches (remote code written for transformers 4.x:
    per layer ``(key, value)``, the sequence on the axis that had ``prefill`` entries) are
    returned anew. State-space and linear-attention layers (their conv and recurrent states)
    are the same size at any length: they stay as the prefill left them."""
    if isinstance(cache, (tuple, list)):
        return type(cache)(grow_cache(c, length, prefill) for c in cache)
    if isinstance(cache, torch.Tensor):
        dims = [d for d in range(cache.dim() - 1) if cache.shape[d] == prefill]
        if not dims:
            return cache
        shape = list(cache.shape)
        shape[dims[-1] if cache.dim() == 4 and dims[-1] == 2 else dims[0]] = length
        return cache.new_empty(shape)
    for kname, vname in (("key_cache", "value_cache"),):  # transformers 4.x DynamicCache
        if isinstance(getattr(cache, kname, None), list):
            for lists in (getattr(cache, kname), getattr(cache, vname)):
                for i, t in enumerate(lists):
                    if isinstance(t, torch.Tensor) and t.dim() == 4:
                        lists[i] = t.new_empty(*t.shape[:-2], length, t.shape[-1])
            if hasattr(cache, "_seen_tokens"):
                cache._seen_tokens = length
            return cache
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() < 3:
            continue
        window = getattr(layer, "sliding_window", None)
        n = min(length, window - 1) if window else length
        _grow_indexer(layer, keys.shape[-2], n)
        layer.keys = keys.new_empty(*keys.shape[:-2], n, keys.shape[-1])
        assert values is not None  # a cache layer holds its keys and values together
        layer.values = values.new_empty(*values.shape[:-2], n, values.shape[-1])
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = length
    return cache


def _grow_indexer(layer: Any, was: int, n: int) -> None:
    """A sparse-attention layer's indexer cache (DeepSeek-V3.2, Mistral Large 4: ``indexer_keys``
    ``[batch, seq, dim]``, ``indexer_position_ids`` ``[axes, batch, seq]``) grown with its keys."""
    for name in _INDEXER:
        t = getattr(layer, name, None)
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            axis = t.dim() - 1 if name.endswith("position_ids") else 1
            if t.shape[axis] == was:
                setattr(layer, name, t.new_empty(*t.shape[:axis], n, *t.shape[axis + 1 :]))


_INDEXER = ("indexer_keys", "indexer_position_ids")


def _cache_layers(cache: Any) -> list[list[torch.Tensor]]:
    """Per text layer, the tensors ``cache`` keeps for it (any of the layouts above): keys and values,
    and the conv and recurrent states of a state-space or linear-attention layer (transformers 5:
    per layer, ``conv_states`` / ``recurrent_states`` by state index; 4.x's ``MambaCache`` and
    hybrid caches: ``conv_states`` / ``ssm_states`` by layer)."""
    if isinstance(cache, (tuple, list)):
        return [
            [t for t in layer if isinstance(t, torch.Tensor)] if isinstance(layer, (tuple, list)) else [layer]
            for layer in cache
        ]
    if isinstance(getattr(cache, "key_cache", None), list):
        layers = [[k, v] for k, v in zip(cache.key_cache, cache.value_cache)]
    else:
        layers = [
            [getattr(layer, name, None) for name in ("keys", "values", *_INDEXER)]
            + _by_index(getattr(layer, "conv_states", None))
            + _by_index(getattr(layer, "recurrent_states", None))
            for layer in getattr(cache, "layers", [])
        ]
    for name in ("conv_states", "ssm_states"):  # transformers 4.x: one tensor per layer
        per_layer = _by_index(getattr(cache, name, None))
        layers += [[] for _ in range(len(per_layer) - len(layers))]
        for i, t in enumerate(per_layer):
            layers[i].append(t)
    return [[t for t in layer if isinstance(t, torch.Tensor) and t.numel() > 0] for layer in layers]


def _by_index(states: Any) -> list:
    """A dict keyed 0, 1, ... or a list, as a list (anything else: none)."""
    if isinstance(states, dict):
        return [states.get(i) for i in range(max((k + 1 for k in states if isinstance(k, int)), default=0))]
    return list(states) if isinstance(states, (list, tuple)) else []


def cache_bytes(cache: Any) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for i, layer in enumerate(_cache_layers(cache)):
        for t in layer:
            key = (plan_device(t.device), i)
            out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out
