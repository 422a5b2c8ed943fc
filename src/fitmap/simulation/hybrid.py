"""Hybrid propagation: small integer tensors carry real values beside their fakes.

Fake tensors know shapes, never values. Vision-language models read values in
a few places — Qwen2-VL calls ``grid_thw.tolist()``, ``repeat_interleave`` with
tensor counts, and builds ``torch.tensor([...0-dim tensors...])`` in its rope
index — so a purely fake run stops there. Here every *small* tensor whose value
can be known (ids, masks, grids, positions: made by an integer/bool factory op,
or computed only from tensors that have one) carries a real CPU *twin*, computed
op by op in a ``TorchDispatchMode`` that sits just above the ``FakeTensorMode``:

* an op whose tensor inputs all have twins runs twice: fake (for the simulation)
  and real on the twins (for the values), when its outputs are small;
* ``aten._local_scalar_dense`` (``.item()``, ``.tolist()``, ``int(t)``) answers
  from the twin;
* an op whose output shape depends on values (``nonzero``, ``repeat_interleave``
  with tensor counts, ``masked_select``, ``unique``, boolean indexing) takes its
  fake output from the real result, on the device the fake op would have used;
* ``torch.tensor`` reads its data outside the dispatcher, so for the duration it
  is wrapped to read twins instead of fake tensors.

Weights never get twins (the simulator makes them from ``meta``), so activations
computed from them have none either. Small factory outputs do, floating ones too:
masks built with ``torch.full(..., finfo.min)`` and read back (CogVLM picks its
attention kernel with ``(mask == tril).all()``), ``pixel_values`` zeros; a small
float computed only from known values (``arange(n) * 1.0``, rotary ``inv_freq``)
carries one because model code routes positions through floats.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from fitmap.simulation.fake import GROUPED_MM, grouped_mm_any_dtype

MAX_TWIN_NUMEL = 4 * 1024 * 1024
"""Largest tensor (elements) that carries a real twin: positions (3, batch, seq) and
masks (batch, seq) fit; a 4-D attention mask or an activation does not."""

_aten = torch.ops.aten
_CPU = torch.device("cpu")
_EXACT = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_DATA_DEPENDENT = (DynamicOutputShapeException, DataDependentOutputException)
_DEFINED_FACTORIES = frozenset(
    {_aten.full, _aten.zeros, _aten.ones, _aten.arange, _aten.linspace, _aten.eye, _aten.scalar_tensor}
)
_INDEX_OPS = (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default)


class RealTwins(TorchDispatchMode):
    """Keeps a real CPU value beside each small fake tensor whose value is known."""

    def __init__(self, fake_mode: FakeTensorMode, max_numel: int = MAX_TWIN_NUMEL) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self.max_numel = max_numel
        self.twins: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._writes: dict[Any, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ values
    def real(self, t: torch.Tensor) -> torch.Tensor | None:
        """The real value of ``t`` (itself when ``t`` is a real CPU tensor), or None."""
        if isinstance(t, FakeTensor):
            return self.twins.get(t)
        return t if t.device.type == "cpu" else None

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten._local_scalar_dense.default:
            real = self.real(args[0])
            if real is None:
                return func(*args, **kwargs)
            with _disable_current_modes():
                return real.item()
        tensors = _tensors_in(args, kwargs)
        has_twin = [self.real(t) is not None for t in tensors]
        known = all(has_twin)
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            # model inputs made for real and placed on fake devices (pixel_values of a tiled image:
            # millions of values): known whatever their size, and so is what the model computes
            # from them alone (Idefics3 finds padding tiles with ``(pixel_values == 0).sum(...)``)
            self.max_numel = max(self.max_numel, max(t.numel() for t in tensors))
        try:
            out = grouped_mm_any_dtype(args, kwargs) if func is GROUPED_MM else func(*args, **kwargs)
        except _DATA_DEPENDENT:
            indexed = self._with_long_indices(func, args) if func in _INDEX_OPS else None
            if indexed is not None:
                out = func(*indexed, **kwargs)
            elif known:
                return self._from_real(func, args, kwargs)
            else:
                raise
        if known and self._wants_twin(out, factory=not tensors, func=func):
            real_out = self._run_real(func, args, kwargs)
            if real_out is not None:
                self._pair(out, real_out)
                return out
        if any(has_twin):
            self._forget_written(func, args)
        return out

    def _wants_twin(self, out: Any, factory: bool, func: Any = None) -> bool:
        """Outputs worth a real run: small ones; of factories, those whose values are defined
        (``full``, ``zeros``, ``arange`` ... of any dtype; ``empty`` and ``rand`` only if exact)."""
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        defined = not factory or getattr(func, "_overloadpacket", None) in _DEFINED_FACTORIES
        return bool(outs) and all(t.numel() <= self.max_numel and (t.dtype in _EXACT or defined) for t in outs)

    def _run_real(self, func, args: tuple, kwargs: dict) -> Any:
        """``func`` on the twins, on the CPU, with no mode (fake or ours) in the way."""
        args, kwargs = tree_map(self._real_arg, (args, kwargs))
        with _disable_current_modes():
            try:
                return func(*args, **kwargs)
            except Exception:  # values we cannot reproduce only cost the twin, never the simulation
                return None

    def _real_arg(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return self.real(x)
        return _CPU if isinstance(x, torch.device) else x

    def _pair(self, out: Any, real_out: Any) -> None:
        fakes, reals = tree_flatten(out)[0], tree_flatten(real_out)[0]
        if len(fakes) != len(reals):
            return
        for f, r in zip(fakes, reals):
            if isinstance(f, torch.Tensor) and isinstance(r, torch.Tensor) and (f.shape, f.dtype) == (r.shape, r.dtype):
                self.twins[f] = r

    def _from_real(self, func, args: tuple, kwargs: dict) -> Any:
        """A data-dependent op: its fake output is shaped by the real result."""
        flat = tree_flatten((args, kwargs))[0]
        device, _ = FakeTensor._find_common_device(func, flat)  # raises on a device mismatch, as the GPU would
        if kwargs.get("device") is not None:
            device = torch.device(kwargs["device"])
        real_out = self._run_real(func, args, kwargs)
        if real_out is None:
            raise DynamicOutputShapeException(func)
        return tree_map(lambda r: self._fake_of(r, device) if isinstance(r, torch.Tensor) else r, real_out)

    def _with_long_indices(self, func, args: tuple) -> tuple | None:
        """``x[mask]`` with a known mask and an unknown ``x`` (hidden states): the mask
        becomes the long indices of its true elements, so the fake op knows the shape."""
        indices: list[Any] = []
        changed = False
        for index in args[1]:
            real = self.real(index) if isinstance(index, torch.Tensor) else None
            if real is not None and real.dtype in (torch.bool, torch.uint8):
                _same_device(args[0], index)
                with _disable_current_modes():
                    positions = real.nonzero().unbind(1)
                indices.extend(self._fake_of(i, index.device) for i in positions)
                changed = True
            elif isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8):
                return None  # a mask of unknown value: its shape really is unknown
            else:
                indices.append(index)
        return (args[0], indices, *args[2:]) if changed else None

    def _fake_of(self, real: torch.Tensor, device: torch.device) -> torch.Tensor:
        fake: torch.Tensor = self.fake_mode.from_tensor(real)
        if device != fake.device:
            fake = fake.to(device)
        if real.numel() <= self.max_numel:
            self.twins[fake] = real
        return fake

    def _forget_written(self, func, args: tuple) -> None:
        """An unknown value was written into a tensor: its twin, and its views' twins, are stale."""
        if func not in self._writes:
            self._writes[func] = tuple(
                i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write
            )
        for i in self._writes[func]:
            target = args[i] if i < len(args) else None
            if isinstance(target, torch.Tensor) and self.twins.pop(target, None) is not None:
                storage = target.untyped_storage()._cdata
                for other in [f for f in self.twins.keys() if f.untyped_storage()._cdata == storage]:
                    del self.twins[other]


def _tensors_in(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Tensor operands of an aten call (they sit at most one list deep: ``cat``, ``index``)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(x for x in a if isinstance(x, torch.Tensor))
    return found


def _same_device(x: torch.Tensor, index: torch.Tensor) -> None:
    """Indexing with a mask on another GPU fails on real devices; say it as a mismatch does."""
    if index.device != x.device and index.device.type != "cpu":
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"{x.device} and {index.device}!"
        )


# --------------------------------------------------------------------------- torch.tensor
def _read_twins(data: Any, twins: RealTwins) -> Any:
    """``data`` with every fake tensor that has a twin replaced by its value."""
    if isinstance(data, FakeTensor):
        real = twins.real(data)
        if real is None:
            return data
        with _disable_current_modes():
            return real.item() if real.dim() == 0 else real.tolist()
    if isinstance(data, (list, tuple)):
        return type(data)(_read_twins(x, twins) for x in data)
    return data


@contextlib.contextmanager
def _tensor_reads_twins(twins: RealTwins) -> Iterator[None]:
    """``torch.tensor([...0-dim tensors...])`` reads values below the dispatcher; give it the twins.

    Also keeps a fake device's index: on a machine with CUDA, ``FakeTensorMode`` lifts
    ``torch.tensor(data, device="meta:1")`` to plain ``meta`` (the index dropped), and the
    next op mixing it with ``meta:1`` tensors fails ("Unhandled FakeTensor Device
    Propagation ... meta, meta:1"). transformers' ``DynamicLayer`` makes its empty KV
    tensors that way. Made on the CPU and moved, the tensor keeps its device."""
    original = torch.tensor

    def tensor(data, *args, **kwargs):
        device = kwargs.get("device")
        if device is not None:
            device = torch.device(device)
            if device.type == "meta" and device.index is not None:
                return original(_read_twins(data, twins), *args, **dict(kwargs, device="cpu")).to(device)
        return original(_read_twins(data, twins), *args, **kwargs)

    torch.tensor = tensor
    try:
        yield
    finally:
        torch.tensor = original


@contextlib.contextmanager
def _tolist_reads_twins(twins: RealTwins) -> Iterator[None]:
    """``FakeTensor.tolist`` unbinds into one fake per element (seconds for a 5000-token
    ``mm_token_type_ids``); with a twin the answer is the twin's list, at once."""
    original = FakeTensor.tolist

    def tolist(self):
        real = twins.real(self)
        if real is None:
            return original(self)
        with _disable_current_modes():
            return real.tolist()

    FakeTensor.tolist = tolist  # type: ignore[method-assign]  # patched only inside this context
    try:
        yield
    finally:
        FakeTensor.tolist = original  # type: ignore[method-assign]  # restores the patch above


@contextlib.contextmanager
def propagation(mode: FakeTensorMode) -> Iterator[RealTwins]:
    """Real twins for small known tensors, inside ``mode``.

    Enter it inside ``mode`` and before the model is built, so buffers (rotary
    frequencies, position ids) get theirs. Yields the :class:`RealTwins` mode.
    """
    twins = RealTwins(mode)
    with twins, _tensor_reads_twins(twins), _tolist_reads_twins(twins):
        yield twins
