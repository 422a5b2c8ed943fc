"""Checkpoint tensor names -> the model's parameter names.

transformers 5 renames (and for some families merges) checkpoint keys when it
loads: Qwen2-VL checkpoints say ``model.layers.0...`` for the module
``model.language_model.layers.0``, Mixtral's per-expert ``w1/w2/w3`` become one
fused ``experts.gate_up_proj``. fitmap uses transformers' own conversion table for
the names, so header bytes land on the right unit and the loader finds each
tensor's destination.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _conversions(model: nn.Module):
    """transformers' renamings and converters for ``model``, its state dict and base prefix, and
    its ``rename_source_key``; None on an older transformers (names are stored as is)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        from fitmap.model.quant import of

        transforms = get_model_conversion_mapping(cast("PreTrainedModel", model), None, of(model))  # an HF model
    except (ImportError, AttributeError, TypeError):
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None
    return renamings, converters, model.state_dict(), prefix, rename_source_key


def key_mapper(model: nn.Module) -> Callable[[str], tuple[str, bool]]:
    """A function ``checkpoint key -> (model key, converted)``.

    ``converted`` is True when a many-to-one conversion (e.g. expert fusion) owns
    the key: its bytes belong to the target parameter, but it cannot be copied
    into it as is.
    """
    found = _conversions(model)
    if found is None:
        return lambda key: (key, False)
    renamings, converters, state, prefix, rename = found
    quantized = quantized_keys(model)

    def mapped(key: str) -> tuple[str, bool]:
        if key in state and key not in quantized:
            return key, False
        target, via = rename(key, renamings, converters, prefix, state)
        return target, via is not None

    return mapped


def quantized_keys(model: nn.Module) -> frozenset[str]:
    """Parameters a quantizer replaced (their checkpoint tensor is one part of several)."""
    from fitmap.model.quant import is_quantized_tensor, of

    if of(model) is None:
        return frozenset()
    return frozenset(n for n, t in model.named_parameters(remove_duplicate=False) if is_quantized_tensor(t))


@dataclass(frozen=True)
class Merge:
    """A model tensor transformers builds from several checkpoint tensors on load (Qwen3-MoE's
    per-expert ``gate_proj``/``up_proj`` into one ``experts.gate_up_proj``): transformers' own
    converter, and per source pattern the checkpoint keys in the order it stacks them."""

    target: str
    converter: Any
    sources: tuple[tuple[str, tuple[str, ...]], ...]  # (source pattern, checkpoint keys in order)
    first: str = ""  # a split (one stored tensor, several model tensors): the first target's key
    config: Any = field(default=None, repr=False, compare=False)  # what some operations read (rotary permutes)

    def build(self, read: Callable[[str], Any], model: nn.Module | None = None) -> Any:
        """The target tensor from the checkpoint tensors ``read(key)`` gives, by the converter's
        operations (a quantizer's deserialization needs the ``model`` whose module it fills). A split
        converter's outputs are named as transformers names them: the first target's key with its
        pattern replaced by each target pattern."""
        collected = {pattern: [read(k) for k in keys] for pattern, keys in self.sources}
        patterns = list(self.converter.source_patterns)
        first = self.first or self.target
        for op in self.converter.operations:
            collected = op.convert(
                collected,
                source_patterns=patterns,
                model=model,
                config=self.config if self.config is not None else getattr(model, "config", None),
                target_patterns=list(self.converter.target_patterns),
                full_layer_name=first,
                missing_keys=None,
            )
        if len(collected) > 1:
            prefix, suffix = next((first.partition(k)[0], first.partition(k)[2]) for k in collected if k in first)
            tensor = collected[next(k for k in collected if prefix + k + suffix == self.target)]
        else:
            (tensor,) = collected.values()
        return tensor[0] if isinstance(tensor, list) else tensor


def split_targets(model: nn.Module, ckpt_keys: list[str]) -> dict[str, list[str]]:
    """First model key -> the other keys a split converter fills from the same stored tensors."""
    found = _conversions(model)
    if found is None:
        return {}
    renamings, converters, state, prefix, rename = found
    out: dict[str, list[str]] = {}
    for key in ckpt_keys:
        target, pattern = rename(key, renamings, converters, prefix, state)
        conv = next((c for c in converters if pattern in c.source_patterns), None) if pattern else None
        siblings = split_siblings(conv, target, state) if conv is not None else []
        if siblings:
            out[target] = siblings
    return out


def split_siblings(converter: Any, target: str, state: Mapping[str, Any]) -> list[str]:
    """The other model keys a split converter fills from the tensor that fills ``target`` (q, k and v from
    one ``in_proj``), as transformers names them: ``target`` with its first target pattern replaced."""
    patterns = list(getattr(converter, "target_patterns", ()) or ())
    if len(patterns) < 2 or patterns[0] not in target:
        return []
    return [t for p in patterns[1:] if (t := target.replace(patterns[0], p)) in state and t != target]


def merges(model: nn.Module, ckpt_keys: list[str]) -> dict[str, Merge]:
    """Model key -> :class:`Merge` for every tensor the checkpoint stores split (empty on
    transformers versions without conversion mappings)."""
    found = _conversions(model)
    if found is None:
        return {}
    renamings, converters, state, prefix, rename_source_key = found
    groups: dict[str, dict[str, list[str]]] = {}
    owner: dict[str, Any] = {}
    for key in ckpt_keys:
        target, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if pattern is None or target not in state:
            continue
        conv = next((c for c in converters if pattern in c.source_patterns), None)
        if conv is None:
            continue
        owner[target] = conv
        groups.setdefault(target, {}).setdefault(pattern, []).append(key)
    out = {}
    for target, by_pattern in groups.items():
        if [k for keys in by_pattern.values() for k in keys] == [target] and not split_siblings(
            owner[target], target, state
        ):
            continue  # a quantizer's converter met a tensor stored as is (a norm, a skipped module)
        conv = owner[target]
        ordered = tuple(
            (p, tuple(sorted(by_pattern[p], key=_natural))) for p in conv.source_patterns if p in by_pattern
        )
        config = getattr(model, "config", None)
        out[target] = Merge(target, conv, ordered, target, config)
        for sibling in split_siblings(conv, target, state):
            out[sibling] = Merge(sibling, conv, ordered, target, config)
    return out


def _natural(key: str) -> tuple:
    """``experts.10`` after ``experts.9``."""
    return tuple(int(part) if part.isdigit() else part for part in key.split("."))
