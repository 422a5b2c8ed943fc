"""What differs between the transformers versions fitmap runs on (4.40 to 5.x), in one place.

* The KV cache: transformers 5.2x takes it as ``cache=`` and returns it as ``output.cache``;
  earlier 5.x and 4.x as ``past_key_values``. The old name still works on 5.2x but prints
  a deprecation warning at the user. 4.x's Mamba models keep their states as ``cache_params``.
* Building from a config: 5.x takes ``dtype=``, 4.x ``torch_dtype=``; the image-text Auto
  class is ``AutoModelForImageTextToText`` (4.45+) or ``AutoModelForVision2Seq``.
* Weight initialisation: 5.x guards loaded tensors with ``initialization.guard_torch_init_functions``
  and the ``_is_hf_initialized`` flag; 4.x has neither, so fitmap guards them itself.
* Generation: on 5.x ``PreTrainedModel`` no longer inherits ``GenerationMixin``; remote
  code written for 4.x that does not inherit it gets it from :func:`ensure_generate`.
* torch: remote code copied from torch 2.0's ``torch.nn.functional`` (MiniCPM-V's resampler
  annotates with ``List[Tensor]`` after ``from torch.nn.functional import *``) finds the
  ``typing`` names that module no longer re-exports: :func:`legacy_torch_names`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from functools import cache
from typing import Any


@cache
def major() -> int:
    """transformers' major version."""
    import transformers

    return int(transformers.__version__.split(".")[0])


@cache
def _cache_keyword(forward: Any) -> str:
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    if "cache" in params:
        return "cache"
    return "cache_params" if "cache_params" in params and "past_key_values" not in params else "past_key_values"


def cache_kwarg(model: Any) -> str:
    """The keyword ``model``'s forward takes its KV cache under."""
    return _cache_keyword(type(model).forward)


def cache_of(output: Any) -> Any:
    """The KV cache a model output carries (None when it has none)."""
    if isinstance(output, dict):
        for name in ("cache", "past_key_values", "cache_params"):
            if output.get(name) is not None:
                return output[name]
        return None
    if isinstance(output, tuple):  # return_dict=False / remote code returning tuples: (logits, cache, ...)
        return output[1] if len(output) > 1 else None
    return getattr(output, "past_key_values", None)


@cache
def generate_moves_logits() -> bool:
    """Whether greedy ``generate`` moves the last logits to the ids' device before it appends the next
    token (transformers 5's ``_sample``); 4.x's ``_greedy_search`` takes them where the model left them."""
    from transformers import GenerationMixin

    method = getattr(GenerationMixin, "_greedy_search", None) or getattr(GenerationMixin, "_sample", None)
    if method is None:
        return False
    try:
        lines = inspect.getsource(method).splitlines()
    except (OSError, TypeError):
        return False
    return any("next_token_logits =" in line and "input_ids.device" in line for line in lines)


def auto_classes(task: str) -> list[Any]:
    """The Auto classes to try for ``task``, most specific first, that this transformers has."""
    import transformers

    image = getattr(transformers, "AutoModelForImageTextToText", None) or getattr(
        transformers, "AutoModelForVision2Seq", None
    )
    order = [transformers.AutoModelForCausalLM] + ([image] if image is not None else [])
    if task == "image-text-to-text":
        order.reverse()
    return order + [transformers.AutoModel]


def from_config(auto: Any, config: Any, dtype: Any, trust_remote_code: bool) -> Any:
    """``auto.from_config`` at ``dtype`` on any transformers."""
    key = "dtype" if major() >= 5 else "torch_dtype"
    try:
        return auto.from_config(config, trust_remote_code=trust_remote_code, **{key: dtype})
    except ValueError as e:  # a model without SDPA (GOT-OCR2's tower): built as it runs, eager
        if "scaled_dot_product_attention" not in str(e) and "attn_implementation" not in str(e):
            raise
        return auto.from_config(
            config, trust_remote_code=trust_remote_code, attn_implementation="eager", **{key: dtype}
        )


@contextlib.contextmanager
def init_guard() -> Iterator[None]:
    """transformers' guard that keeps ``_init_weights`` off tensors flagged ``_is_hf_initialized``."""
    try:
        from transformers import initialization as init
    except ImportError:
        yield
        return
    with init.guard_torch_init_functions():
        yield


def ensure_generate(model: Any) -> None:
    """Give a model class written for transformers 4.x (no ``GenerationMixin`` base on 5.x) a
    ``generate``, as transformers 4.x did for every ``PreTrainedModel``."""
    cls = type(model)
    if hasattr(cls, "generate"):
        return
    from transformers import GenerationMixin

    model.__class__ = type(cls.__name__, (cls, GenerationMixin), {"__module__": cls.__module__})


def legacy_torch_names() -> None:
    """Give ``torch.nn.functional`` back the ``typing`` names it exported up to torch 2.0
    (``List``, ``Optional``, ``Tuple``), for model code that star-imports it and annotates with them.
    Adds only names that are missing; touches nothing torch itself uses."""
    import typing

    import torch.nn.functional as F

    for name in ("List", "Optional", "Tuple"):
        if not hasattr(F, name):
            setattr(F, name, getattr(typing, name))
