"""Images in tokens: how many tokens, patches and tiles one image of W x H pixels becomes in a
model, as that model's image processor cuts it.

Per family, the processor's own arithmetic (Qwen's pixel limits and 2x2 merges, Pixtral's longest
edge, InternVL's closest tile grid, Llama 4's best-fit canvas, fixed-size towers); where the
arithmetic is the processor's alone (Idefics3 / SmolVLM splits, LLaVA-OneVision's "anyres"
pinpoints), the model's own image processor is run on a blank image of that size.
:func:`image_shape` is the one entry point; the profile sizes activations and KV with it, the
simulator lays out its inputs with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from fitmap.model import configs
from fitmap.planning.workload import Workload


# --------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageShape:
    tokens: int  # tokens the image adds to the text sequence
    patches: int  # sequence length through the vision tower (all tiles)
    tiles: int  # separate vision passes (batch of the tower)


# Pixel limits of the Qwen-VL families' published preprocessor_config.json (size.shortest_edge and
# size.longest_edge, in pixels), for a config that comes without its processor's files.
QWEN_PIXELS = {
    "qwen2_vl": (56 * 56, 12845056),
    "qwen2_5_vl": (56 * 56, 12845056),
    "qwen3_vl": (65536, 16777216),
    "qwen3_vl_moe": (65536, 16777216),
}
# model types that share Qwen3-VL's processor (Qwen3.5, Qwen3.5-MoE) take its published limits
_QWEN_PROCESSORS = {"Qwen3VLProcessor": "qwen3_vl"}


def qwen_pixel_limits(cfg) -> tuple[int, int]:
    """(min, max) pixels an image is resized between: the model's image processor settings when
    known (its files, or the catalog's copy), else its family's published ones."""
    kind = configs.family(cfg, QWEN_PIXELS.keys() | _QWEN_PROCESSORS.keys())
    lo, hi = QWEN_PIXELS.get(_QWEN_PROCESSORS.get(kind, kind), QWEN_PIXELS["qwen2_vl"])
    proc = configs.image_processor_config(cfg) or {}
    size = proc.get("size")
    if not isinstance(size, dict):
        size = {}
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
    size = proc.get("size")
    if not isinstance(size, dict):
        size = {}
    patch, merge, frames = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    hb, wb = smart_resize(
        frames,
        h,
        w,
        temporal_factor=frames,
        factor=patch * merge,
        min_pixels=size.get("shortest_edge", GLM4V_PIXELS[0]),
        max_pixels=size.get("longest_edge", GLM4V_PIXELS[1]),
    )
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
    best = closest_grid(w, h, size, int(getattr(cfg, "max_dynamic_patch", None) or 12))
    thumbnail = getattr(cfg, "use_thumbnail", True) is not False
    tiles = best[0] * best[1] + (1 if thumbnail and best[0] * best[1] > 1 else 0)
    per_tile = (size // patch) ** 2
    ratio = getattr(cfg, "downsample_ratio", 0.5)
    return ImageShape(tiles * int(per_tile * ratio * ratio), tiles * (per_tile + 1), tiles)


def closest_grid(w: int, h: int, size: int, max_tiles: int = 12) -> tuple[int, int]:
    """InternVL's rule: the closest aspect ratio; on a tie, the larger grid if the image is big enough."""
    grids = sorted(
        {(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1) if i * j <= max_tiles},
        key=lambda g: g[0] * g[1],
    )
    aspect, best, best_diff = w / h, (1, 1), float("inf")
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff or (diff == best_diff and w * h > 0.5 * size * size * i * j):
            best, best_diff = (i, j), diff
    return best


def _cogvlm(cfg, w: int, h: int) -> ImageShape:
    """CogVLM: resized to the tower's square, boi and eoi around its grid. CogVLM2 (its config has
    ``num_multi_query_heads``) halves the grid with a 2x2 conv; CogVLM v1 keeps one token per patch."""
    vc = configs.vision_config(cfg)
    grid = vc.image_size // vc.patch_size
    side = grid // 2 if getattr(cfg, "num_multi_query_heads", None) is not None else grid
    return ImageShape(side * side + 2, grid * grid + 1, 1)


def _glm4v_chat(cfg, w: int, h: int) -> ImageShape:
    """GLM-4V (ChatGLM4 + EVA2-CLIP, remote code): resized to the tower's square, a 2x2 conv halves the
    grid, learned boi/eoi vectors around it; the features replace the prompt's three marker tokens
    (``<|begin_of_image|><|endoftext|><|end_of_image|>``), so the sequence grows by grid^2 / 4 - 1."""
    vc = configs.vision_config(cfg)
    grid = vc.image_size // vc.patch_size
    return ImageShape((grid // 2) ** 2 - 1, grid * grid + 1, 1)


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
    """Idefics3 / SmolVLM: the tiles its own image processor cuts (``fitmap.simulation.vision_inputs``)."""
    return idefics3_shape(cfg, w, h)


def _onevision(cfg, w: int, h: int) -> ImageShape:
    """LLaVA-OneVision: the tiles and token count of its own processor (``fitmap.simulation.vision_inputs``)."""
    return onevision_shape(cfg, w, h)


def _llama4(cfg, w: int, h: int) -> ImageShape:
    """Llama 4: tiles of the tower's square on the canvas its image processor picks (the grid of at most
    ``max_patches`` tiles needing the least upscaling, else the least downscaling; the smallest on a
    tie), plus a global tile when there are several; each tile pixel-shuffled to a quarter."""
    vc = configs.vision_config(cfg)
    side = vc.image_size
    proc = configs.image_processor_config(cfg) or {}
    max_tiles = int(proc.get("max_patches") or LLAMA4_MAX_TILES)
    canvases = sorted(
        {(a * side, n // a * side) for n in range(1, max_tiles + 1) for a in range(1, n + 1) if n % a == 0}
    )
    scales = [min(ch / h, cw / w) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    _, ch, cw = min((ch * cw, ch, cw) for (ch, cw), s in zip(canvases, scales) if s == chosen)
    grid = (ch // side) * (cw // side)
    tiles = grid + (1 if grid > 1 else 0)
    per_tile = (side // vc.patch_size) ** 2
    ratio = getattr(vc, "pixel_shuffle_ratio", 0.5)
    return ImageShape(tiles * int(per_tile * ratio * ratio), tiles * per_tile, tiles)


LLAMA4_MAX_TILES = 16  # Llama 4's published preprocessor_config.json (max_patches)


IMAGE_SHAPES: dict[str, Callable] = {
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_vl,
    "qwen3_vl": _qwen2_vl,
    "qwen3_vl_moe": _qwen2_vl,
    "internvl": _internvl,
    "mistral3": _pixtral,
    "glm4v": _glm4v,
    "idefics3": _idefics3,
    "smolvlm": _idefics3,
    "llava_onevision": _onevision,
    "llama4": _llama4,
    "llava": _llava_shape,
    "internvl_chat": _internvl,
    "CogVLMForCausalLM": _cogvlm,
    "chatglm": _glm4v_chat,
}


def _mllama(cfg, w: int, h: int) -> ImageShape:
    """Llama 3.2 Vision: one ``<|image|>`` token in the text; the tower sees up to ``max_num_tiles``
    tiles of its square (plus a CLS each), which the cross-attention layers attend to."""
    vc = configs.vision_config(cfg)
    tiles = int(getattr(vc, "max_num_tiles", 4))
    return ImageShape(1, tiles * ((vc.image_size // vc.patch_size) ** 2 + 1), tiles)


IMAGE_SHAPES["mllama"] = _mllama

# families known by the processor their model type shares (Qwen3.5 cuts images as Qwen2-VL does)
IMAGE_SHAPES |= {
    "Qwen2VLImageProcessor": _qwen2_vl,
    "Glm4vProcessor": _glm4v,
    "Glm4vImageProcessor": _glm4v,
    "PixtralImageProcessor": _pixtral,
}


def image_shape(config, w: int, h: int) -> ImageShape:
    kind = configs.family(config, IMAGE_SHAPES)
    fn = IMAGE_SHAPES.get(kind)
    if fn is None:
        vc = configs.vision_config(config)
        fixed = vc is not None and isinstance(getattr(vc, "image_size", None), int) and hasattr(vc, "patch_size")
        fn = _fixed_size if fixed else _by_processor
    return fn(config, w, h)


def _by_processor(cfg, w: int, h: int) -> ImageShape:
    """A tower fitmap has no arithmetic for: its own image processor cuts a blank image, and the
    patches are counted from what it returns (flattened patches, or tiles of a square); tokens are
    the count the config declares, else one per merged patch. The simulator replaces this estimate
    with the count the model's own ``get_image_features`` returns."""
    processor = model_image_processor(cfg)
    if processor is None:
        raise configs.MissingConfigValue(
            f"fitmap cannot size images for model type {configs.model_type(cfg)!r}: its vision config has no "
            "image_size and its image processor is not available here (it may need torchvision); plan it "
            "without --image"
        )
    enc = processed_images(processor, Workload(images=((w, h),)))
    import torch

    pixels = next(  # Pix2Struct's and Kosmos-2.5's processors give flattened_patches
        (v for k, v in enc.items() if k in ("pixel_values", "flattened_patches") and isinstance(v, torch.Tensor)), None
    )
    if pixels is None:
        raise configs.MissingConfigValue(
            f"fitmap cannot size images for model type {configs.model_type(cfg)!r}: its image processor gives "
            f"no pixel values ({', '.join(enc) or 'nothing'}); plan it without --image"
        )
    vc = configs.vision_config(cfg)
    patch = _side(getattr(vc, "patch_size", None) or 14)
    merge = int(getattr(vc, "spatial_merge_size", None) or getattr(processor, "merge_size", None) or 1)
    if pixels.dim() == 2:  # flattened patches, one row each (Qwen-style towers)
        patches, tiles = int(pixels.shape[0]), 1
    elif pixels.dim() == 3:  # (images, patches, pixels per patch), padded (Gemma 4)
        patches, tiles = int(pixels.shape[1]), 1
    else:  # (tiles, C, H, W), or (images, tiles, C, H, W)
        tiles = int(pixels.shape[:-3].numel())
        patches = tiles * (int(pixels.shape[-2]) // patch) * (int(pixels.shape[-1]) // patch)
    declared = next((getattr(cfg, k) for k in DECLARED_IMAGE_TOKENS if isinstance(getattr(cfg, k, None), int)), None)
    counted = next((v for k, v in enc.items() if k.startswith("num_") and k.endswith("tokens_per_image")), None)
    if counted is not None:  # the processor counts them itself (Gemma 4's soft tokens)
        declared = int(counted[0] if isinstance(counted, (list, tuple)) else counted.flatten()[0])
    return ImageShape(declared or max(1, patches // (merge * merge)), patches, tiles)


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def model_image_processor(config):
    """The image processor transformers pairs with the model's type, with the model's own settings
    (its files, the catalog's copy), else its class defaults fitted to the vision tower: the tower's
    square where the processor resizes to a fixed size, its patch and merge sizes. None when the
    model type has none, or it needs a library that is missing (torchvision)."""
    from transformers.models.auto import image_processing_auto

    names = image_processing_auto.IMAGE_PROCESSOR_MAPPING_NAMES.get(configs.processor_type(configs.model_type(config)))
    for name in names.values() if isinstance(names, dict) else [names] if names else []:
        cls = configs.processor_class(name)
        if cls is None:
            continue
        try:
            saved = configs.image_processor_config(config)
            if saved is not None:
                return cls.from_dict(
                    {k: v for k, v in saved.items() if k not in ("image_processor_type", "processor_class")}
                )
            return cls(**_tower_settings(cls(), config))
        except Exception:  # a backend it needs (torchvision) is missing, or settings it refuses
            continue
    return None


def _tower_settings(processor, config) -> dict:
    """Settings that make ``processor`` (its class defaults) cut images for this config's tower."""
    vc = configs.vision_config(config)
    out: dict = {}
    side = getattr(vc, "image_size", None)
    side = _side(side) if side else None
    size = getattr(processor, "size", None)
    if isinstance(size, dict):  # an older image processor keeps a plain dict
        from types import SimpleNamespace

        size = SimpleNamespace(**size)
    if side and size is not None:
        if getattr(size, "height", None) and getattr(size, "width", None):
            out["size"] = {"height": side, "width": side}
        elif getattr(size, "shortest_edge", None) and not getattr(size, "longest_edge", None):
            out["size"] = {"shortest_edge": side}
            if getattr(processor, "crop_size", None) is not None:
                out["crop_size"] = {"height": side, "width": side}
    for attr, key in (
        ("patch_size", "patch_size"),
        ("merge_size", "spatial_merge_size"),
        ("temporal_patch_size", "temporal_patch_size"),
    ):
        value = getattr(vc, key, None) or getattr(config, key, None)
        if attr == "temporal_patch_size" and not value and getattr(vc, "patch_size", None):
            value = 1  # a tower naming no temporal patch cuts 2-D patches (dots.ocr, LLaVA-OneVision-1.5)
        if getattr(processor, attr, None) is not None and value:
            out[attr] = _side(value)
    high = getattr(getattr(config, "high_res_vision_config", None), "image_size", None)
    if high and getattr(processor, "high_res_size", None) is not None:  # DeepSeek-VL hybrid's SAM tower
        out["high_res_size"] = {"height": _side(high), "width": _side(high)}
    tiles = getattr(vc, "max_num_tiles", None)
    if tiles and getattr(processor, "max_image_tiles", None) is not None:  # Llama 3.2 Vision
        out["max_image_tiles"] = tiles
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if pinpoints and getattr(processor, "image_grid_pinpoints", None) is not None:
        out["image_grid_pinpoints"] = pinpoints
    return out


def idefics3_shape(config, w: int, h: int) -> ImageShape:
    """Tokens, patches and tiles of one image, as Idefics3's / SmolVLM's image processor splits it."""
    tiles = idefics3_tiles(processed_images(idefics3_processor(config), Workload(images=((w, h),)), nested=True))[0]
    vc = config.vision_config
    return ImageShape(tiles * idefics3_per_tile(config), tiles * (vc.image_size // vc.patch_size) ** 2, tiles)


def idefics3_processor(config):
    side = config.vision_config.image_size  # published: the tower's side, and 4 of them for the longest edge
    name = "SmolVLMImageProcessor" if configs.model_type(config) == "smolvlm" else "Idefics3ImageProcessor"
    return image_processor(config, name, {"size": {"longest_edge": 4 * side}, "max_image_size": {"longest_edge": side}})


def idefics3_per_tile(config) -> int:
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 // config.scale_factor**2


def idefics3_tiles(enc: dict) -> list[int]:
    """Tiles per image: rows x cols when split, plus the global image; 1 when not split."""
    return [r * c + 1 if r * c else 1 for r, c in zip(enc["rows"][0], enc["cols"][0])]


def onevision_shape(config, w: int, h: int) -> ImageShape:
    """Tokens, patches and tiles of one image, as LLaVA-OneVision's processor makes and counts them."""
    enc = processed_images(onevision_processor(config), Workload(images=((w, h),)))
    vc = config.vision_config
    tiles = int(enc["pixel_values"].shape[1])
    return ImageShape(onevision_tokens(config, enc, 0), tiles * (vc.image_size // vc.patch_size) ** 2, tiles)


def onevision_processor(config):
    side = config.vision_config.image_size
    return image_processor(
        config,
        "LlavaOnevisionImageProcessor",
        {"size": {"height": side, "width": side}, "image_grid_pinpoints": config.image_grid_pinpoints},
    )


def onevision_tokens(config, enc: dict, index: int) -> int:
    """Image tokens of image ``index``, by LlavaOnevisionProcessor's own counting methods (called on a
    stand-in holding what they read: the image processor's pinpoints, the tower's tokens, the cap)."""
    from types import SimpleNamespace

    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor as P

    vc = config.vision_config
    counter = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints),
        num_image_tokens=(vc.image_size // vc.patch_size) ** 2,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )
    unpadded = P._get_unpadded_features
    counter._get_unpadded_features = lambda *a: unpadded(counter, *a)  # type: ignore[arg-type]  # a stand-in
    if len(enc["image_sizes"]) > 1:  # several images: each is its base tile and a newline
        tokens = counter.num_image_tokens + 1
    else:
        height, width = enc["image_sizes"][index].tolist()
        side = vc.image_size
        tokens = P._get_number_of_features(counter, height, width, side, side)  # type: ignore[arg-type]  # a stand-in
    return tokens - (1 if config.vision_feature_select_strategy == "default" else 0)


def image_processor(config, name: str, defaults: dict):
    """The model's own image processor class, with its settings (its files, the catalog's copy) or
    the family's published ones; the PIL implementation where torchvision is missing."""
    import importlib.util

    import transformers

    settings = {
        k: v
        for k, v in (configs.image_processor_config(config) or defaults).items()
        if k not in ("image_processor_type", "processor_class")
    }
    pil = getattr(transformers, f"{name}Pil", None)
    cls = pil if pil is not None and importlib.util.find_spec("torchvision") is None else getattr(transformers, name)
    return cls.from_dict(settings)


def processed_images(processor, workload: Workload, nested: bool = False) -> dict:
    """The image processor's output for one sequence's images (blank, of the workload's sizes), made
    for real (outside any fake mode): sizes and grids drive the model's own arithmetic. ``nested``:
    the processor takes a list of images per sequence (and says how it split them)."""
    from PIL import Image
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    images = [Image.new("RGB", (w, h)) for w, h in workload.images]
    with unset_fake_temporarily():
        if nested:
            return dict(processor(images=[images], return_tensors="pt", return_row_col_info=True))
        return dict(processor(images=images, return_tensors="pt"))
