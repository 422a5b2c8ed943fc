"""Facts about a torch module tree that every stage asks (no fitmap import, no model code)."""

from __future__ import annotations

from torch import nn


def tied_parameters(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    by_storage: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(id(p), []).append(name)
    return tuple(tuple(names) for names in by_storage.values() if len(names) > 1)


def has_state(module: nn.Module) -> bool:
    """The module or one under it holds a parameter or a buffer."""
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def generation_owner(model: nn.Module) -> nn.Module:
    """The module ``generate`` runs decode steps on. Remote-code VLMs (InternVL) and BLIP-2 style
    models (BLIP-2, InstructBLIP, Kosmos-2) define their own ``generate`` that merges image features
    into the embeddings once and hands ``inputs_embeds`` to their language model's ``generate``:
    decoding runs there."""
    own = getattr(type(model), "generate", None)
    if own is None or not _own_generate(own):
        return model
    for name in ("language_model", "llm", "text_model"):
        child = getattr(model, name, None)
        if isinstance(child, nn.Module) and callable(getattr(child, "prepare_inputs_for_generation", None)):
            return child
    return model


def _own_generate(fn) -> bool:
    """Is ``fn`` a ``generate`` of the model's own (remote code, or a model class's override)?"""
    if getattr(fn, "__module__", "").startswith("transformers_modules"):
        return True
    try:
        from transformers import GenerationMixin
    except ImportError:
        return False
    return fn is not GenerationMixin.generate and getattr(fn, "__module__", "").startswith("transformers.models.")


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The token embeddings; where the model does not say (PP-FormulaNet's encoder-decoder raises
    NotImplementedError), the largest embedding table: the vocabulary's."""
    try:
        return model.get_input_embeddings()  # type: ignore[operator]  # a PreTrainedModel method
    except (NotImplementedError, AttributeError):
        tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if not tables:
            raise
        return max(tables, key=lambda m: m.weight.numel())
