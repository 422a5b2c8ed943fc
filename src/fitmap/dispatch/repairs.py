"""Repairs found by ``fitmap check``, applied the same way in simulation and at run time.

* ``align-inputs``  — a forward pre-hook moves the module's tensor inputs to a device
  (the module's own weights' device: a tied ``lm_head``, a merge inside a module);
* ``align-outputs`` — a forward hook moves the module's tensor outputs to a device
  (a layer whose KV is concatenated by its parent, a vision tower feeding embeddings);
* ``follow-inputs`` — the outputs go back to the device the module's first tensor
  input came from, as the caller passed it (before any ``align-inputs`` of the same
  module moved it): a rotary module shared by layers on several devices; with an
  ``align-inputs`` to device D, "run on D, answer the caller where it is" (a module
  whose cached state lives on D);
* ``colocate``      — the unit moves to a device; that is a change of the device map,
  made by :func:`colocated`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from fitmap.dispatch.hooks import Mover
from fitmap.planning.plan import Repair

HOOK_KINDS = ("align-inputs", "align-outputs", "follow-inputs")


def apply(model: nn.Module, fixes: Iterable[Repair], to_device: Callable[[str], torch.device]) -> list:
    """Register the hooks of ``fixes`` on ``model``; plan devices are mapped by ``to_device``."""
    handles = []
    for r in fixes:
        if r.kind not in HOOK_KINDS:
            continue
        module = model.get_submodule(r.module)
        if r.kind == "align-inputs":
            handles.append(module.register_forward_pre_hook(_InputsTo(to_device(r.device)), with_kwargs=True))
        elif r.kind == "align-outputs":
            handles.append(module.register_forward_hook(_OutputsTo(to_device(r.device))))
        else:
            follow = _FollowInputs()
            handles.append(module.register_forward_pre_hook(follow.remember, with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(follow))
    return handles


def colocated(device_map: dict[str, int | str], fixes: Iterable[Repair]) -> dict[str, int | str]:
    """``device_map`` with every ``colocate`` repair applied."""
    out = dict(device_map)
    for r in fixes:
        if r.kind == "colocate":
            out[r.module] = int(r.device) if r.device.isdigit() else r.device
    return out


def _move(x: Any, device: torch.device, mover: Mover) -> Any:
    return tree_map(lambda t: mover.to(t, device) if isinstance(t, torch.Tensor) else t, x)


class _InputsTo:
    def __init__(self, device: torch.device) -> None:
        self.device, self.mover = device, Mover()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        self.mover.reset()
        return self.mover.to(args, self.device), self.mover.to(kwargs, self.device)


class _OutputsTo:
    def __init__(self, device: torch.device) -> None:
        self.device, self.mover = device, Mover()

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        self.mover.reset()
        return _move(output, self.device, self.mover)


class _FollowInputs:
    """The caller's device is taken in a pre-hook that runs before every other one."""

    def __init__(self) -> None:
        self.mover = Mover()
        self.caller: torch.device | None = None

    def remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = next((t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)), None)
        self.caller = None if first is None else first.device

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.caller is None:
            return None
        self.mover.reset()
        return _move(output, self.caller, self.mover)
