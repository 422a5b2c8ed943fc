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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fitmap.model.modules import generation_owner, has_state

Placement = Mapping[str, torch.device]  # unit module path -> device it executes on


@dataclass
class Hooks:
    """The handles of everything :func:`attach` registered."""

    handles: list[RemovableHandle] = field(default_factory=list)
    hooked: tuple[str, ...] = ()  # module paths with an input-moving pre-hook
    mover: Mover | None = None  # its ``copies`` counts tensors moved so far

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def attach(
    model: nn.Module,
    placement: Placement,
    input_device: torch.device,
    align: Iterable[tuple[str, torch.device]] = (),
    every_unit: bool = False,
) -> Hooks:
    """Hook ``model`` so each unit in ``placement`` gets its inputs on its device.

    ``align`` adds (module path, device) input-alignment repairs for modules
    that are not units (e.g. one that concatenates tensors from two devices).
    The model's outputs come back on ``input_device``. Units before the first
    device change need no hook (their inputs are already there), unless
    ``every_unit`` (accelerate's way: every key of a device map is hooked).
    """
    mover = Mover()
    units = (
        _every_module_with_state(model, placement)
        if every_unit
        else boundary_units(placement, torch.device(input_device))
    )
    targets = [(p, torch.device(d)) for p, d in units]
    targets += [(p, torch.device(d)) for p, d in align]
    handles = []
    hooked = []
    for path, device in targets:
        called = _called(module_or_none(model, path), path, placement)
        for module in called:
            handles.append(module.register_forward_pre_hook(inputs_to(device, mover), with_kwargs=True))
        if called:
            hooked.append(path)
    # MoE experts computed on the CPU inside a GPU block (a user's map replays as accelerate runs it: no return)
    for path, back in [] if every_unit else nested_units(placement):
        for module in _called(module_or_none(model, path), path, placement):
            handles.append(module.register_forward_hook(ReturnTo(back, mover)))
    if hooked:  # outputs may come from another device; the memo of copies is dropped at the end of each forward
        handles.append(model.register_forward_hook(OutputsTo(torch.device(input_device), mover), always_call=True))
        owner = generation_owner(model)
        if owner is not model and not every_unit:
            # a model whose own generate() hands its embeddings to its language model (InternVL, MiniCPM-V):
            # generate's loop appends each token to ids on the input device, and transformers 4.x takes the
            # logits where the language model left them (InternVL's split_model keeps lm_head on GPU 0 for it)
            handles.append(owner.register_forward_hook(OutputsTo(torch.device(input_device), mover), always_call=True))
    return Hooks(handles, tuple(hooked), mover)


def _every_module_with_state(model: nn.Module, placement: Placement) -> list[tuple[str, torch.device]]:
    """accelerate's dispatch: each key of the map and every module under it that holds weights or
    buffers moves its inputs to its key's device (a finer key wins), so an embedding the model calls
    directly (``language_model.get_input_embeddings()(ids)``) still gets its ids moved."""
    device: dict[str, torch.device] = {}
    for key, dev in placement.items():  # coarse to fine: finer keys override
        module = module_or_none(model, key)
        if module is None:
            continue
        device[key] = torch.device(dev)
        for sub, m in module.named_modules(prefix=key):
            if sub != key and has_state(m):
                device[sub] = torch.device(dev)
    return list(device.items())


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


def nested_units(placement: Placement) -> list[tuple[str, torch.device]]:
    """Units inside another unit that run elsewhere (a MoE block's experts computed on the CPU), with the
    device of the unit around them, where their outputs go back to."""
    out = []
    for path, device in placement.items():
        parts = path.split(".")
        around = next(
            (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in placement), None
        )
        if around is not None and torch.device(placement[around]) != torch.device(device):
            out.append((path, torch.device(placement[around])))
    return out


def _called(module: nn.Module | None, path: str, placement: Placement) -> list[nn.Module]:
    """The modules a forward calls for this unit: the unit, or each module of a list no finer key places
    (remote code keeps its experts in a ModuleList, called one by one); none for a bare parameter (its
    owner uses it)."""
    if module is None:
        return []
    finer = any(k.startswith(path + ".") for k in placement)
    return list(module) if isinstance(module, nn.ModuleList) and not finer else [module]


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
        self._seen: dict[torch.device, dict[int, Any]] = {}
        self.copies = 0  # tensors actually copied (for tests and reports)

    def reset(self, *_: Any) -> None:
        """Forget the forward (at its end): nothing of it stays referenced."""
        self._memo.clear()
        for seen in self._seen.values():
            seen.clear()

    def seen(self, device: torch.device) -> dict[int, Any]:
        """Keyword values found on ``device`` in this forward (see :class:`InputsTo`)."""
        return self._seen.setdefault(device, {})

    def to(self, x: Any, device: torch.device) -> Any:
        """``x`` with every tensor inside tuples/lists/dicts on ``device``; other objects as is."""
        if isinstance(x, torch.Tensor):
            return x if x.device == device else self._copy(x, device)
        if type(x) in (tuple, list):
            return type(x)(self.to(v, device) for v in x)
        if type(x) is dict:
            return {k: self.to(v, device) for k, v in x.items()}
        return x  # Cache objects keep each layer's KV on that layer's device

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


_NOTHING_TO_MOVE = (type(None), bool, int, float, str)


class InputsTo:
    """Forward pre-hook (with kwargs): move a module's tensor inputs to ``device``.

    Runs on every hooked call, so it is built to cost little more than an empty hook.
    Positional arguments (the hidden state: a new tensor per unit) are checked each
    time. Keyword values are mostly the parent's broadcast tensors and objects (the
    cache), the same for every unit of a forward: one found already on ``device`` is
    remembered, keyed by ``id``, and skipped at the next units. Tensors and objects are
    remembered through a weak reference (no hidden state is kept alive, and a reused
    id cannot hit: the reference is dead by then and its callback drops the entry);
    tuples, which cannot be weakly referenced, until the forward ends. Values that
    must move go through the :class:`Mover` and its memo.
    """

    def __init__(self, device: torch.device, mover: Mover) -> None:
        self.device = device
        self.mover = mover
        self.in_place = mover.seen(device)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        device = self.device
        moved_args = args if on_device(args, device) else self.mover.to(args, device)
        in_place = self.in_place
        changed = None
        for key, value in kwargs.items():
            if id(value) in in_place or type(value) in _NOTHING_TO_MOVE:
                continue
            if on_device(value, device):
                if type(value) is tuple:  # immutable: kept until the forward ends (OutputsTo)
                    in_place[id(value)] = value
                elif type(value) not in _CONTAINERS:  # lists and dicts can change: looked at each time
                    _remember(in_place, value)
                continue
            if changed is None:
                changed = dict(kwargs)
            changed[key] = self.mover.to(value, device)
        if changed is None and moved_args is args:
            return None  # fast path: nothing to move
        return moved_args, kwargs if changed is None else changed


def inputs_to(device: torch.device, mover: Mover):
    """The pre-hook a unit on ``device`` gets: :class:`InputsTo` behind a fast path.

    A closure, not a method (a call costs half), that only confirms what the common case
    looks like: positional tensors already on ``device``, and every keyword value one that
    an earlier unit of this forward found in place (``id`` in the per-device table: an
    entry is removed when its object dies, so an id found there is that object's) or one
    that holds no tensor. Anything else goes to :class:`InputsTo`, which moves and remembers.
    """
    slow = InputsTo(device, mover)
    in_place = slow.in_place
    tensor = torch.Tensor
    containers = _CONTAINERS
    plain = _NOTHING_TO_MOVE

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        for a in args:
            if isinstance(a, tensor):
                if a.device != device:
                    return slow(module, args, kwargs)
            elif type(a) in containers:
                return slow(module, args, kwargs)
        for v in kwargs.values():
            if id(v) in in_place or v is None or type(v) in plain:
                continue
            return slow(module, args, kwargs)
        return None

    return hook


def _remember(table: dict[int, weakref.ref], value: Any) -> None:
    key = id(value)

    def drop(ref: weakref.ref) -> None:
        if table.get(key) is ref:
            del table[key]

    try:
        table[key] = weakref.ref(value, drop)
    except TypeError:  # not weak-referenceable: looked at each time
        pass


KV_KEYS = frozenset({"past_key_values", "cache"})


class ReturnTo:
    """Forward hook of a unit nested in another that runs elsewhere: its outputs go back to the device of
    the unit around it, where the rest of that unit's forward computes."""

    def __init__(self, device: torch.device, mover: Mover) -> None:
        self.device = device
        self.mover = mover

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return None if on_device(output, self.device) else self.mover.to(output, self.device)


class OutputsTo:
    """Forward hook of the top-level model: outputs back on the input device. The KV cache
    stays where each layer keeps it (a tuple cache moved whole would copy every layer's
    keys and values to the first GPU at each step, as accelerate does without
    ``_skip_keys_device_placement``)."""

    def __init__(self, device: torch.device, mover: Mover) -> None:
        self.device = device
        self.mover = mover

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        try:
            if isinstance(output, dict) and type(output) is not dict:  # a ModelOutput
                for k, v in output.items():
                    if k not in KV_KEYS and not on_device(v, self.device):
                        output[k] = self.mover.to(v, self.device)
                return output
            return None if on_device(output, self.device) else self.mover.to(output, self.device)
        finally:
            self.mover.reset()  # nothing of this forward stays referenced until the next one
