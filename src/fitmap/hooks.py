"""Runtime boundary hooks: each unit gets its inputs on the device it executes on.

Used by the real runtime (``cpu``, ``cuda:N``) and by the fake-device simulator
(``meta:N`` under ``FakeTensorMode``) alike. Only standard torch hooks, with
their state in the hook objects; no ``forward`` is replaced.

Where hooks go: a unit is hooked when its device differs from ``input_device``,
or when an earlier unit (in the placement's order: the plan's, i.e. execution order)
ran elsewhere, since then the tensors it receives may come from that device.
HF text models compute ``position_embeddings``, ``attention_mask`` and
``cache_position`` once in the parent forward and hand the *same* tensors to
every layer, so every such unit needs a hook, not only the first one on a
device. A per-forward memo makes that cheap: a broadcast tensor is copied once
per device per forward, and a unit whose inputs are already in place costs one
pass over its arguments.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Placement = Mapping[str, torch.device]   # unit module path -> device it executes on


@dataclass
class Hooks:
    """The handles of everything :func:`attach` registered."""

    handles: list[RemovableHandle] = field(default_factory=list)
    hooked: tuple[str, ...] = ()           # module paths with an input-moving pre-hook
    mover: Mover | None = None             # its ``copies`` counts tensors moved so far

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def attach(model: nn.Module, placement: Placement, input_device: torch.device,
           align: Iterable[tuple[str, torch.device]] = ()) -> Hooks:
    """Hook ``model`` so each unit in ``placement`` gets its inputs on its device.

    ``align`` adds (module path, device) input-alignment repairs for modules
    that are not units (e.g. one that concatenates tensors from two devices).
    The model's outputs come back on ``input_device``.
    """
    mover = Mover()
    targets = [(p, torch.device(d)) for p, d in boundary_units(placement, torch.device(input_device))]
    targets += [(p, torch.device(d)) for p, d in align]
    handles = [model.register_forward_pre_hook(mover.reset)]
    hooked = []
    for path, device in targets:
        module = module_or_none(model, path)
        if module is None:   # a bare parameter unit: its owner's forward uses it
            continue
        handles.append(module.register_forward_pre_hook(InputsTo(device, mover), with_kwargs=True))
        hooked.append(path)
    handles.append(model.register_forward_hook(OutputsTo(torch.device(input_device), mover)))
    return Hooks(handles, tuple(hooked), mover)


def boundary_units(placement: Placement, input_device: torch.device) -> list[tuple[str, torch.device]]:
    """Units that may receive tensors from another device, in placement order."""
    out = []
    strayed = False
    for path, device in placement.items():
        device = torch.device(device)
        strayed = strayed or device != input_device
        if strayed:
            out.append((path, device))
    return out


def module_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


# --------------------------------------------------------------------------- moving
class Mover:
    """Moves nested tensors, remembering each copy for the rest of the forward.

    The memo is keyed by ``(id(tensor), device)`` and holds a weak reference to
    the source, so an entry dies with its source (no stale hit when an id is
    reused, and a hidden state crossing a boundary is not kept alive). An entry
    also records the source's version counter: a tensor changed in place since
    its copy is copied again.
    """

    def __init__(self) -> None:
        self._memo: dict[tuple[int, torch.device], tuple[weakref.ref, int, torch.Tensor]] = {}
        self.copies = 0            # tensors actually copied (for tests and reports)

    def reset(self, *_: Any) -> None:
        """Forward pre-hook of the top-level model: a new forward, a new memo."""
        self._memo.clear()

    def to(self, x: Any, device: torch.device) -> Any:
        """``x`` with every tensor inside tuples/lists/dicts on ``device``; other objects as is."""
        if isinstance(x, torch.Tensor):
            return x if x.device == device else self._copy(x, device)
        if type(x) in (tuple, list):
            return type(x)(self.to(v, device) for v in x)
        if type(x) is dict:
            return {k: self.to(v, device) for k, v in x.items()}
        return x   # Cache objects keep each layer's KV on that layer's device

    def _copy(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = (id(t), device)
        hit = self._memo.get(key)
        version = _version(t)
        if hit is not None and hit[0]() is t and hit[1] == version:
            return hit[2]
        moved = t.to(device, non_blocking=device.type == "cuda")
        self._memo[key] = (weakref.ref(t, self._forget(key)), version, moved)
        self.copies += 1
        return moved

    def _forget(self, key: tuple[int, torch.device]):
        memo = self._memo

        def drop(ref: weakref.ref) -> None:
            entry = memo.get(key)
            if entry is not None and entry[0] is ref:
                del memo[key]
        return drop


_CONTAINERS = (tuple, list, dict)


def _version(t: torch.Tensor) -> int:
    """The in-place version counter; inference-mode tensors have none (and are not modified
    in place by the models we hook within one forward)."""
    return -1 if t.is_inference() else t._version


def on_device(x: Any, device: torch.device) -> bool:
    """True when every tensor inside ``x`` (tuples/lists/dicts) is on ``device``.

    Runs on every hooked call: leaves are checked inline, not by recursion
    (a decoder layer's five keyword arguments take about 1.3 us).
    """
    if isinstance(x, torch.Tensor):
        return x.device == device
    if type(x) is dict:
        x = x.values()
    elif type(x) not in _CONTAINERS:
        return True
    for v in x:
        if isinstance(v, torch.Tensor):
            if v.device != device:
                return False
        elif type(v) in _CONTAINERS and not on_device(v, device):
            return False
    return True


class InputsTo:
    """Forward pre-hook (with kwargs): move a module's tensor inputs to ``device``."""

    def __init__(self, device: torch.device, mover: Mover) -> None:
        self.device = device
        self.mover = mover

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if on_device(args, self.device) and on_device(kwargs, self.device):
            return None   # fast path: nothing to move
        return self.mover.to(args, self.device), self.mover.to(kwargs, self.device)


class OutputsTo:
    """Forward hook of the top-level model: outputs back on the input device."""

    def __init__(self, device: torch.device, mover: Mover) -> None:
        self.device = device
        self.mover = mover

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, dict) and type(output) is not dict:   # a ModelOutput
            for k, v in output.items():
                if not on_device(v, self.device):
                    output[k] = self.mover.to(v, self.device)
            return output
        return None if on_device(output, self.device) else self.mover.to(output, self.device)
