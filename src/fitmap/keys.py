"""Checkpoint tensor names -> the model's parameter names.

transformers 5 renames (and for some families merges) checkpoint keys when it
loads: Qwen2-VL checkpoints say ``model.layers.0...`` for the module
``model.language_model.layers.0``, Mixtral's per-expert ``w1/w2/w3`` become one
fused ``experts.gate_up_proj``. fitmap uses transformers' own conversion table for
the names, so header bytes land on the right unit and the loader finds each
tensor's destination.
"""

from __future__ import annotations

from typing import Callable

from torch import nn


def key_mapper(model: nn.Module) -> Callable[[str], tuple[str, bool]]:
    """A function ``checkpoint key -> (model key, converted)``.

    ``converted`` is True when a many-to-one conversion (e.g. expert fusion) owns
    the key: its bytes belong to the target parameter, but it cannot be copied
    into it as is.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError):  # an older transformers: names are stored as is
        return lambda key: (key, False)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None

    def mapped(key: str) -> tuple[str, bool]:
        if key in state:
            return key, False
        target, via = rename_source_key(key, renamings, converters, prefix, state)
        return target, via is not None

    return mapped
