"""Offload that keeps up: units whose weights live in CPU RAM or on disk run on
the execution device, with the next units' weights on their way while the
current one computes.

* ``cpu`` tier, GPU execution: weights stay in pinned host memory; a pre-hook
  swaps in device copies made on a side stream into a ring of device buffers
  reused for the whole run (two or more, each the size of the largest unit), a
  post-hook swaps the host tensors back. Events order the buffers: a copy waits
  until the compute that read the buffer's previous unit is done, and a unit's
  compute waits for its copy; the host never waits, and the caching allocator is
  not involved. Copies run as many units ahead as the ring has buffers to spare.
* ``disk`` tier: weights are read from the ORIGINAL checkpoint by a read-ahead
  thread, as many units ahead as the unit readers have buffers to spare
  (:mod:`fitmap.runtime.diskread`); after the unit's forward they are dropped (back to
  ``meta``) and the buffer goes back to its pool.

Which unit is "next" is learned from the previous forward (a decode step skips
the vision tower), starting from the static execution order. State lives in
the hook objects; standard forward pre/post hooks only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Weights = dict[str, torch.Tensor]  # state-dict key relative to the unit -> tensor
ENTRY = ""  # the model's own forward: where the chain of units starts


def as_parameter(t: torch.Tensor) -> nn.Parameter:
    """Floating weights keep ``requires_grad=True``, as ``from_pretrained`` leaves them: with
    it off, torch 2.13's CPU bf16 linear copies the whole weight when its input is a strided
    slice (``lm_head`` on ``hidden[:, -1:]``), 0.3 s per prefill on a 1.9 GB model.
    Generation runs under ``no_grad``, so nothing is recorded."""
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=t.is_floating_point())


@dataclass(frozen=True)
class Offloaded:
    """One unit whose weights are not kept on its execution device."""

    path: str  # unit module path
    keys: tuple[str, ...]  # state-dict keys (relative to ``path``) streamed in
    read: Callable[[], Any] | None = None  # disk tier: reads ``keys`` (CPU tensors): a Weights
    # dict, or an object with ``.weights`` and ``.release(copied_event=None)`` (a reused buffer,
    # given back when the unit has run or its copy to the GPU is done: fitmap.runtime.diskread.HostRead).
    # ``read`` None: cpu tier, the module's current (host) tensors are the source


@dataclass
class Offload:
    """What :func:`attach` set up; ``close()`` detaches it and stops the read-ahead thread."""

    streamer: Streamer
    handles: list[RemovableHandle] = field(default_factory=list)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.streamer.close()


def attach(
    model: nn.Module,
    units: Sequence[Offloaded],
    device: torch.device,
    readahead: bool = True,
    ring_buffers: int = 2,
    disk_ahead: int = 1,
) -> Offload:
    """Hook ``units`` (in execution order) of ``model`` to run on ``device`` with weights streamed in.

    Disk units must hold ``meta`` placeholders; cpu units must hold their host tensors.
    ``ring_buffers``: device buffers for cpu-tier units on a GPU, each the size of the
    largest (at least 2; more let copies run further ahead of a slow host). ``disk_ahead``:
    disk units read ahead at most (their readers must have that many buffers to spare).
    """
    streamer = Streamer(model, units, torch.device(device), readahead, ring_buffers, disk_ahead)
    handles = [model.register_forward_pre_hook(streamer.start_forward)]
    for u in units:
        module = model.get_submodule(u.path)
        handles.append(module.register_forward_pre_hook(WeightsIn(u.path, streamer)))
        handles.append(module.register_forward_hook(WeightsOut(u.path, streamer), always_call=True))
    return Offload(streamer, handles)


# --------------------------------------------------------------------------- hooks
class WeightsIn:
    """Pre-hook: the unit's weights on the execution device, and the next unit's fetch started."""

    def __init__(self, path: str, streamer: Streamer) -> None:
        self.path = path
        self.streamer = streamer

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.streamer.enter(self.path)


class WeightsOut:
    """Post-hook: the unit's device copies are released (host or meta placeholders back)."""

    def __init__(self, path: str, streamer: Streamer) -> None:
        self.path = path
        self.streamer = streamer

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        self.streamer.leave(self.path)


# --------------------------------------------------------------------------- streaming
@dataclass
class _Slot:
    """One offloaded unit: where its tensors go and what sits there between forwards."""

    unit: Offloaded
    targets: dict[str, tuple[nn.Module, str]]  # relative key -> (owning module, attribute)
    resting: Weights  # between forwards: pinned host tensors or meta


@dataclass
class Stats:
    fetched: int = 0  # unit weight sets brought to the execution device
    prefetched: int = 0  # ... of which were ready (or in flight) before the unit ran
    wasted: int = 0  # prefetches thrown away (the unit did not run next)


class Streamer:
    """Brings offloaded units' weights in just in time, ahead of their forward.

    Prefetches follow the order learned from the last forward: cpu-tier units on a GPU
    as many ahead as the ring has buffers to spare (``ring_buffers - 1``: the copies
    keep the copy engine busy while the host is still launching earlier units), disk
    units ``disk_ahead`` ahead, read one after another on the read-ahead thread from
    the top of each forward, so the disk works while the RAM/GPU layers compute.
    """

    def __init__(
        self,
        model: nn.Module,
        units: Sequence[Offloaded],
        device: torch.device,
        readahead: bool,
        ring_buffers: int = 2,
        disk_ahead: int = 1,
    ) -> None:
        self.device = device
        self.readahead = readahead
        self.disk_ahead = max(1, disk_ahead)
        self.slots = {u.path: _slot(model, u, device) for u in units}
        order = [ENTRY] + [u.path for u in units]
        self.next: dict[str, str | None] = dict(zip(order, order[1:] + [None]))
        self.last = ENTRY
        self.pending: list[tuple[str, Future]] = []  # in the order the units should run
        self.running: dict[str, Fetched] = {}
        self.stats = Stats()
        self.copier = _Copier.for_device(device)
        host = [s.resting for s in self.slots.values() if s.unit.read is None]
        self.ring = _Ring.for_units(device, host, ring_buffers)  # cpu-tier units on a GPU: reused device buffers
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fitmap-readahead") if readahead else None

    def start_forward(self, *_: object) -> None:
        """Model pre-hook: the first offloaded units of the last forward start loading now."""
        self.last = ENTRY
        self._prefetch_after(ENTRY)

    def enter(self, path: str) -> None:
        self.next[self.last] = path  # learn the order actually run
        self.last = path
        _put(self.slots[path].targets, self._take(path))
        self._prefetch_after(path)

    def leave(self, path: str) -> None:
        slot = self.slots[path]
        _put(slot.targets, slot.resting)
        fetched = self.running.pop(path, None)
        if fetched is not None:
            if fetched.buffer is not None:
                self.ring.release(fetched.buffer)
            _release_host(fetched)

    def close(self) -> None:
        self._drop_pending()
        self.running.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.ring = _Ring.for_units(self.device, [], 0)  # the device buffers go with the model

    # -- fetching
    def _take(self, path: str) -> Weights:
        self.stats.fetched += 1
        if self.pending and self.pending[0][0] == path:
            fetched = self.pending.pop(0)[1].result()
            self.stats.prefetched += 1
        else:
            # Another unit runs than the ones prefetched: drop them. Ring copies in flight stay
            # ordered on the side stream, and every buffer's previous unit has left by now.
            self._drop_pending()
            fetched = self._fetch(path)
        self.running[path] = fetched
        return self.copier.ready(fetched)

    def _drop_pending(self) -> None:
        for _, fut in self.pending:
            if not fut.cancel():  # read, or being read: its host buffer goes back when it is done
                fut.add_done_callback(_release_when_done)
            self.stats.wasted += 1
        self.pending = []

    def _prefetch_after(self, path: str) -> None:
        """Start fetches for the units expected after ``path``, as deep as each tier allows."""
        if not self.readahead:
            return
        queued = {p for p, _ in self.pending}
        live = sum(1 for f in self.running.values() if f.buffer is not None)  # more than one if units nest
        ring_room = max(len(self.ring.buffers) - max(live, 1), 1) - sum(1 for p in queued if self._on_ring(p))
        disk_room = self.disk_ahead - sum(1 for p in queued if not self._on_ring(p))
        nxt, steps = self.next.get(path), len(self.slots)
        while nxt is not None and nxt != path and steps > 0:  # the learned order may loop: bounded
            steps -= 1
            if nxt not in queued:
                on_ring = self._on_ring(nxt)
                if (ring_room if on_ring else disk_room) <= 0:
                    return
                self.pending.append((nxt, self._start(nxt)))
                queued.add(nxt)
                if on_ring:
                    ring_room -= 1
                else:
                    disk_room -= 1
            nxt = self.next.get(nxt)

    def _on_ring(self, path: str) -> bool:
        """cpu-tier units (host tensors), whose copies need no thread."""
        return self.slots[path].unit.read is None

    def _start(self, path: str) -> Future:
        if self._on_ring(path):  # host tensors: the copy itself is asynchronous
            fut: Future = Future()
            fut.set_result(self._fetch(path))
            return fut
        assert self.pool is not None  # only _prefetch_after starts fetches, and only with readahead (a pool)
        return self.pool.submit(self._fetch, path)  # disk: read on the read-ahead thread

    def _fetch(self, path: str) -> Fetched:
        slot = self.slots[path]
        if slot.unit.read is None:
            if self.ring.buffers:
                return self.ring.start(slot.resting)  # called on the main thread only
            return self.copier.start(slot.resting)
        host = slot.unit.read()
        weights = host if isinstance(host, dict) else host.weights
        fetched = self.copier.start(weights)
        if fetched.event is not None and not isinstance(host, dict):
            host.release(fetched.event)  # the buffer is free once its copy to the GPU is done
        else:
            fetched.host = None if isinstance(host, dict) else host  # given back when the unit has run
        return fetched


def _release_host(fetched: Fetched) -> None:
    if fetched.host is not None:
        fetched.host.release()
        fetched.host = None


def _release_when_done(fut: Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        _release_host(fut.result())


def _slot(model: nn.Module, unit: Offloaded, device: torch.device) -> _Slot:
    module = model.get_submodule(unit.path)
    targets = _targets(module, unit.keys)
    current = {k: getattr(owner, attr) for k, (owner, attr) in targets.items()}
    if unit.read is None and device.type == "cuda":
        current = {k: t.pin_memory() for k, t in current.items()}  # async host->device copies need pinned pages
        _put(targets, current)
    return _Slot(unit, targets, current)


def _targets(module: nn.Module, keys: Sequence[str]) -> dict[str, tuple[nn.Module, str]]:
    """Relative state-dict key -> (owning module, attribute)."""
    out = {}
    for key in keys:
        path, _, attr = key.rpartition(".")
        out[key] = (module.get_submodule(path), attr)
    return out


def _put(targets: Mapping[str, tuple[nn.Module, str]], weights: Mapping[str, torch.Tensor]) -> None:
    for key, (owner, attr) in targets.items():
        t = weights[key]
        if attr in owner._parameters:
            owner._parameters[attr] = as_parameter(t)
        else:
            owner._buffers[attr] = t


# --------------------------------------------------------------------------- device copies
@dataclass
class Fetched:
    weights: Weights
    event: torch.cuda.Event | None = None  # torch.cuda.Event when the copy ran on a side stream
    buffer: int | None = None  # ring buffer holding ``weights`` (cpu tier on a GPU)
    host: Any = None  # a disk read's host buffer, given back when the unit has run (CPU execution)


class _Copier:
    """Host -> execution device. On CPU execution there is nothing to copy."""

    @staticmethod
    def for_device(device: torch.device) -> _Copier:
        return _CudaCopier(device) if device.type == "cuda" else _Copier()

    def start(self, host: Weights) -> Fetched:
        return Fetched(host)

    def ready(self, fetched: Fetched) -> Weights:
        return fetched.weights


class _CudaCopier(_Copier):
    """Copies on a side stream so the next unit's transfer overlaps the current unit's compute."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def start(self, host: Weights) -> Fetched:
        with torch.cuda.stream(self.stream):
            weights = {k: t.to(self.device, non_blocking=True) for k, t in host.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        return Fetched(weights, event)

    def ready(self, fetched: Fetched) -> Weights:
        main = torch.cuda.current_stream(self.device)
        assert fetched.event is not None  # every copy to a CUDA device (copier or ring) records one
        main.wait_event(fetched.event)
        if fetched.buffer is None:
            for t in fetched.weights.values():
                t.record_stream(main)  # made on the side stream: freed only after main's use
        return fetched.weights


ALIGN = 256  # bytes: each tensor in a ring buffer starts on an allocation-aligned offset
USE_RING = True  # False: cpu-tier copies go through the caching allocator (kept for comparison in bench/)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def packed_bytes(weights: Weights) -> int:
    """Bytes ``weights`` take packed one after another in a ring buffer."""
    return sum(_aligned(t.numel() * t.element_size()) for t in weights.values())


class _Ring:
    """Device buffers (two or more), each the size of the largest cpu-tier unit, reused for the whole run.

    A unit's weights are copied (side stream, from pinned host memory) into the next
    buffer, as views packed in it. Before the copy, the side stream waits for the event
    recorded on the compute stream when the buffer's previous unit left; the compute
    stream waits for the copy's event before the unit runs. Nothing blocks the host, and
    no device memory is allocated or freed per unit. Buffers are handed out in turn and
    at most ``len(buffers)`` units are live (one running, the rest prefetched), so a
    buffer handed out is never one a live unit uses.
    """

    def __init__(self, device: torch.device, nbytes: int, count: int = 2) -> None:
        self.device = device
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)] if nbytes else []
        self.freed: list[torch.cuda.Event | None] = [None] * len(self.buffers)  # compute-stream event: last reader done
        self.turn = 0
        self.stream = torch.cuda.Stream(device) if self.buffers else None

    @classmethod
    def for_units(cls, device: torch.device, host_units: Sequence[Weights], count: int) -> _Ring:
        if device.type != "cuda" or not host_units or not USE_RING or count < 1:
            return cls(device, 0)
        return cls(device, max(packed_bytes(w) for w in host_units), max(2, count))

    def start(self, host: Weights) -> Fetched:
        index = self.turn
        self.turn = (index + 1) % len(self.buffers)
        buf = self.buffers[index]
        assert self.stream is not None  # a ring with buffers (the modulo above) always has its stream
        freed = self.freed[index]
        weights: Weights = {}
        with torch.cuda.stream(self.stream):
            if freed is not None:
                self.stream.wait_event(freed)
            offset = 0
            for key, t in host.items():
                n = t.numel() * t.element_size()
                view = buf[offset : offset + n].view(t.dtype).view(t.shape)
                view.copy_(t, non_blocking=True)
                weights[key] = view
                offset += _aligned(n)
            event = torch.cuda.Event()
            event.record(self.stream)
        return Fetched(weights, event, index)

    def release(self, index: int) -> None:
        """The unit in buffer ``index`` has been run (enqueued): the next copy into it waits for that."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.freed[index] = event
