"""What differs between the transformers versions fitmap runs on, in one place.

* The KV cache: transformers 5.2x takes it as ``cache=`` and returns it as ``output.cache``;
  earlier 5.x (and 4.x) as ``past_key_values``. The old name still works on 5.2x but prints
  a deprecation warning at the user.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=None)
def _cache_keyword(forward: Any) -> str:
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: Any) -> str:
    """The keyword ``model``'s forward takes its KV cache under."""
    return _cache_keyword(type(model).forward)


def cache_of(output: Any) -> Any:
    """The KV cache a model output carries (None when it has none)."""
    if isinstance(output, dict):
        return output["cache"] if "cache" in output else output.get("past_key_values")
    return getattr(output, "past_key_values", None)
