"""Stage 6 — Load: stream a checkpoint's weights straight to the devices of a plan.

The model is built on ``meta`` at the plan's dtype; then every unit's tensors
are taken from the mmap'd checkpoint (one thread per shard, a few at a time)
and assigned in place of the meta tensors:

* GPU units: copied to ``cuda:N`` (CUDA is queried only in :func:`gpu` and
  :func:`_return_gpu_memory`; copies are plain ``Tensor.to``);
* ``cpu`` units: kept in RAM. When the checkpoint already has the planned
  dtype they stay views of the page cache (no second copy); their pages are
  read now so the first forward does not stall on I/O. Cast tensors are
  copies, read through a mapping of at most ``CAST_WINDOW`` bytes per reader,
  so peak RSS is the planned bytes plus ``MAX_READERS * CAST_WINDOW``. When
  the execution device is a GPU, :mod:`fitmap.runtime.offload` streams them in per
  forward;
* ``disk`` units: not read now. :mod:`fitmap.runtime.offload` reads them from the
  original files at forward time (no ``.dat`` rewrite).

Buffers that checkpoints do not carry (rotary ``inv_freq``, embedding scales)
are computed by the model's own ``_init_weights`` on their device. After a
load no parameter or buffer is left on ``meta`` (disk units hold ``meta``
placeholders between forwards by design). On any error everything placed so
far is released before the error propagates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import nn

from fitmap.dispatch import hooks, repairs
from fitmap.errors import BadInput, remote_code_flag
from fitmap.model import quant
from fitmap.model.build import build_model, empty_weights, load_config
from fitmap.model.inventory import Inventory, TensorInfo, inventory
from fitmap.model.keys import quantized_keys
from fitmap.model.modules import input_embeddings, tied_parameters
from fitmap.model.skeleton import share_parameter
from fitmap.planning.experts import CPU_COMPUTE, DISK_COMPUTE
from fitmap.planning.plan import Plan
from fitmap.runtime import diskread, offload, routed
from fitmap.runtime.buffers import check_materialized, compute_buffers
from fitmap.runtime.checkpoint import Checkpoint, named_tensors
from fitmap.sizes import GiB

PROGRESS_MIN_BYTES = GiB // 4  # smaller loads take well under a second: no bar
MAX_READERS = 4  # shards read at once


@dataclass
class LoadedModel:
    """A model placed per a plan, hooked for its devices. ``close()`` frees it."""

    model: nn.Module
    input_device: torch.device  # where inputs go and outputs come back
    plan: Plan
    seconds: float = 0.0  # wall time of the load
    bytes_read: int = 0  # checkpoint bytes placed at load (disk units excluded)
    _hooks: hooks.Hooks | None = field(default=None, repr=False)
    _offload: offload.Offload | None = field(default=None, repr=False)
    on_close: list[Callable[[], None]] = field(default_factory=list, repr=False)  # run first by close()
    closing_error: BaseException | None = field(default=None, repr=False)  # what close() found (a rank gone)
    cache_ops: Callable[..., None] | None = field(default=None, repr=False)  # other ranks' caches (torchrun)

    def close(self) -> None:
        """Detach hooks, stop read-ahead, and drop every weight (back to ``meta``)."""
        while self.on_close:
            self.on_close.pop()()
        if self._offload is not None:
            self._offload.close()
        if self._hooks is not None:
            self._hooks.remove()
        self._offload = self._hooks = None
        release(self.model)

    @property
    def offload_stats(self) -> offload.Stats | None:
        """Weight sets streamed in so far, and how many were prefetched (None: nothing offloaded)."""
        return self._offload.streamer.stats if self._offload is not None else None

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    model_dir: Path | str,
    plan: Plan,
    *,
    trust_remote_code: bool = False,
    readahead: bool = True,
    progress: bool = True,
    remote: frozenset[str] = frozenset(),
    announce: Callable[[tuple[str, ...], int], None] | None = None,
) -> LoadedModel:
    """Build ``model_dir``'s model on meta and place its weights per ``plan``.

    ``readahead``: disk units are read one unit ahead on a thread (off: read when they run). ``progress``:
    a bar with bytes, rate and ETA for loads of 256 MiB or more. Raises :class:`BadInput` (plan does not
    fit this model or machine), :class:`CheckpointError` (missing or corrupt files), :class:`MissingWeights`
    (tensors the checkpoint lacks), all before anything stays allocated. ``remote``: units another
    process runs (:mod:`fitmap.runtime.distributed`), left unloaded on ``meta``; ``announce`` is
    given the checkpoint files this process reads and their bytes for it, before any weight is read.
    """
    start = time.perf_counter()
    remote_code_flag(trust_remote_code)
    inv = inventory(model_dir)
    if inv.path is None or inv.weight_format == "none":
        raise BadInput(f"{model_dir} has no weights to load; fitmap load needs a model directory with a checkpoint")
    dtype = _dtype(plan.dtype)
    model = _skeleton_model(inv, dtype, trust_remote_code, plan.quantize)
    layout = Layout.of(model, plan, remote)
    release(model, lambda k: (p := layout.unit_of(k)) is not None and p.tier == "remote")  # 4.x code builds real
    ckpt = Checkpoint.index(inv, model, dtype)
    ckpt.check_complete(model)
    targets = load_targets(model, layout, ckpt)
    _check_quantized_resident(model, layout)
    if announce is not None:  # the checkpoint files of the units this process runs
        mine = [k for k, _ in named_tensors(model) if (p := layout.unit_of(k)) is not None and p.tier != "remote"]
        announce(*ckpt.files_of(mine))
    try:
        sources, left, loaded = routed.sources(model, ckpt, plan.device_map)  # experts fetched per routed expert
        loaded += place(model, layout, ckpt, targets, progress, skip=left)
        compute_buffers(model, ckpt, targets)
        check_materialized(model, {**targets, **dict.fromkeys(left)})
        if quant.of(model) is not None:
            quant.of(model).postprocess_model(model)
        result = _runtime(model, layout, ckpt, targets, plan, readahead, sources)
    except BaseException:
        release(model)
        raise
    result.seconds, result.bytes_read = time.perf_counter() - start, loaded
    return result


def _skeleton_model(
    inv: Inventory, dtype: torch.dtype, trust_remote_code: bool, quantize: str | None = None
) -> nn.Module:
    """The model on meta at ``dtype``; floating checkpoint tensors are cast to what it holds.
    A quantized model (saved so, or ``quantize``) gets transformers' quantized modules."""
    config = load_config(inv, trust_remote_code)
    config.dtype = dtype  # transformers 5 builds at config.dtype, whatever the default dtype says
    q = quant.quantizer(config, quantize, dtype)
    with empty_weights(keep_buffers=True):
        model = build_model(config, inv.task, dtype, trust_remote_code).eval()
    return model if q is None else quant.prepare(model, q, dtype)


def _check_quantized_resident(model: nn.Module, layout: Layout) -> None:
    """Quantized weights are placed whole on their device (their state lives beside the data):
    a unit the plan streams per forward (disk, or cpu with a GPU executing) cannot hold them."""
    qkeys = quantized_keys(model)
    if not qkeys:
        return
    streamed = sorted(u for u in streamed_units(model, layout) if any(k.startswith(u + ".") for k in qkeys))
    if streamed:
        raise BadInput(
            f"{len(streamed)} unit(s) with quantized weights are planned to be streamed per forward "
            f"({', '.join(streamed[:3])}: {layout.units[streamed[0]].tier} tier); fitmap keeps quantized "
            "weights resident. Re-plan with fitmap plan (it keeps them on GPUs), or give the GPUs more "
            "memory"
        )


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BadInput(f"plan dtype {name!r} is not a floating torch dtype; re-plan with --dtype bf16, fp16 or fp32")
    return dtype


# --------------------------------------------------------------------------- devices
def gpu(index: int) -> torch.device:
    """``cuda:index``, after checking that this machine has it (CUDA is queried here and below only)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise BadInput(
            f"the plan puts units on GPU {index}, but this machine has {count} usable GPU(s); "
            "load on the machine the plan was made for, or re-plan with --gpus matching this one"
        )
    return torch.device("cuda", index)


def _return_gpu_memory() -> None:
    """Hand freed blocks back to the driver, so a failed or closed load leaves the GPUs as found."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _runs_on(value: int | str) -> torch.device:
    if value in ("cpu", CPU_COMPUTE, DISK_COMPUTE):
        return torch.device("cpu")
    if isinstance(value, int) or str(value).isdigit():
        return gpu(int(value))
    raise BadInput(
        f"unknown device {value!r} in the plan; expected a GPU index, cpu, disk, {CPU_COMPUTE} or {DISK_COMPUTE}"
    )


@dataclass(frozen=True)
class Placed:
    unit: str
    tier: str  # "gpu" | "cpu" | "disk" | "remote" (another process runs it)
    runs_on: torch.device  # where it executes
    stored_on: torch.device | None  # where its weights live after load (None: read per forward)


@dataclass(frozen=True)
class Layout:
    """The plan resolved against the model: every unit's tier and devices, every key's unit."""

    units: dict[str, Placed]  # in execution order
    execution: torch.device  # where offloaded units run
    ties: tuple[tuple[str, ...], ...] = ()  # parameter names sharing one tensor (found on meta)

    @classmethod
    def of(cls, model: nn.Module, plan: Plan, remote: frozenset[str] = frozenset()) -> Layout:
        device_map = repairs.colocated(plan.device_map, plan.repairs)
        execution = _runs_on(plan.execution_device)
        units = {
            name: Placed(name, "remote", torch.device("cpu"), None)
            if name in remote
            else _placed(name, value, execution)
            for name, value in device_map.items()
        }
        layout = cls(units, execution, tied_parameters(model))
        layout.check_covers(model)
        return layout

    def unit_of(self, key: str) -> Placed | None:
        """The unit owning state-dict key ``key`` (longest module-path prefix)."""
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            hit = self.units.get(".".join(parts[:i]))
            if hit is not None:
                return hit
        return None

    def check_covers(self, model: nn.Module) -> None:
        names = [n for n, _ in named_tensors(model)]
        stray = [n for n in names if self.unit_of(n) is None]
        if stray:
            raise BadInput(
                f"the plan's device_map does not place {len(stray)} tensor(s) of {type(model).__name__}, "
                f"e.g. {', '.join(stray[:3])}; the plan was made for another model: re-plan this one"
            )
        for group in self.ties:
            devices = {self._covered(n).stored_on for n in group}
            if len(devices) > 1:
                raise BadInput(
                    f"tied weights {', '.join(group)} share one tensor but are planned on "
                    f"{sorted(map(str, devices))}; put their units on one device (fitmap plan does)"
                )

    def input_device(self, model: nn.Module) -> torch.device:
        embed = input_embeddings(model)
        path = next(p for p, m in model.named_modules() if m is embed)
        return self._covered(path).runs_on

    def _covered(self, key: str) -> Placed:
        """``unit_of`` for a key (or the path of a module holding tensors) that ``check_covers`` places."""
        placed = self.unit_of(key)
        assert placed is not None  # check_covers (run by Layout.of) found a unit for every tensor
        return placed


def _placed(name: str, value: int | str, execution: torch.device) -> Placed:
    if value == "disk":
        return Placed(name, "disk", execution, None)
    device = _runs_on(value)
    if value in (CPU_COMPUTE, DISK_COMPUTE):  # MoE experts computed on the CPU (from RAM or disk)
        return Placed(name, "cpu", device, device)
    if device.type == "cpu":
        return Placed(name, "cpu", execution, device)
    return Placed(name, "gpu", device, device)


# --------------------------------------------------------------------------- placing
def load_targets(model: nn.Module, layout: Layout, ckpt: Checkpoint) -> dict[str, torch.device | None]:
    """Where each tensor goes at load; None: offload reads it from the checkpoint per forward."""
    persistent = set(model.state_dict(keep_vars=True))
    streamed = streamed_units(model, layout)
    out: dict[str, torch.device | None] = {}
    for key, _ in named_tensors(model):
        p = layout.unit_of(key)
        assert p is not None  # Layout.of checked that every tensor of the model has a unit
        if p.tier == "remote":
            out[key] = None
            continue
        stored = key in ckpt.where or key in ckpt.merged
        if key in persistent and p.unit in streamed and (stored or p.stored_on is not None):
            out[key] = p.stored_on
        else:  # resident: non-persistent and computed buffers, units that offload cannot hook
            out[key] = p.runs_on
    return out


def streamed_units(model: nn.Module, layout: Layout) -> set[str]:
    """Units whose weights :mod:`fitmap.runtime.offload` brings to their device per forward.

    Only modules: a bare-parameter unit has no forward to hook, so it stays resident.
    """
    return {
        n
        for n, p in layout.units.items()
        if (p.tier == "disk" or (p.tier == "cpu" and p.runs_on.type != "cpu")) and hooks.module_or_none(model, n)
    }


def place(
    model: nn.Module,
    layout: Layout,
    ckpt: Checkpoint,
    targets: Mapping[str, torch.device | None],
    progress: bool,
    skip: Collection[str] = (),
) -> int:
    """Read every tensor with a target device, but ``skip``, and assign it there; returns bytes read."""
    targets = {k: None if k in skip else d for k, d in targets.items()}
    jobs = _jobs(model, ckpt, targets)
    total = sum(ckpt.nbytes[k] for ks in jobs.values() for k, _ in ks)
    with _progress(total, progress) as advance, ThreadPoolExecutor(min(MAX_READERS, max(1, len(jobs)))) as pool:
        futures = [pool.submit(_read_file, model, ckpt, ks, advance) for ks in jobs.values()]
        try:
            while futures:
                _assign(model, futures.pop(0).result())
        finally:  # on error: nothing queued still runs, and no finished result outlives release()
            for f in futures:
                f.cancel()
            futures.clear()
    total += _place_merged(model, ckpt, targets)
    retie(model, layout.ties)
    return total


def _on_device(model: nn.Module, key: str, t: torch.Tensor, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """``t`` on ``device``; a weight quantized while loading is quantized there, one tensor at a time."""
    t = t.to(device)  # no-op for cpu targets
    if not quant.quantizes(model, key):
        return [(key, t)]
    return list(quant.quantize(model, key, t).items())


def _place_merged(model: nn.Module, ckpt: Checkpoint, targets: Mapping[str, torch.device | None]) -> int:
    """Tensors the checkpoint stores split (per expert): built by transformers' own converter from
    their parts, cast to the built dtype, placed on their device (disk-tier ones are built per
    forward by the unit's reader, :meth:`Checkpoint.read`)."""
    read = ckpt._part_reader()
    quantized = quantized_keys(model)
    done = 0
    for key, merge in ckpt.merged.items():
        device = targets.get(key)
        if device is None:
            continue
        t = merge.build(read, model)
        if key in quantized:  # the quantizer's parameter, with its state: moved, never cast
            set_tensor(model, key, t.to(device))
        else:
            set_tensor(model, key, t.to(device=device, dtype=ckpt.dtypes[key]).contiguous())
        done += ckpt.nbytes[key]
    return done


def _assign(model: nn.Module, tensors: list[tuple[str, torch.Tensor]]) -> None:
    for key, t in tensors:
        set_tensor(model, key, t)


def _jobs(
    model: nn.Module, ckpt: Checkpoint, targets: Mapping[str, torch.device | None]
) -> dict[str, list[tuple[str, torch.device]]]:
    """Per checkpoint file: (model key, target device) of what to read now; tied copies once."""
    jobs: dict[str, list[tuple[str, torch.device]]] = {}
    seen: set[int] = set()
    for key, t in named_tensors(model):
        device = targets[key]
        if key not in ckpt.where or device is None or id(t) in seen:
            continue
        seen.add(id(t))
        jobs.setdefault(ckpt.where[key][0], []).append((key, device))
    return jobs


def _read_file(
    model: nn.Module, ckpt: Checkpoint, items: list[tuple[str, torch.device]], advance: Callable[[int], None]
) -> list[tuple[str, torch.Tensor]]:
    devices = dict(items)
    out = []
    for key, t in ckpt.read(list(devices)):
        out.extend(_on_device(model, key, t, devices[key]))
        advance(ckpt.nbytes[key])
    return out


def set_tensor(model: nn.Module, key: str, t: torch.Tensor) -> None:
    """Put ``t`` in place of parameter or buffer ``key`` (no copy into the old storage)."""
    path, _, attr = key.rpartition(".")
    owner = model.get_submodule(path)
    if attr in owner._parameters:
        owner._parameters[attr] = offload.as_parameter(t)
    else:
        owner._buffers[attr] = t


def retie(model: nn.Module, ties: tuple[tuple[str, ...], ...]) -> None:
    """Tied names were one meta Parameter; point them all at the one that was loaded."""
    for group in ties:
        loaded = next((model.get_parameter(n) for n in group if not model.get_parameter(n).is_meta), None)
        if loaded is not None:
            share_parameter(model, group, loaded)


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled or total < PROGRESS_MIN_BYTES:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        TextColumn("loading"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task("load", total=total)
        yield lambda n: bar.advance(task, n)


# --------------------------------------------------------------------------- runtime
def _runtime(
    model: nn.Module,
    layout: Layout,
    ckpt: Checkpoint,
    targets: Mapping[str, torch.device | None],
    plan: Plan,
    readahead: bool,
    sources: Mapping[str, routed.Source],
) -> LoadedModel:
    """Hooks for device boundaries and repairs, then offload hooks for cpu/disk units; experts computed per
    routed expert fetch theirs after the boundary hooks (which bring their routes to the CPU)."""
    input_device = layout.input_device(model)
    placement = {name: p.runs_on for name, p in layout.units.items() if p.tier != "remote"}
    boundary = hooks.attach(model, placement, input_device)
    try:
        boundary.handles.extend(repairs.apply(model, plan.repairs, _runs_on))
        boundary.handles.extend(h for path, s in sources.items() for h in routed.attach(model.get_submodule(path), s))
        streamed, disk_ahead = offloaded_units(model, layout, ckpt, targets, plan, readahead)
        off = (
            offload.attach(
                model, streamed, layout.execution, readahead, ring_buffers(plan, model, streamed), disk_ahead
            )
            if streamed
            else None
        )
    except BaseException:
        boundary.remove()
        raise
    return LoadedModel(model, input_device, plan, _hooks=boundary, _offload=off)


MAX_RING = 8  # device buffers for cpu-tier units, at most


def ring_buffers(plan: Plan, model: nn.Module, streamed: list[offload.Offloaded]) -> int:
    """Device buffers for the cpu-tier units: the two the plan charges (its stream buffer),
    plus as many more as the execution GPU has free in the plan after a margin (10% of what
    the plan puts there, at least 1 GiB), up to ``MAX_RING``. More buffers let copies run
    further ahead of a host that is slow to launch the units before them."""
    unit_bytes = [
        sum(t.numel() * t.element_size() for k, t in model.get_submodule(u.path).state_dict().items() if k in u.keys)
        for u in streamed
        if u.read is None
    ]
    if not unit_bytes:
        return 2
    return min(MAX_RING, 2 + _spare(plan, plan.execution_device) // max(max(unit_bytes), 1))


def offloaded_units(
    model: nn.Module,
    layout: Layout,
    ckpt: Checkpoint,
    targets: Mapping[str, torch.device | None],
    plan: Plan,
    readahead: bool,
) -> tuple[list[offload.Offloaded], int]:
    """Disk units (read per forward) and, on a GPU, cpu units (copied in per forward), in execution
    order; and how many disk units may be read ahead (the read buffers there are, less one)."""
    streamed = streamed_units(model, layout)
    keys = {
        name: [
            k
            for k in model.get_submodule(name).state_dict(keep_vars=True)
            if p.tier == "cpu" or targets[f"{name}.{k}"] is None
        ]
        for name, p in layout.units.items()
        if name in streamed
    }
    disk = {name: {k: f"{name}.{k}" for k in ks} for name, ks in keys.items() if layout.units[name].tier == "disk"}
    readers, ahead = disk_readers(ckpt, disk, plan, readahead, pinned=layout.execution.type == "cuda")
    out = [offload.Offloaded(name, tuple(ks), readers.get(name)) for name, ks in keys.items()]
    return out, ahead


MAX_READ_BUFFERS = 8  # disk units in RAM at once, at most (one running, the rest read ahead)


def disk_readers(
    ckpt: Checkpoint, disk: Mapping[str, Mapping[str, str]], plan: Plan, readahead: bool, pinned: bool
) -> tuple[dict[str, Callable[[], object]], int]:
    """A reader per disk unit, and how many units may be read ahead.

    safetensors checkpoints are read with large positioned reads into a pool of reused
    buffers (:mod:`fitmap.runtime.diskread`): two, plus as many as the RAM the plan leaves free
    holds (after a margin of 10% of what it uses there, at least 1 GiB), up to
    ``MAX_READ_BUFFERS``. Other formats and dtypes go through the mmap reader, one ahead.
    """
    if not disk:
        return {}, 1
    infos = {name: {rel: (ckpt.infos.get(k), ckpt.dtypes[k]) for rel, k in ks.items()} for name, ks in disk.items()}
    if ckpt.format != "safetensors" or not all(
        i is not None and diskread.readable([i]) for unit in infos.values() for i, _ in unit.values()
    ):
        return {name: ckpt.reader(ks) for name, ks in disk.items()}, 1
    known = cast("dict[str, dict[str, tuple[TensorInfo, torch.dtype]]]", infos)  # every info checked above
    spans = {name: diskread.spans(ckpt.directory, unit) for name, unit in known.items()}
    size = max(diskread.buffer_bytes(s) for s in spans.values())
    count = min(MAX_READ_BUFFERS, 2 + _spare(plan, "cpu") // max(size, 1)) if readahead else 2
    pool = diskread.Buffers(size, count, pinned)
    return {name: diskread.UnitReader(s, pool) for name, s in spans.items()}, count - 1


def _spare(plan: Plan, device: str) -> int:
    """Bytes the plan leaves free on ``device`` after a margin (10% of what it puts there, at
    least 1 GiB): room for buffers beyond the two the plan charges. 0 when it has no ledger."""
    ledger = next((d for d in plan.devices if d.device == device), None)
    if ledger is None:
        return 0
    used = ledger.total_bytes - ledger.reserve_bytes
    return max(0, ledger.capacity_bytes - ledger.total_bytes - max(used // 10, GiB))


def release(model: nn.Module, drop: Callable[[str], bool] = lambda key: True) -> None:
    """Drop every parameter and buffer (those ``drop`` names) for meta tensors, freeing RAM and GPU memory."""
    for key, t in list(named_tensors(model)):
        if not t.is_meta and drop(key):
            set_tensor(model, key, torch.empty_like(t, device="meta"))
    _return_gpu_memory()
