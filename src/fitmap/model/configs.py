"""A model's config read under any of the names model code uses.

Native transformers configs say ``num_hidden_layers`` and ``num_key_value_heads``;
remote code says what its authors chose: ChatGLM ``num_layers``,
``multi_query_group_num``, ``kv_channels``, ``padded_vocab_size``, ``seq_length``,
``ffn_hidden_size``; GPT-2 style ``n_embd`` / ``n_head`` / ``n_layer``. VLMs keep
their text model's config under ``text_config``, ``llm_config`` (InternVL),
``language_config`` or at the top level (MiniCPM-V, CogVLM), and a vision config
as an object or a plain dict (CogVLM2). :func:`text_config` and
:func:`vision_config` give one view over all of them; a value no name provides
raises :class:`MissingConfigValue`, one line naming the names tried.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

from fitmap.errors import BadInput

ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_key_value_heads": (
        "num_key_value_heads",
        "multi_query_group_num",
        "num_multi_query_heads",
        "n_head_kv",
        "num_kv_heads",
        "n_kv_heads",
    ),
    "head_dim": ("head_dim", "kv_channels"),
    "num_hidden_layers": ("num_hidden_layers", "num_layers", "n_layer", "n_layers"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim"),
    "max_position_embeddings": (
        "max_position_embeddings",
        "seq_length",
        "max_sequence_length",
        "n_positions",
        "max_seq_len",
    ),
}
TEXT_KEYS = ("text_config", "llm_config", "language_config", "text_model_config")


class MissingConfigValue(BadInput, AttributeError):
    """A value fitmap needs that the config gives under none of the names it knows."""


class ConfigView:
    """Attribute access over a config (object or dict) that resolves the aliases above."""

    def __init__(self, config: Any, what: str = "config") -> None:
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_what", what)

    def __getattr__(self, name: str) -> Any:
        config = object.__getattribute__(self, "_config")
        for alias in ALIASES.get(name, (name,)):
            if alias == "multi_query_group_num" and _get(config, "multi_query_attention") is False:
                continue  # ChatGLM without multi-query attention: one KV head per head
            value = _get(config, alias)
            if value is not None:
                return value
        if name.startswith("_"):
            raise AttributeError(name)
        raise MissingConfigValue(
            f"the model's {object.__getattribute__(self, '_what')} gives no {name} "
            f"(looked for {', '.join(ALIASES.get(name, (name,)))}); fitmap cannot size this "
            "model from its config: report it with the model's config.json"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a config view is read-only")


def _get(config: Any, name: str) -> Any:
    if isinstance(config, dict):
        return config.get(name)
    try:
        return getattr(config, name, None)
    except Exception:  # transformers 5 configs raise on some removed attributes
        return None


def text_config(config: Any) -> ConfigView:
    """The text model's config, wherever the model keeps it."""
    if isinstance(config, ConfigView):
        return config
    for key in TEXT_KEYS:
        inner = _get(config, key)
        if inner is not None and _get(inner, "hidden_size") is not None:
            return ConfigView(inner, f"{key}")
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            inner = get()
        except Exception:
            inner = config
        return ConfigView(inner if inner is not None else config)
    return ConfigView(config)


def vision_config(config: Any) -> Any:
    """The vision config as an attribute object (CogVLM2 keeps a plain dict), or None."""
    vc = _get(config, "vision_config")
    if isinstance(vc, dict):
        return SimpleNamespace(**vc)
    return vc


def model_type(config: Any) -> str:
    """``model_type``, or for remote code whose config has none (CogVLM) its architecture's name."""
    name = _get(config, "model_type")
    if name:
        return str(name)
    arch = _get(config, "architectures")
    return str(arch[0]) if isinstance(arch, (list, tuple)) and arch else ""


def names(config: Any) -> list[str]:
    """Every name a model goes by, most specific first: its ``model_type``, its architectures, and
    the classes its ``auto_map`` names (``modeling_cogvlm.CogVLMForCausalLM`` -> ``CogVLMForCausalLM``)."""
    out = [str(n) for n in [_get(config, "model_type")] if n]
    arch = _get(config, "architectures")
    out += [str(a) for a in arch] if isinstance(arch, (list, tuple)) else []
    auto = _get(config, "auto_map")
    if isinstance(auto, dict):
        for ref in auto.values():
            for r in ref if isinstance(ref, (list, tuple)) else [ref]:
                if isinstance(r, str):
                    out.append(r.rsplit("--", 1)[-1].rsplit(".", 1)[-1])
    out += processor_names(str(_get(config, "model_type") or ""))
    return list(dict.fromkeys(out))


# bases every processor shares: naming them would make every model one family
_GENERIC_PROCESSORS = {
    "ProcessorMixin",
    "BaseImageProcessor",
    "ImageProcessingMixin",
    "TorchvisionBackend",
    "PilBackend",
}


@lru_cache(maxsize=256)
def processor_names(model_type: str) -> list[str]:
    """The processor and image-processor classes transformers pairs with ``model_type``, with the
    classes they derive from (``Glm46VImageProcessor`` is a ``Glm4vImageProcessor``; Qwen3.5 uses
    ``Qwen2VLImageProcessor``): a model whose images are cut as another family's is that family
    for its images. The PIL and torchvision variants go by one name."""
    if not model_type:
        return []
    try:
        from transformers.models.auto import image_processing_auto, processing_auto
    except ImportError:
        return []
    found: list[str] = []
    model_type = processor_type(model_type)
    image = image_processing_auto.IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    refs = [processing_auto.PROCESSOR_MAPPING_NAMES.get(model_type)]
    refs += list(image.values()) if isinstance(image, dict) else [image]
    for ref in refs:
        for name in ref if isinstance(ref, (list, tuple)) else [ref]:
            cls = processor_class(name) if isinstance(name, str) else None
            chain = [c.__name__ for c in cls.__mro__] if isinstance(cls, type) else [name] if name else []
            found += [n.removesuffix("Pil") for n in chain if n.endswith(("Processor", "ProcessorPil"))]
    return [n for n in dict.fromkeys(found) if n not in _GENERIC_PROCESSORS]


def processor_type(model_type: str) -> str:
    """The model type transformers files the processors of ``model_type`` under: an omni model's
    thinker (``qwen2_5_omni_thinker``) takes the whole model's (``qwen2_5_omni``)."""
    from transformers.models.auto import image_processing_auto, processing_auto

    known = processing_auto.PROCESSOR_MAPPING_NAMES.keys() | image_processing_auto.IMAGE_PROCESSOR_MAPPING_NAMES.keys()
    whole = model_type.removesuffix("_thinker")
    return whole if model_type not in known and whole in known else model_type


def processor_class(name: str) -> Any:
    """transformers' class named ``name``: its PIL variant when there is one (the torchvision one
    warns where torchvision is missing, and both derive from the same classes); None if missing."""
    import transformers

    for candidate in (name if name.endswith("Pil") else f"{name}Pil", name):
        try:
            cls = getattr(transformers, candidate)
        except Exception:  # no such class, or a backend it needs is missing
            continue
        if isinstance(cls, type):
            return cls
    return None


def family(config: Any, known: Collection[str]) -> str:
    """The name among ``known`` that this model goes by (:func:`names`), else :func:`model_type`.
    A model is recognised by what it is, not only by ``model_type``: deployment guides add
    ``"model_type": "cogvlm2"`` to CogVLM2's config, whose code fitmap knows by its class."""
    return next((n for n in names(config) if n in known), model_type(config))


# The attribute a catalog entry's config carries its stored image-processor settings under.
IMAGE_PROCESSOR_ATTR = "fitmap_image_processor"


def image_processor_config(config: Any) -> dict | None:
    """The image processor's settings: what the catalog keeps with an entry, else the model
    directory's ``preprocessor_config.json`` (or ``processor_config.json``'s ``image_processor``),
    else None."""
    kept = _get(config, IMAGE_PROCESSOR_ATTR)
    if isinstance(kept, dict):
        return kept
    return _processor_file(str(_get(config, "_name_or_path") or ""))


@lru_cache(maxsize=64)
def _processor_file(source: str) -> dict | None:
    """The image-processor settings saved in directory ``source`` (read once: the planner sizes
    images many times per plan). Shared: callers read it, never change it."""
    import json
    from pathlib import Path

    if not source or not Path(source).is_dir():
        return None
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        try:
            data = json.loads((Path(source) / name).read_text())
        except (OSError, ValueError):
            continue
        data = data.get(key) if key and isinstance(data, dict) else data
        if isinstance(data, dict):
            return data
    return None
