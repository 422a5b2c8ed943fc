"""Model inputs with images, shaped as each family's processor makes them.

The simulator feeds these to the real model code, so their shapes, dtypes and
token layout must be the processor's: the vision tower sees the same number of
patches or tiles, and the text sequence holds one placeholder token per image
feature, where the model's ``get_placeholder_mask`` looks for it.

Per sequence: a short text head (the chat template's), then each image's tokens,
then the rest of the prompt. ``workload.prompt`` counts every text token, so the
markers some families put around an image (Qwen2-VL's vision start/end,
InternVL's ``<img>``/``</img>``) come out of it; the image tokens are exactly
:func:`fitmap.planning.images.image_shape`'s. Every sequence of the batch carries the
same images.

Integer tensors go on the input device; ``pixel_values`` in the model dtype
(zeros: a real run accepts them too). The token values that only the tokenizer
knows (markers, ordinary text) are ordinary text tokens to the model and get the
filler id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fitmap.errors import BadInput
from fitmap.model import configs
from fitmap.planning.images import (
    PIXTRAL_LONGEST_EDGE,
    ImageShape,
    idefics3_per_tile,
    idefics3_processor,
    idefics3_tiles,
    image_processor,
    image_shape,
    model_image_processor,
    onevision_processor,
    onevision_tokens,
    processed_images,
    qwen_pixel_limits,
)
from fitmap.planning.workload import Workload
from fitmap.simulation.any_vlm import blank, by_the_model, parameters
from fitmap.simulation.token_layout import (
    HEAD,
    IMAGE_CONTEXT,
    TEXT_TOKEN,
    Inputs,
    UnsupportedInputs,
    text_inputs,
    token_row,
)

__all__ = ["IMAGE_CONTEXT", "TEXT_TOKEN", "HEAD", "Inputs", "UnsupportedInputs", "vision_inputs"]


def vision_inputs(
    config,
    workload: Workload,
    device: torch.device,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    model: nn.Module | None = None,
) -> Inputs:
    """(model kwargs, image tokens per sequence) for ``workload`` with its images.

    ``dtype`` is the model's floating dtype (default: the config's, else float32). ``model`` (placed
    on the fake devices) counts the image features where no processor or family arithmetic does.
    """
    kind = configs.family(config, _OWN_PROCESSOR.keys() | _FAMILIES.keys())
    dtype = dtype or _config_dtype(config)
    if kind in _OWN_PROCESSOR:
        return _OWN_PROCESSOR[kind](config, workload, device, dtype, trust_remote_code)
    made = _from_processor(config, workload, device, dtype, trust_remote_code)
    if made is not None:
        return made
    build = _FAMILIES.get(kind)
    if build is None:
        return by_the_model(config, workload, device, dtype, model)
    try:
        inputs, tokens = build(config, workload, device, dtype)
    except AttributeError:  # a model that shares the family's processor but not its config (Qwen-style towers
        if model is None:  # without vision_start_token_id): counted by its own model instead
            raise
        return by_the_model(config, workload, device, dtype, model)
    if model is not None and "mm_token_type_ids" in inputs and "mm_token_type_ids" not in parameters(model.forward):
        del inputs["mm_token_type_ids"]  # a model of the family that does not take them (Qwen2.5-Omni's thinker)
    return inputs, tokens


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _shapes(config, workload: Workload) -> list[ImageShape]:
    return [image_shape(config, w, h) for w, h in workload.images]


# --------------------------------------------------------------------------- families
def _qwen2_vl(config, workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """pixel_values (patches, C*T*P*P), image_grid_thw (images, 3), mm_token_type_ids (1 on image tokens)."""
    grids = [_qwen2_vl_grid(config, w, h) for w, h in workload.images]
    return _grid_inputs(
        config, workload, device, dtype, grids, config.vision_start_token_id, config.vision_end_token_id
    )


def _glm4v(config, workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """GLM-4.1V: the patch grid its own image processor makes (its resize rule differs from Qwen's);
    ``<|begin_of_image|>`` + image tokens + ``<|end_of_image|>`` per image."""
    enc = processed_images(image_processor(config, "Glm4vImageProcessor", {}), workload)
    grids = [tuple(g) for g in enc["image_grid_thw"].tolist()]
    return _grid_inputs(config, workload, device, dtype, grids, config.image_start_token_id, config.image_end_token_id)


def _grid_inputs(
    config,
    workload: Workload,
    device: torch.device,
    dtype: torch.dtype,
    grids: list[tuple[int, int, int]],
    start: int,
    end: int,
) -> Inputs:
    """Qwen-VL-style inputs for images of these (t, h, w) patch grids: one token per merged patches."""
    vc = config.vision_config
    channels = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3)
    image, merge = config.image_token_id, vc.spatial_merge_size
    runs = [[start] + [image] * (t * h * w // (merge * merge)) + [end] for t, h, w in grids]
    inputs = text_inputs(token_row(workload.prompt, runs, image), workload.batch, device)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == image).long()  # the processor marks image tokens only
    patches = workload.batch * sum(t * h * w for t, h, w in grids)
    inputs["pixel_values"] = torch.zeros(
        patches, channels * vc.temporal_patch_size * vc.patch_size**2, dtype=dtype, device=device
    )
    inputs["image_grid_thw"] = torch.tensor(grids * workload.batch, dtype=torch.long, device=device)
    return inputs, sum(run.count(image) for run in runs)


def _qwen2_vl_grid(config, w: int, h: int) -> tuple[int, int, int]:
    """(t, h, w) patches of one image after the processor's resize (``smart_resize``)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vc = config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    lo, hi = qwen_pixel_limits(config)
    hb, wb = smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
    grid = (1, hb // vc.patch_size, wb // vc.patch_size)  # an image is one temporal patch
    expected = image_shape(config, w, h).patches
    if grid[1] * grid[2] != expected:
        raise AssertionError(
            f"Qwen2-VL grid {grid} for a {w}x{h} image disagrees with "
            f"fitmap.planning.images.image_shape ({expected} patches)"
        )
    return grid


def _internvl(config, workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """pixel_values (tiles, 3, S, S); per image ``<img>`` + 256 context tokens per tile + ``</img>``."""
    vc = config.vision_config
    size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
    shapes = _shapes(config, workload)
    per_tile = getattr(config, "image_seq_length", None)
    for s in shapes:
        if per_tile is not None and s.tokens != s.tiles * per_tile:
            raise AssertionError(f"InternVL image tokens {s.tokens} != {s.tiles} tiles x {per_tile}")
    runs = [[TEXT_TOKEN] + [config.image_token_id] * s.tokens + [TEXT_TOKEN] for s in shapes]
    inputs = text_inputs(token_row(workload.prompt, runs, config.image_token_id), workload.batch, device)
    tiles = workload.batch * sum(s.tiles for s in shapes)
    inputs["pixel_values"] = torch.zeros(tiles, vc.num_channels, size, size, dtype=dtype, device=device)
    return inputs, sum(s.tokens for s in shapes)


def _internvl_chat(config, workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """InternVL 1.5/2 remote code (``InternVLChatModel``): pixel_values (tiles, 3, S, S) as the
    model card's ``dynamic_preprocess`` makes them, ``image_flags`` (tiles, 1), and per image
    ``<img>`` + ``num_image_token`` ``<IMG_CONTEXT>`` per tile + ``</img>``. The context token's id
    comes from the tokenizer in ``chat()``; here a fixed id the model is told (``_image_token_id``)."""
    vc = configs.vision_config(config)
    size = getattr(config, "force_image_size", None) or vc.image_size
    shapes = _shapes(config, workload)
    image = IMAGE_CONTEXT
    runs = [[TEXT_TOKEN] + [image] * s.tokens + [TEXT_TOKEN] for s in shapes]
    inputs: dict[str, Any] = text_inputs(token_row(workload.prompt, runs, image), workload.batch, device)
    tiles = workload.batch * sum(s.tiles for s in shapes)
    inputs["pixel_values"] = torch.zeros(tiles, getattr(vc, "num_channels", 3), size, size, dtype=dtype, device=device)
    inputs["image_flags"] = torch.ones(tiles, 1, dtype=torch.long, device=device)
    inputs["_image_token_id"] = image
    return inputs, sum(s.tokens for s in shapes)


def _cogvlm(config, workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """CogVLM and CogVLM2 (``build_conversation_input_ids``): ``images`` one list per sequence of (3, S, S);
    bos, then one pad slot per image feature (boi + grid + eoi) with ``token_type_ids`` 1, then text."""
    vc = configs.vision_config(config)
    shapes = _shapes(config, workload)
    vision, pad = 1, int(getattr(config, "pad_token_id", None) or TEXT_TOKEN)
    row = [TEXT_TOKEN] + [pad] * sum(s.tokens for s in shapes) + [TEXT_TOKEN] * max(workload.prompt - 1, 0)
    types = [0] + [vision] * sum(s.tokens for s in shapes) + [0] * max(workload.prompt - 1, 0)
    inputs: dict[str, Any] = text_inputs(row, workload.batch, device)
    inputs["token_type_ids"] = torch.tensor([types] * workload.batch, dtype=torch.long, device=device)
    inputs["images"] = [
        [torch.zeros(vc.in_channels, vc.image_size, vc.image_size, dtype=dtype, device=device) for _ in shapes]
        for _ in range(workload.batch)
    ]
    return inputs, sum(s.tokens for s in shapes)


def _glm4v_chat(config, workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """GLM-4V (remote code): its chat template puts ``<|begin_of_image|>``, a placeholder and
    ``<|end_of_image|>`` in the text (the model looks for boi and eoi, two apart) and ``images`` is one
    (3, S, S) image per sequence, which the model turns into features in place of those three."""
    vc = configs.vision_config(config)
    boi, eoi = getattr(config, "boi_token_id", None), getattr(config, "eoi_token_id", None)
    if vc is None or boi is None or eoi is None:
        raise UnsupportedInputs(
            f"model type {config.model_type!r} has no vision tower (vision_config, boi_token_id "
            "and eoi_token_id): it is a text model here; plan it without --image"
        )
    if len(workload.images) != 1:
        raise BadInput(f"GLM-4V takes one image per conversation, not {len(workload.images)}: give one --image")
    row = token_row(workload.prompt, [[boi, TEXT_TOKEN, eoi]], -1)
    inputs: dict[str, Any] = text_inputs(row, workload.batch, device)
    side = vc.image_size
    inputs["images"] = torch.zeros(workload.batch, vc.in_channels, side, side, dtype=dtype, device=device)
    return inputs, _shapes(config, workload)[0].tokens


def _llava(config, workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """pixel_values (images, 3, S, S); the ``<image>`` token expanded to one per image feature (the
    tower's grid, or the count the config declares: Gemma 3's 256 pooled tokens). Used where no
    processor is at hand (a catalog entry)."""
    vc = config.vision_config
    shapes = _shapes(config, workload)
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    runs = [[image_id] * s.tokens for s in shapes]
    inputs = text_inputs(token_row(workload.prompt, runs, image_id), workload.batch, device)
    images = workload.batch * len(shapes)
    inputs["pixel_values"] = torch.zeros(
        images, vc.num_channels, vc.image_size, vc.image_size, dtype=dtype, device=device
    )
    return inputs, sum(s.tokens for s in shapes)


def _mistral3(config, workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Mistral 3 (Pixtral tower): pixel_values (images, 3, H, W) padded to the largest, image_sizes
    (images, 2), both from its own image processor; per image, rows of merged-patch tokens, each row
    ended by ``[IMG_BREAK]`` (the last by ``[IMG_END]``), as PixtralProcessor lays them out."""
    processor = image_processor(
        config,
        "PixtralImageProcessor",
        {"size": {"longest_edge": PIXTRAL_LONGEST_EDGE}, "patch_size": config.vision_config.patch_size},
    )
    enc = processed_images(processor, workload)
    step = config.vision_config.patch_size * config.spatial_merge_size
    image_id = config.image_token_index
    runs = [
        [t for _ in range(h // step) for t in [image_id] * (w // step) + [TEXT_TOKEN]]
        for h, w in enc["image_sizes"].tolist()
    ]
    inputs = text_inputs(token_row(workload.prompt, runs, image_id), workload.batch, device)
    inputs["pixel_values"] = enc["pixel_values"].repeat(workload.batch, 1, 1, 1).to(device, dtype)
    inputs["image_sizes"] = enc["image_sizes"].repeat(workload.batch, 1).to(device)
    return inputs, sum(run.count(image_id) for run in runs)


def _idefics3(config, workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Idefics3 / SmolVLM: its own image processor splits each image into tiles of the tower's square
    (plus the whole image, downscaled); pixel_values (batch, tiles, 3, S, S) with pixel_attention_mask.
    Each tile adds ``(S / patch)^2 / scale_factor^2`` image tokens, between the processor's text markers."""
    enc = processed_images(idefics3_processor(config), workload, nested=True)
    image_id = config.image_token_id
    runs = [[TEXT_TOKEN] + [image_id] * (n * idefics3_per_tile(config)) + [TEXT_TOKEN] for n in idefics3_tiles(enc)]
    inputs = text_inputs(token_row(workload.prompt, runs, image_id), workload.batch, device)
    inputs["pixel_values"] = enc["pixel_values"].repeat(workload.batch, 1, 1, 1, 1).to(device, dtype)
    inputs["pixel_attention_mask"] = enc["pixel_attention_mask"].repeat(workload.batch, 1, 1, 1).to(device)
    return inputs, sum(run.count(image_id) for run in runs)


def _llama4(config, workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Llama 4: pixel_values (tiles, 3, S, S) for every sequence's images, the tiles its image processor
    cuts (``fitmap.planning.profile``: the best-fit canvas, plus a global tile); per tile its patch tokens between
    the processor's tile separators (text)."""
    vc = config.vision_config
    shapes = _shapes(config, workload)
    image_id = config.image_token_index
    runs = [
        [TEXT_TOKEN] + [t for _ in range(s.tiles) for t in [image_id] * (s.tokens // s.tiles) + [TEXT_TOKEN]]
        for s in shapes
    ]
    inputs = text_inputs(token_row(workload.prompt, runs, image_id), workload.batch, device)
    tiles = workload.batch * sum(s.tiles for s in shapes)
    inputs["pixel_values"] = torch.zeros(
        tiles, vc.num_channels, vc.image_size, vc.image_size, dtype=dtype, device=device
    )
    return inputs, sum(s.tokens for s in shapes)


def _llava_onevision(config, workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """LLaVA-OneVision: its own image processor picks each image's tiles among the grid pinpoints
    ("anyres") plus the whole image; pixel_values (images, tiles, 3, S, S), image_sizes; the image
    tokens its processor's own counting gives (unpadded features and row newlines, capped)."""
    enc = processed_images(onevision_processor(config), workload)
    image_id = config.image_token_index
    runs = [[image_id] * onevision_tokens(config, enc, i) for i in range(len(workload.images))]
    inputs = text_inputs(token_row(workload.prompt, runs, image_id), workload.batch, device)
    inputs["pixel_values"] = enc["pixel_values"].repeat(workload.batch, 1, 1, 1, 1).to(device, dtype)
    inputs["image_sizes"] = enc["image_sizes"].repeat(workload.batch, 1).to(device)
    inputs["batch_num_images"] = torch.full((workload.batch,), len(workload.images), dtype=torch.long, device=device)
    return inputs, sum(len(run) for run in runs)


def _mllama(config, workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Llama 3.2 Vision: the images reach the text model through cross-attention, not as tokens. One
    ``<|image|>`` token per image in the text; its image processor's tiles, aspect-ratio ids and masks;
    the cross-attention mask its processor builds from where the image tokens are (transformers' own
    functions for it)."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    processor = model_image_processor(config)
    if processor is None:
        raise UnsupportedInputs("fitmap cannot make image inputs for Llama 3.2 Vision: its image processor is missing")
    image_id = config.image_token_index
    row = token_row(workload.prompt, [[image_id] for _ in workload.images], image_id)
    inputs: dict[str, Any] = text_inputs(row, workload.batch, device)
    images = [blank(w, h) for w, h in workload.images]
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        enc = dict(processor(images=[images] * workload.batch, return_tensors="pt"))
        tiles = enc.pop("num_tiles")
        mask = convert_sparse_cross_attention_mask_to_dense(
            [get_cross_attention_token_mask(row, image_id)] * workload.batch, tiles, processor.max_image_tiles, len(row)
        )
    inputs["cross_attention_mask"] = torch.from_numpy(mask).to(device)
    inputs["pixel_values"] = enc["pixel_values"].to(device, dtype)
    inputs["aspect_ratio_ids"] = enc["aspect_ratio_ids"].to(device)
    inputs["aspect_ratio_mask"] = enc["aspect_ratio_mask"].to(device)
    return inputs, len(workload.images)


_FAMILIES: dict[str, Callable[..., Inputs]] = {
    "mllama": _mllama,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_vl,
    "qwen3_vl": _qwen2_vl,
    "qwen3_vl_moe": _qwen2_vl,
    "internvl": _internvl,
    "llava": _llava,
    "gemma3": _llava,
    "mistral3": _mistral3,
    "glm4v": _glm4v,
    "idefics3": _idefics3,
    "smolvlm": _idefics3,
    "llava_onevision": _llava_onevision,
    "llama4": _llama4,
    "internvl_chat": _internvl_chat,
    "CogVLMForCausalLM": _cogvlm,
    "chatglm": _glm4v_chat,
    # model types whose images are cut by a processor these families use (Qwen3.5: Qwen2-VL's)
    "Qwen2VLImageProcessor": _qwen2_vl,
    "Glm4vProcessor": _glm4v,
    "Glm4vImageProcessor": _glm4v,
    "PixtralImageProcessor": _mistral3,
}


# --------------------------------------------------------------------------- the model's own processor
def _minicpmv(config, workload: Workload, device: torch.device, dtype: torch.dtype, trust_remote_code: bool) -> Inputs:
    """MiniCPM-V 2.x: its own processor (remote code) slices blank images of the workload's sizes
    and makes ``data`` — input_ids, pixel_values (lists per sequence), tgt_sizes, image_bound,
    position_ids — exactly as its ``chat()`` would; the text is then padded to the prompt length.
    The tensors are real (made outside the fake mode): their values drive MiniCPM-V's slicing."""
    from PIL import Image
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers import AutoProcessor

    source = getattr(config, "_name_or_path", "")
    if not source:
        raise UnsupportedInputs(
            "MiniCPM-V's image inputs come from its own processor, and this config does not "
            "say where the model's files are"
        )
    with unset_fake_temporarily():
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        images = [Image.new("RGB", (w, h)) for w, h in workload.images]
        content = "".join("(<image>./</image>)\n" for _ in images) + "x"
        prompt = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if _minicpmv_version(config) >= 2.6:  # a batch of prompts, a list of images for each
            enc = processor([prompt], [images], return_tensors="pt")
        else:  # 2.5 (Llama 3): one prompt and its images, as its chat() calls it
            enc = processor(prompt, images, return_tensors="pt")
        ids = enc["input_ids"]
        bounds = enc["image_bound"][0]
        image_tokens = int(sum(int(e) - int(s) for s, e in bounds))
        text = max(workload.prompt - (ids.shape[1] - image_tokens), 0)
        ids = torch.cat([ids, torch.full((1, text), TEXT_TOKEN, dtype=ids.dtype)], dim=1).repeat(workload.batch, 1)
        pixels, sizes = enc["pixel_values"][0], enc["tgt_sizes"][0]
    # on the input device, as chat() moves them (.to(self.device)); fake from here, values kept as twins
    ids, bounds, sizes = ids.to(device), bounds.to(device), sizes.to(device)
    data = {
        "input_ids": ids,
        "pixel_values": [[p.to(device, dtype) for p in pixels] for _ in range(workload.batch)],
        "tgt_sizes": [sizes] * workload.batch,
        "image_bound": [bounds] * workload.batch,
        "position_ids": torch.arange(ids.shape[1], device=device).unsqueeze(0).repeat(workload.batch, 1),
    }
    mask = torch.ones(ids.shape, dtype=torch.long, device=device)
    return {"data": data, "attention_mask": mask, "_input_ids": ids}, image_tokens


def _minicpmv_version(config) -> float:
    """MiniCPM-V's release (its config's ``version``: 2.5, 2.6; 2.6 when absent)."""
    try:
        return float(getattr(config, "version", None) or 2.6)
    except (TypeError, ValueError):
        return 2.6


_OWN_PROCESSOR: dict[str, Callable[..., Inputs]] = {"minicpmv": _minicpmv}


def _from_processor(
    config, workload: Workload, device: torch.device, dtype: torch.dtype, trust_remote_code: bool
) -> Inputs | None:
    """The inputs a user's call makes: the model's own processor (from its directory) and chat
    template, on blank images of the workload's sizes, for the whole batch; the text then padded
    with ordinary tokens to the prompt length. Image tokens are counted as the processor placed
    them. None when the model's directory has no processor fitmap can load offline (the family
    builders below then apply). Tensors are made for real, then moved onto the (fake) device:
    integer inputs keep their values."""
    from pathlib import Path

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    source = getattr(config, "_name_or_path", "")
    image_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    if not source or not Path(source).is_dir() or image_id is None:
        return None
    with unset_fake_temporarily():
        enc = _processed(source, workload, trust_remote_code)
        if enc is None:
            return None
        ids = enc["input_ids"]
        image_tokens = int((ids[0] == int(image_id)).sum())
        if image_tokens == 0:
            return None
        pad = max(workload.prompt - (ids.shape[1] - image_tokens), 0)
        per_token = {k for k, v in enc.items() if isinstance(v, torch.Tensor) and v.shape[:2] == ids.shape}
        for k in per_token:  # the text made longer: ordinary tokens, attended, of no special type
            fill = TEXT_TOKEN if k == "input_ids" else (1 if k == "attention_mask" else 0)
            enc[k] = torch.cat([enc[k], torch.full((ids.shape[0], pad), fill, dtype=enc[k].dtype)], dim=1)
    out = {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
        for k, v in enc.items()
    }
    return out, image_tokens


def _processed(source: str, workload: Workload, trust_remote_code: bool) -> dict | None:
    """The processor's output for the workload (batch x the images, one short user turn), or None."""
    import transformers
    from PIL import Image

    try:
        processor = transformers.AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception:  # no processor files, a library it needs (torchvision), remote code not allowed
        return None
    if not isinstance(processor, transformers.ProcessorMixin) or not getattr(processor, "chat_template", None):
        return None
    images = [Image.new("RGB", (w, h)) for w, h in workload.images]
    turn: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": "x"}]}
    ]
    try:
        text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        return dict(processor(text=[text] * workload.batch, images=[images] * workload.batch, return_tensors="pt"))
    except Exception:
        return None
