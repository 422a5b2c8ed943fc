"""Model code's own CUDA calls, answered on fake devices.

Remote code talks to CUDA directly where it launches kernels or manages memory: CogVLM2's
Triton rotary runs inside ``with torch.cuda.device(x.device.index):``, other code calls
``torch.cuda.set_device``, ``current_device``, ``synchronize``, records events on streams, or
moves a tensor with ``.cuda()``. On fake devices none of that can reach a driver (on a machine
without a GPU, torch says it "was compiled without CUDA support" and the replay stops). For the
duration of a replay each call does what it means for placement and nothing else: device and
stream contexts and synchronisation are no-ops, ``current_device`` answers the device last
selected (0 at first), and ``.cuda(i)`` moves a fake tensor to fake GPU *i* (``meta:i``), as
``.to("cuda:i")`` would move a real one. Tensors that are not fake keep torch's own ``.cuda``.

Autocast regions keyed on a tensor's device type (transformers 4.4x's Llama rotary:
``with torch.autocast(device_type=x.device.type, enabled=False)``) name ``meta`` on fake devices,
which autocast does not take ("unsupported scalarType"): they run as plain regions there. A
region that would cast (``enabled=True``) changes dtypes on a GPU, not placement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor


def _index(device: Any) -> int | None:
    """The GPU index a CUDA call names: an int, ``"cuda:1"``, ``torch.device("cuda", 1)``, a fake
    ``meta:1``; None for "the current device"."""
    if device is None:
        return None
    if isinstance(device, int):
        return device
    d = torch.device(device)
    return d.index


class _Selected:
    """The device the model code last selected (``set_device`` / ``torch.cuda.device``)."""

    def __init__(self) -> None:
        self.index = 0


class _DeviceContext:
    """``torch.cuda.device(i)``: selects ``i`` for the block, as the real one does."""

    def __init__(self, selected: _Selected, device: Any) -> None:
        self.selected, self.index, self.previous = selected, _index(device), selected.index

    def __enter__(self) -> _DeviceContext:
        self.previous = self.selected.index
        if self.index is not None and self.index >= 0:
            self.selected.index = self.index
        return self

    def __exit__(self, *exc: object) -> None:
        self.selected.index = self.previous


class _Event:
    """A CUDA event on fake devices: recorded and waited on at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: Any) -> float:
        return 0.0


class _Stream:
    """A CUDA stream on fake devices: work on it is the fake mode's, which has no order to keep."""

    def __init__(self, device: Any = None, *args: Any, **kwargs: Any) -> None:
        self.device = torch.device("meta", _index(device) or 0)

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _Event:
        return event if isinstance(event, _Event) else _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@contextlib.contextmanager
def _stream_context(stream: Any = None) -> Iterator[Any]:
    yield stream


def _autocast_on_fakes(original: Any) -> Any:
    def autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:
        if device_type == "meta":
            return contextlib.nullcontext()
        return original(device_type, *args, **kwargs)

    return autocast


@contextlib.contextmanager
def cuda_calls_on_fakes() -> Iterator[None]:
    """For the duration of a replay on fake devices: the model's CUDA calls answered as above."""
    selected = _Selected()
    cuda = torch.cuda
    original_tensor_cuda = torch.Tensor.cuda

    def tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> torch.Tensor:
        if not isinstance(self, FakeTensor):
            return original_tensor_cuda(self, device, non_blocking, **kwargs)
        index = _index(device)
        return self.to(torch.device("meta", selected.index if index is None else index))

    def set_device(device: Any) -> None:
        index = _index(device)
        if index is not None and index >= 0:
            selected.index = index

    replacements: dict[str, Any] = {
        "device": lambda device: _DeviceContext(selected, device),
        "set_device": set_device,
        "current_device": lambda: selected.index,
        "synchronize": lambda device=None: None,
        "Stream": _Stream,
        "Event": _Event,
        "current_stream": lambda device=None: _Stream(device),
        "default_stream": lambda device=None: _Stream(device),
        "stream": _stream_context,
    }
    saved = {name: getattr(cuda, name) for name in replacements}
    for name, value in replacements.items():
        setattr(cuda, name, value)
    torch.Tensor.cuda = tensor_cuda  # type: ignore[method-assign, assignment]  # for the replay; restored below
    autocasts = (torch.autocast, torch.amp.autocast)
    torch.autocast = torch.amp.autocast = _autocast_on_fakes(autocasts[0])  # type: ignore[misc]  # restored below
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(cuda, name, value)
        torch.Tensor.cuda = original_tensor_cuda  # type: ignore[method-assign]
        torch.autocast, torch.amp.autocast = autocasts  # type: ignore[misc]
