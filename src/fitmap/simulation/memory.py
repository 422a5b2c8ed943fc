"""What the fake devices hold: a ``TorchDispatchMode`` that adds each new output storage to its
device (keyed by the storage, freed through a weak reference), keeps the peak per device and per
running unit, and records the device mismatch it stops at, with the model's own source line."""

from __future__ import annotations

import linecache
import traceback
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fitmap.simulation.fake import GROUPED_MM, TRITON_KERNEL, grouped_mm_any_dtype, plan_device


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Mismatch:
    """Two devices met in one op."""

    op: str  # e.g. "aten.cat"
    devices: tuple[str, str]  # plan device names ("0", "1", "cpu")
    module: str  # innermost module running ("" = top level)
    unit: str | None  # the unit that module belongs to
    code: str  # "file.py:123: the source line"
    operands: tuple[tuple[str, str | None, bool], ...]  # (device, producer module, is a parameter of `module`)

    def message(self) -> str:
        a, b = (device_label(d) for d in self.devices)
        where = self.module or "the top-level model"
        return (
            f"{self.op} in {where} got tensors on {a} and {b} "
            f"(Expected all tensors to be on the same device, but found at least two devices, {a} and {b}!) "
            f"at {self.code}"
        )


@dataclass(frozen=True)
class DevicePeak:
    device: str
    weights_bytes: int
    kv_bytes: int
    peak_bytes: int  # the largest total the device held at any moment

    @property
    def activation_bytes(self) -> int:
        return max(0, self.peak_bytes - self.weights_bytes - self.kv_bytes)


@dataclass(frozen=True)
class Simulation:
    devices: tuple[DevicePeak, ...]
    unit_activation: Mapping[str, int]  # peak bytes a unit allocated above what it was given
    unit_kv: Mapping[str, int]  # KV bytes held for each decoder block at full context
    mismatch: Mismatch | None = None
    image_tokens: int = 0
    stage: str = ""  # where it stopped or "done"
    unit_entry: Mapping[str, int] = field(default_factory=dict)  # activation bytes live on its device


def device_label(device: str) -> str:
    return f"cuda:{device}" if device.isdigit() else device


# --------------------------------------------------------------------------- memory
class MemoryTracker(TorchDispatchMode):
    """Bytes live per device, their peak, and the peak above entry per running unit."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[str, int, int]] = {}  # storage key -> (device, bytes, refs)
        self.current: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.unit_stack: list[tuple[str, str, int]] = []  # (unit, device, bytes live at entry)
        self.unit_peak: Counter[str] = Counter()
        self.producer: dict[int, tuple[weakref.ref, str]] = {}
        self.module_stack: list[str] = []
        self.mismatch: Mismatch | None = None
        self.param_owner: dict[int, list[str]] = {}  # weight storage key -> module paths (tied: several)
        self.unit_of: Mapping[str, str] = {}
        self.weights: Counter[str] = Counter()  # weight and buffer bytes per device
        self.entry: dict[str, int] = {}  # unit -> bytes above the weights at its first entry

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        dev = plan_device(t.device)
        entry = self.live.get(key)
        if entry is None:
            nbytes = st.nbytes()
            self.live[key] = (dev, nbytes, 1)
            self.current[dev] += nbytes
            if self.current[dev] > self.peak[dev]:
                self.peak[dev] = self.current[dev]
            for unit, udev, base in self.unit_stack:
                if udev == dev:
                    self.unit_peak[unit] = max(self.unit_peak[unit], self.current[dev] - base)
        else:
            self.live[key] = (entry[0], entry[1], entry[2] + 1)
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        dev, nbytes, refs = self.live[key]
        if refs > 1:
            self.live[key] = (dev, nbytes, refs - 1)
        else:
            del self.live[key]
            self.current[dev] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = grouped_mm_any_dtype(args, kwargs) if func is GROUPED_MM else func(*args, **kwargs)
        except RuntimeError as e:
            if _is_device_mismatch(str(e)) and self.mismatch is None:
                self.mismatch = self._describe(func, args, kwargs)
            raise
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in outs:
            self.track(t)
        self._inherit_producer(args, outs)
        return out

    def _inherit_producer(self, args, outs: list[torch.Tensor]) -> None:
        """A view or reshape of a module's output still came from that module."""
        ins = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        if len(ins) != 1 or not outs:
            return
        prod = self.producer.get(id(ins[0]))
        if prod is not None and prod[0]() is ins[0]:
            for t in outs:
                self.producer[id(t)] = (weakref.ref(t), prod[1])

    def _describe(self, func, args, kwargs) -> Mismatch:
        module = self.module_stack[-1] if self.module_stack else ""
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        operands, devices = [], []
        for t in tensors:
            dev = plan_device(t.device)
            if dev not in devices:
                devices.append(dev)
            prod = self.producer.get(id(t))
            producer = prod[1] if prod is not None and prod[0]() is t else None
            owners = self.param_owner.get(t.untyped_storage()._cdata, [])
            operands.append((dev, producer, any(_under(module, o) for o in owners)))
        op = (
            f"Triton kernel {TRITON_KERNEL[-1]}"
            if TRITON_KERNEL
            else str(func.overloadpacket).replace("aten::", "aten.")
        )
        return Mismatch(
            op,
            (devices[0], devices[1] if len(devices) > 1 else devices[0]),
            module,
            _unit_of(module, self.unit_of),
            _model_code_line(),
            tuple(operands),
        )


def _is_device_mismatch(text: str) -> bool:
    """Both forms fake tensors raise: most ops, and in-place indexing (``index_put_``)."""
    return "found at least two devices" in text or ("Mismatching" in text and "device between" in text)


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _unit_of(module: str, unit_of: Mapping[str, str]) -> str | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        u = unit_of.get(".".join(parts[:i]))
        if u is not None:
            return u
    return None


_SKIP = ("/torch/", "/fitmap/", "/contextlib.py", "/functools.py")


def _model_code_line() -> str:
    """The innermost frame of model code (not torch, not fitmap) on the current stack."""
    for frame in reversed(traceback.extract_stack()):
        if not any(s in frame.filename for s in _SKIP) or "/transformers/models/" in frame.filename:
            line = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip()
            return f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}: {line}"
    return "unknown"


class Handles:
    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class NoHandle:
    def remove(self) -> None:
        pass


def enter_module(t: MemoryTracker, path: str):
    def hook(module, args):
        t.module_stack.append(path)

    return hook


def leave_module(t: MemoryTracker, path: str):
    def hook(module, args, output):
        if t.module_stack and t.module_stack[-1] == path:
            t.module_stack.pop()
        for x in tree_flatten(output)[0]:
            if isinstance(x, torch.Tensor):
                t.producer[id(x)] = (weakref.ref(x), path)

    return hook


def enter_unit(t: MemoryTracker, unit: str, device: str):
    def hook(module, args):
        t.unit_stack.append((unit, device, t.current[device]))
        t.entry.setdefault(unit, t.current[device] - t.weights[device])

    return hook


def leave_unit(t: MemoryTracker):
    def hook(module, args, output):
        if t.unit_stack:
            t.unit_stack.pop()

    return hook
