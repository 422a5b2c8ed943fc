"""Image inputs of any VLM transformers ships, without per-family code: the image processor its type
pairs with makes the pixel inputs, and the model's own ``get_image_features`` counts the tokens."""

from __future__ import annotations

from typing import Any

import torch

from fitmap.model import configs
from fitmap.planning.images import model_image_processor
from fitmap.planning.workload import Workload
from fitmap.simulation.token_layout import HEAD, TEXT_TOKEN, Inputs, UnsupportedInputs, text_inputs, token_row

# config keys of the tokens a processor puts around each image's run (Qwen's and Gemma's markers)
_START_KEYS = ("vision_start_token_id", "image_start_token_id", "boi_token_id", "boi_token_index")
_END_KEYS = ("vision_end_token_id", "image_end_token_id", "eoi_token_id", "eoi_token_index")
_IMAGE_KEYS = ("image_token_id", "image_token_index", "image_token")


def by_the_model(config, workload: Workload, device: torch.device, dtype: torch.dtype, model) -> Inputs:
    """Any VLM transformers ships: the image processor its type pairs with (settings from its files,
    else fitted to the tower) makes the pixel inputs and whatever else it returns (sizes, grids,
    masks), and the model's own ``get_image_features`` says how many features each image becomes:
    that many placeholder tokens, between the config's image markers, where ``get_placeholder_mask``
    looks for them. Inputs the forward does not take are dropped."""
    what = f"model type {configs.model_type(config)!r}"
    encoder_decoder = getattr(config, "is_encoder_decoder", False) or hasattr(config, "encoder")
    if configs.vision_config(config) is None:  # Gemma 4 built without one, Mistral 4 (a text model)
        why = "an encoder-decoder model" if encoder_decoder else "its config names no vision tower (no vision_config)"
        raise UnsupportedInputs(f"fitmap cannot make image inputs for {what}: {why}")
    image_id = next((v for k in _IMAGE_KEYS if isinstance(v := getattr(config, k, None), int)), None)
    processor = model_image_processor(config)
    counter = _feature_owner(model)
    if image_id is None and model is not None and processor is not None:
        made = _without_image_token(config, workload, device, dtype, model, processor, counter)
        if made is not None:
            return made
    if model is None or image_id is None or processor is None or counter is None:
        why = (
            "an encoder-decoder model whose config names no image token"
            if image_id is None and encoder_decoder
            else "its config names no image token"
            if image_id is None
            else "its image processor is not available here (it may need torchvision)"
            if processor is None
            else "its model has no get_image_features to count its image tokens"
        )
        raise UnsupportedInputs(f"fitmap cannot make image inputs for {what}: {why}; check it without --image")
    takes = parameters(model.forward)
    counts = [_feature_count(model, processor, (w, h), device, dtype, takes) for w, h in workload.images]
    start = next((v for k in _START_KEYS if isinstance(v := getattr(config, k, None), int)), None)
    end = next((v for k in _END_KEYS if isinstance(v := getattr(config, k, None), int)), None)
    runs = [
        [t for t in [start] if t is not None] + [image_id] * n + [t for t in [end] if t is not None] for n in counts
    ]
    inputs: dict[str, Any] = text_inputs(token_row(workload.prompt, runs, image_id), workload.batch, device)
    images = [blank(w, h) for w, h in workload.images]
    inputs |= _pixel_inputs(processor, [images] * workload.batch, device, dtype, takes)
    for key in ("mm_token_type_ids", "token_type_ids"):  # 1 on image tokens, as the processors mark them
        if key in takes and key not in inputs:
            inputs[key] = (inputs["input_ids"] == image_id).long()
    return inputs | _qformer_text(takes, workload.batch, device), sum(counts)


def _without_image_token(config, workload: Workload, device, dtype, model, processor, counter) -> Inputs | None:
    """A decoder-only VLM whose config names no image token, recognised by its forward's signature:
    with ``image_embeds_position_mask`` (Kosmos-2, Kosmos-2.5) the features replace the text tokens the
    mask marks, as many as its ``get_image_features`` makes; taking only pixels (GIT) it puts them
    before the text itself, and the simulation counts them from the cache the prefill leaves (0 here).
    None for anything else (encoder-decoder models, cross-attention with its own masks)."""
    takes = parameters(model.forward)
    pixels = next((k for k in ("pixel_values", "flattened_patches") if k in takes), None)
    if pixels is None or getattr(config, "is_encoder_decoder", False) or "image_attention_mask" in takes:
        return None
    counts = [0] * len(workload.images)
    if "image_embeds_position_mask" in takes:
        if counter is None:
            return None
        counts = [_feature_count(model, processor, (w, h), device, dtype, takes) for w, h in workload.images]
    row = token_row(workload.prompt, [[TEXT_TOKEN] * n for n in counts], TEXT_TOKEN)
    inputs: dict[str, Any] = text_inputs(row, workload.batch, device)
    if "image_embeds_position_mask" in takes:
        head = min(HEAD, workload.prompt)
        marks = torch.zeros(len(row), dtype=torch.long, device=device)
        marks[head : head + sum(counts)] = 1
        inputs["image_embeds_position_mask"] = marks.expand(workload.batch, -1)
    images = [blank(w, h) for w, h in workload.images]
    inputs |= _pixel_inputs(processor, [images] * workload.batch, device, dtype, takes)
    return inputs, sum(counts)


def _qformer_text(takes: set[str], batch: int, device: torch.device) -> dict:
    """InstructBLIP: its processor also gives the Q-Former the instruction, cut by its own tokenizer."""
    if "qformer_input_ids" not in takes:
        return {}
    ids = torch.full((batch, QFORMER_TEXT), TEXT_TOKEN, dtype=torch.long, device=device)
    return {"qformer_input_ids": ids, "qformer_attention_mask": torch.ones_like(ids)}


QFORMER_TEXT = 32  # Q-Former text tokens (the instruction, as its own tokenizer cuts it)


def blank(w: int, h: int):
    from PIL import Image

    return Image.new("RGB", (w, h))


def parameters(fn) -> set[str]:
    """The names ``fn`` takes (not its ``*args`` / ``**kwargs``: a wrapper passing everything on names none)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _pixel_inputs(processor, images: list, device: torch.device, dtype: torch.dtype, takes: set[str]) -> dict:
    """The image processor's output for ``images`` (one list per sequence), made for real and moved to
    ``device``: floating tensors in the model dtype, integer ones keep their values. Only what ``takes``."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        enc = dict(processor(images=images, return_tensors="pt"))
    out: dict[str, Any] = {}
    for k, v in enc.items():
        if k not in takes:
            continue
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, dtype) if v.is_floating_point() else v.to(device)
        elif isinstance(v, list) and all(isinstance(x, torch.Tensor) for x in v):
            out[k] = [x.to(device, dtype) if x.is_floating_point() else x.to(device) for x in v]
        else:
            out[k] = v
    return out


def _feature_count(model, processor, size: tuple[int, int], device, dtype, takes: set[str]) -> int:
    """Tokens one image of ``size`` becomes: the features the model's own ``get_image_features`` makes
    of its image processor's output, in units of the text model's hidden size."""
    counter = _feature_owner(model)
    assert counter is not None  # by_the_model checked
    wanted = parameters(counter.get_image_features) or takes
    inner = getattr(counter, "model", None)  # a wrapper passing **kwargs on: what its base model names too
    if inner is not None and callable(getattr(inner, "get_image_features", None)):
        wanted |= parameters(inner.get_image_features)  # Video-LLaMA 3's image_merge_sizes
    inputs = _pixel_inputs(processor, [[blank(*size)]], device, dtype, wanted | takes)
    if "pixel_values" in wanted and "pixel_values" not in inputs:  # named for the forward (Video-LLaVA's
        named = next((k for k in inputs if k.startswith("pixel_values")), None)  # pixel_values_images)
        if named is not None:
            inputs["pixel_values"] = inputs.pop(named)
    inputs = {k: v for k, v in inputs.items() if k in wanted}
    out = counter.get_image_features(**inputs, **_qformer_text(wanted, 1, device))
    features = getattr(out, "pooler_output", None)
    if features is None:
        features = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
    hidden = model.get_input_embeddings().weight.shape[-1]
    from torch.utils._pytree import tree_flatten

    return sum(int(t.numel()) for t in tree_flatten(features)[0] if isinstance(t, torch.Tensor)) // hidden


def _feature_owner(model):
    """The module with ``get_image_features``: the model, or the base model it wraps (Janus keeps it there)."""
    for m in (model, getattr(model, "model", None)):
        if m is not None and callable(getattr(m, "get_image_features", None)):
            return m
    return None
