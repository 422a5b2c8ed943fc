"""Hybrid propagation: small integer tensors carry real values beside their fakes.

(Being written: see ``propagation``.)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch._subclasses.fake_tensor import FakeTensorMode


@contextlib.contextmanager
def propagation(mode: FakeTensorMode) -> Iterator[None]:
    """Entered inside ``mode`` before the model is built; a no-op for now."""
    yield
