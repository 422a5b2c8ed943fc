"""The placement solver: sizes and capacities in, an assignment of items to devices out.

A pure function of integers (bytes); it never imports torch, so it is tested
exhaustively (property tests, brute force) without hardware.

Semantics
---------
Items are placement units (or co-location groups the caller already merged), in
execution order. Devices:

- *Compute devices* are the GPUs, in the order given. With no GPUs the single
  compute device is ``"cpu"`` (capacity ``tiers.cpu``, reserve 0).
- *Storage tiers* hold the weights of offloaded items: ``"cpu"`` (only when there
  are GPUs) and ``"disk"``, each present when its capacity is not None.

Placement rules:

- Items kept on compute devices form contiguous runs in item order, the runs in
  device order (a pipeline: GPU k's items all come before GPU k+1's); a device may
  be empty.
- A compute device's load = reserve + Σ weights + Σ KV + max activation (the
  activation peak is transient, so only the largest counts) + stream buffer on the
  execution device. A device that holds nothing and executes nothing has load 0:
  no CUDA context is created on it, so its reserve is not charged either.
- Offload: when the compute devices cannot hold everything, the *last k*
  offloadable, unpinned items in item order go to storage, k as small as possible.
  Items pinned to ``"cpu"``/``"disk"`` are offloaded there whatever k is.
  Offloaded items run on the *execution device* (the first compute device): their
  KV and activations are charged there, plus a stream buffer of 2 × the largest
  offloaded weight (double buffering for prefetch; with no GPUs it is the
  read-ahead buffer in RAM). Their weights go, in item order, each to the cpu
  tier if it still has room for it, otherwise to disk (first fit; with no disk
  tier all go to cpu, with no GPUs all go to disk).
  Removing them does not break the contiguity of the remaining runs.
- Pins: an item pinned to a compute device is in that device's run.
- A device fits when its load <= capacity; utilization = load / capacity.

Policies (all use the smallest k that fits):

- BALANCED: minimise the largest utilization over compute devices, exactly; among
  optimal splits, earlier devices take as many items as they can. (With k fixed
  the offloaded bytes are fixed, so "fewer offloaded bytes" never needs breaking.)
- SEQUENTIAL: each compute device in turn takes items up to its capacity.
- MIN_GPUS: the shortest prefix of the GPUs that holds everything with k = 0,
  balanced among those; when none does, as BALANCED.

When nothing fits, ``fits`` is False, the loads are those of the returned
assignment and ``shortfall`` is Σ (load - capacity) over the devices that are
over. The returned assignment is the best of three offload depths: none, the
smallest k at which the compute devices fit (balanced; the shortfall is then on
the storage tiers), and the largest k the storage tiers hold. For the last two the
split minimises the compute devices' total overage (exactly, by dynamic programming);
the winner has the smallest shortfall, then the smallest largest utilization,
then the smallest k. ``BadInput`` is raised only for contradictory inputs, all
listed at once: negative sizes, duplicate GPU names, no compute device at all (no
GPUs and no cpu tier), pins to unknown devices, a storage pin on an item that is not
offloadable, GPU pins out of pipeline order (naming both items and GPUs).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from fitmap.errors import BadInput, collect

CPU = "cpu"
DISK = "disk"


@dataclass(frozen=True)
class Item:
    """One placement unit, in execution order. Sizes in bytes."""

    name: str
    weight_bytes: int
    """Resident weights on the device that holds the item."""
    kv_bytes: int
    """KV cache the item keeps on the device that executes it."""
    act_bytes: int
    """Transient activation peak while it runs (a device pays the max over its items)."""
    pin: str | None = None
    """A GPU name ("0", "1", ...), "cpu" or "disk": the item must go there."""
    offloadable: bool = True
    """May be placed on the cpu/disk tier (blocks: yes; input/output groups: no)."""


@dataclass(frozen=True)
class Gpu:
    name: str
    """As the user names it: "0", "1", ..."""
    capacity: int
    """Bytes of the card the plan may use (total memory or the user's limit)."""
    reserve: int
    """Bytes kept for the CUDA context, cuBLAS workspace and allocator rounding."""


@dataclass(frozen=True)
class Tiers:
    cpu: int | None
    """Bytes of CPU RAM for weights; None = no cpu tier."""
    disk: int | None
    """Bytes on disk; None = no disk tier (a huge int = unlimited)."""


class Policy(str, Enum):
    BALANCED = "balanced"
    SEQUENTIAL = "sequential"
    MIN_GPUS = "min-gpus"


@dataclass(frozen=True)
class DeviceLoad:
    """What one device holds, in bytes."""

    device: str
    capacity: int
    weights: int
    kv: int
    activations: int
    reserve: int
    stream_buffer: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations + self.reserve + self.stream_buffer

    @property
    def utilization(self) -> float:
        return _utilization(self.total, self.capacity)


@dataclass(frozen=True)
class Assignment:
    devices: tuple[str, ...]
    """Per item: a GPU name, "cpu" or "disk"."""
    loads: tuple[DeviceLoad, ...]
    """One per compute device (in order), then "cpu" and "disk" when they are tiers."""
    fits: bool
    max_utilization: float
    """Over compute devices."""
    shortfall: int
    """Σ bytes over capacity on the devices that are over (0 when it fits)."""


def solve(
    items: Sequence[Item], gpus: Sequence[Gpu], tiers: Tiers, policy: Policy | str = Policy.BALANCED
) -> Assignment:
    """Place ``items`` on ``gpus`` and the storage ``tiers`` (see the module docstring)."""
    problem = _problem(items, gpus, tiers)
    policy = _policy(policy)
    if policy is Policy.MIN_GPUS:
        fewest = _fewest_gpus(problem)
        if fewest is not None:
            return fewest
    stage = _first_fitting_stage(problem)
    if stage is None:
        return _closest(problem)
    ndev = len(problem.compute)
    if policy is Policy.SEQUENTIAL:
        return _assemble(problem, stage, _fill(problem, stage, ndev, 1.0))
    return _assemble(problem, stage, _balance(problem, stage, ndev))


# ---------------------------------------------------------------- the instance


@dataclass(frozen=True)
class _Device:
    """A compute device as the solver sees it (a GPU, or the cpu when there is none)."""

    name: str
    capacity: int
    reserve: int


@dataclass(frozen=True)
class _Problem:
    items: tuple[Item, ...]
    compute: tuple[_Device, ...]
    storage: tuple[tuple[str, int], ...]
    """(tier, capacity) of the storage tiers present, cpu before disk."""
    home: tuple[int | None, ...]
    """Per item: the index of the compute device it is pinned to."""
    forced: dict[int, str]
    """Item index -> storage tier it is pinned to."""
    movable: tuple[int, ...]
    """Offload candidates (offloadable, unpinned), in item order; k takes the tail."""


def _policy(policy: Policy | str) -> Policy:
    try:
        return Policy(policy)
    except ValueError:
        choices = ", ".join(p.value for p in Policy)
        raise BadInput(f"unknown placement policy {policy!r}; use one of: {choices}") from None


def _problem(items: Sequence[Item], gpus: Sequence[Gpu], tiers: Tiers) -> _Problem:
    problems = _size_problems(items, gpus, tiers) + _device_problems(gpus, tiers)
    collect(problems)
    if gpus:
        compute = tuple(_Device(g.name, g.capacity, g.reserve) for g in gpus)
        storage = tuple((n, c) for n, c in ((CPU, tiers.cpu), (DISK, tiers.disk)) if c is not None)
    else:
        compute = (_Device(CPU, tiers.cpu or 0, 0),)
        storage = ((DISK, tiers.disk),) if tiers.disk is not None else ()
    home, forced = _pins(items, compute, dict(storage))
    movable = tuple(i for i, item in enumerate(items) if storage and item.offloadable and item.pin is None)
    return _Problem(tuple(items), compute, storage, home, forced, movable)


def _size_problems(items: Sequence[Item], gpus: Sequence[Gpu], tiers: Tiers) -> list[str]:
    sizes = [
        (f"item {it.name!r} {field}", getattr(it, field))
        for it in items
        for field in ("weight_bytes", "kv_bytes", "act_bytes")
    ]
    sizes += [(f"GPU {g.name} {f}", getattr(g, f)) for g in gpus for f in ("capacity", "reserve")]
    sizes += [(f"{tier} tier", size) for tier, size in ((CPU, tiers.cpu), (DISK, tiers.disk))]
    return [f"{what} is {size} bytes; sizes must be >= 0" for what, size in sizes if size is not None and size < 0]


def _device_problems(gpus: Sequence[Gpu], tiers: Tiers) -> list[str]:
    problems = []
    names = [g.name for g in gpus]
    for name in sorted({n for n in names if names.count(n) > 1 or n in (CPU, DISK)}):
        problems.append(f"GPU name {name!r} is used twice or clashes with a tier; name GPUs 0, 1, ...")
    if not gpus and tiers.cpu is None:
        problems.append("no GPUs and no cpu tier: nothing can run the model; give --gpus or --cpu SIZE")
    return problems


def _pins(
    items: Sequence[Item], compute: tuple[_Device, ...], storage: dict[str, int]
) -> tuple[tuple[int | None, ...], dict[int, str]]:
    """Where pinned items must go; raises BadInput listing every contradictory pin."""
    index = {d.name: j for j, d in enumerate(compute)}
    home: list[int | None] = [None] * len(items)
    forced: dict[int, str] = {}
    problems = []
    for i, item in enumerate(items):
        if item.pin is None:
            continue
        if item.pin in index:
            home[i] = index[item.pin]
        elif item.pin in storage and item.offloadable:
            forced[i] = item.pin
        elif item.pin in storage:
            problems.append(f"item {item.name!r} is pinned to {item.pin!r} but is not offloadable; pin it to a GPU")
        else:
            known = ", ".join([*index, *storage])
            problems.append(
                f"item {item.name!r} is pinned to {item.pin!r}, which is not a device here "
                f"(devices: {known}); fix the pin or add that device"
            )
    problems += _pin_order_problems(items, home)
    collect(problems)
    return tuple(home), forced


def _pin_order_problems(items: Sequence[Item], home: list[int | None]) -> list[str]:
    """Runs follow device order, so GPU pins must not decrease along the items."""
    problems = []
    ahead: Item | None = None  # the item pinned to the latest device so far
    ahead_home = -1
    for item, j in zip(items, home):
        if j is None:
            continue
        if ahead is not None and j < ahead_home:
            problems.append(
                f"pins out of order: {ahead.name!r} (GPU {ahead.pin}) comes before {item.name!r} "
                f"(GPU {item.pin}), but GPU {item.pin}'s items run before GPU {ahead.pin}'s; "
                "reorder the GPUs or change the pins"
            )
        elif j > ahead_home:
            ahead, ahead_home = item, j
    return problems


# ---------------------------------------------------------------- one offload depth


@dataclass(frozen=True)
class _Charges:
    """What offloaded items cost the execution device, in bytes."""

    kv: int
    act: int
    stream: int
    """2 x the largest offloaded weight: two buffers, one filling while the other runs."""


def _charges(moved: list[Item]) -> _Charges | None:
    if not moved:
        return None
    return _Charges(
        kv=sum(it.kv_bytes for it in moved),
        act=max(it.act_bytes for it in moved),
        stream=2 * max(it.weight_bytes for it in moved),
    )


@dataclass(frozen=True)
class _Stage:
    """One offload depth k: the items kept on compute devices, in order, and the rest."""

    k: int
    kept: tuple[int, ...]
    homes: tuple[int | None, ...]
    """Pinned compute device per kept item."""
    stored: dict[int, str]
    """Offloaded item -> storage tier."""
    charges: _Charges | None
    """Charged to the execution device; None when nothing is offloaded."""


def _stage(p: _Problem, k: int) -> _Stage:
    tail = set(p.movable[len(p.movable) - k :]) if k else set()
    offloaded = [i for i in range(len(p.items)) if i in p.forced or i in tail]
    kept = tuple(i for i in range(len(p.items)) if i not in p.forced and i not in tail)
    return _Stage(
        k=k,
        kept=kept,
        homes=tuple(p.home[i] for i in kept),
        stored=_store(p, offloaded),
        charges=_charges([p.items[i] for i in offloaded]),
    )


def _store(p: _Problem, offloaded: list[int]) -> dict[int, str]:
    """Storage tier per offloaded item: pins first, then cpu while it has room, then disk."""
    free = dict(p.storage)
    stored = {i: p.forced[i] for i in offloaded if i in p.forced}
    for i, tier in stored.items():
        free[tier] -= p.items[i].weight_bytes
    for i in offloaded:
        if i in stored:
            continue
        weight = p.items[i].weight_bytes
        roomy = CPU in free and (DISK not in free or weight <= free[CPU])
        stored[i] = CPU if roomy else DISK
        free[stored[i]] -= weight
    return stored


def _storage_over(p: _Problem, stage: _Stage) -> int:
    used = {tier: 0 for tier, _ in p.storage}
    for i, tier in stage.stored.items():
        used[tier] += p.items[i].weight_bytes
    return sum(max(0, used[tier] - cap) for tier, cap in p.storage)


class _Run:
    """The load of one compute device while items are appended to its run (bytes)."""

    __slots__ = ("device", "weights", "kv", "act", "stream", "busy")

    def __init__(self, device: _Device, charges: _Charges | None = None) -> None:
        self.device = device
        self.weights = 0
        self.kv = charges.kv if charges else 0
        self.act = charges.act if charges else 0
        self.stream = charges.stream if charges else 0
        self.busy = charges is not None  # an idle device has no CUDA context: no reserve

    def load(self) -> int:
        if not self.busy:
            return 0
        return self.device.reserve + self.weights + self.kv + self.act + self.stream

    def load_with(self, item: Item) -> int:
        act = max(self.act, item.act_bytes)
        resident = self.weights + item.weight_bytes + self.kv + item.kv_bytes
        return self.device.reserve + resident + act + self.stream

    def add(self, item: Item) -> None:
        self.weights += item.weight_bytes
        self.kv += item.kv_bytes
        self.act = max(self.act, item.act_bytes)
        self.busy = True

    def ledger(self) -> DeviceLoad:
        d = self.device
        reserve = d.reserve if self.busy else 0
        return DeviceLoad(d.name, d.capacity, self.weights, self.kv, self.act, reserve, self.stream)


def _utilization(load: int, capacity: int) -> float:
    if load == 0:
        return 0.0
    return load / capacity if capacity else math.inf


def _empty_run(p: _Problem, stage: _Stage, j: int) -> _Run:
    """Compute device j before it takes items; the first one executes the offloaded items."""
    return _Run(p.compute[j], stage.charges if j == 0 else None)


# ---------------------------------------------------------------- splitting the kept items


def _fill(p: _Problem, stage: _Stage, ndev: int, limit: float) -> tuple[int, ...] | None:
    """Run ends (positions in ``stage.kept``) when each of the first ``ndev`` compute devices
    in turn takes the longest run that keeps load <= capacity and utilization <= ``limit``;
    None when the items do not all fit that way. Devices after ``ndev`` stay empty.

    Why this greedy is exact for a given limit: a run's load never drops when it grows
    (sums grow, the activation max cannot shrink). If any admissible split has ends
    b_0 <= b_1 <= ..., the greedy ends satisfy e_j >= b_j by induction: the greedy run
    [e_{j-1}, b_j) is inside [b_{j-1}, b_j), so it is admissible too and greedy reaches
    at least b_j. Pins hold because a run stops at an item pinned to another device, so
    such an item left behind blocks every later run and the fill fails.
    """
    items, kept, homes = p.items, stage.kept, stage.homes
    ends: list[int] = []
    pos = 0
    for j, device in enumerate(p.compute):
        if j < ndev:
            run = _empty_run(p, stage, j)
            if not _admits(run.load(), device, limit):
                return None
            while pos < len(kept) and homes[pos] in (None, j):
                item = items[kept[pos]]
                if not _admits(run.load_with(item), device, limit):
                    break
                run.add(item)
                pos += 1
        ends.append(pos)
    return tuple(ends) if pos == len(kept) else None


def _admits(load: int, device: _Device, limit: float) -> bool:
    return load <= device.capacity and _utilization(load, device.capacity) <= limit


def _balance(p: _Problem, stage: _Stage, ndev: int) -> tuple[int, ...]:
    """The split of the first ``ndev`` devices with the least largest utilization, exactly.

    Needs ``_fill(p, stage, ndev, 1.0)`` to succeed. Optimality: ``_fill`` succeeds for a
    limit t iff some split has every utilization <= t (see ``_fill``), which is monotone in
    t. The optimum T* is the largest utilization of some split, a float computed exactly
    as ``_fill`` computes it, so T* is the least float t for which ``_fill`` succeeds.
    Non-negative IEEE doubles are ordered like their bit patterns read as integers, so a
    binary search over those integers in [0, bits(1.0)] finds T* in at most 62 fills.
    Filling at T* gives each device, in order, the longest run any optimal split allows.
    """
    lo, hi = -1, _bits(1.0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fill(p, stage, ndev, _float(mid)) is None:
            lo = mid
        else:
            hi = mid
    ends = _fill(p, stage, ndev, _float(hi))
    assert ends is not None, "unreachable: _fill succeeds at the searched limit"
    return ends


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _least_over(p: _Problem, stage: _Stage, budget: float) -> tuple[int, ...] | None:
    """The split minimising Σ (load - capacity)+ over compute devices, then the largest
    utilization; None when every split is over by more than ``budget`` bytes.

    Dynamic programming over (device, prefix of kept items): the cost of a prefix
    combines as (sum of overages, max utilization), and a cheaper pair stays cheaper
    after any extension, so keeping the least pair per prefix is exact. Overage only
    grows as a run grows, which lets a run stop once it passes ``budget``.
    """
    items, kept, homes = p.items, stage.kept, stage.homes
    n, last = len(kept), len(p.compute) - 1
    best: dict[int, tuple[int, float, tuple[int, ...]]] = {0: (0, 0.0, ())}
    for j, device in enumerate(p.compute):
        reach: dict[int, tuple[int, float, tuple[int, ...]]] = {}
        for start in sorted(best):
            over0, util0, ends = best[start]
            run, end = _empty_run(p, stage, j), start
            while True:
                load = run.load()
                over = over0 + max(0, load - device.capacity)
                if over > budget:
                    break
                util = max(util0, _utilization(load, device.capacity))
                if (j < last or end == n) and (end not in reach or (over, util) <= reach[end][:2]):
                    reach[end] = (over, util, (*ends, end))
                if end == n or homes[end] not in (None, j):
                    break
                run.add(items[kept[end]])
                end += 1
        best = reach
    return best[n][2] if n in best else None


# ---------------------------------------------------------------- policies


def _first_fitting_stage(p: _Problem) -> _Stage | None:
    """The stage with the smallest k at which storage and compute devices all fit."""
    for k in range(len(p.movable) + 1):
        stage = _stage(p, k)
        if not _storage_over(p, stage) and _fill(p, stage, len(p.compute), 1.0) is not None:
            return stage
    return None


def _fewest_gpus(p: _Problem) -> Assignment | None:
    """MIN_GPUS: the shortest prefix of the GPUs that holds everything without offload."""
    stage = _stage(p, 0)
    if _storage_over(p, stage):
        return None
    for count in range(1, len(p.compute) + 1):
        if any(h is not None and h >= count for h in stage.homes):
            continue
        if _fill(p, stage, count, 1.0) is not None:
            return _assemble(p, stage, _balance(p, stage, count))
    return None


def _closest(p: _Problem) -> Assignment:
    """Nothing fits: the best of a few offload depths (see the module docstring)."""
    stages = [_stage(p, k) for k in range(len(p.movable) + 1)]
    ndev = len(p.compute)
    found: list[tuple[Assignment, int]] = []
    compute_fits = [s for s in stages if _fill(p, s, ndev, 1.0) is not None]
    if compute_fits:
        stage = compute_fits[0]
        found.append((_assemble(p, stage, _balance(p, stage, ndev)), stage.k))
    storable = [s.k for s in stages if not _storage_over(p, s)]
    for k in sorted({0, storable[-1] if storable else 0}, reverse=True):
        incumbent = min((a.shortfall for a, _ in found), default=math.inf)
        ends = _least_over(p, stages[k], incumbent - _storage_over(p, stages[k]))
        if ends is not None:
            found.append((_assemble(p, stages[k], ends), k))
    best, _ = min(found, key=lambda ak: (ak[0].shortfall, ak[0].max_utilization, ak[1]))
    return best


# ---------------------------------------------------------------- the result


def _assemble(p: _Problem, stage: _Stage, ends: tuple[int, ...] | None) -> Assignment:
    assert ends is not None, "unreachable: callers split only stages that can be split"
    devices: list[str] = [""] * len(p.items)
    for i, tier in stage.stored.items():
        devices[i] = tier
    start = 0
    for device, end in zip(p.compute, ends):
        for i in stage.kept[start:end]:
            devices[i] = device.name
        start = end
    return _assignment(p, tuple(devices))


def _assignment(p: _Problem, devices: tuple[str, ...]) -> Assignment:
    """The ledger of a placement given as one device name per item."""
    loads = _loads(p, devices)
    compute = loads[: len(p.compute)]
    return Assignment(
        devices=devices,
        loads=loads,
        fits=all(d.total <= d.capacity for d in loads),
        max_utilization=max((d.utilization for d in compute), default=0.0),
        shortfall=sum(max(0, d.total - d.capacity) for d in loads),
    )


def _loads(p: _Problem, devices: tuple[str, ...]) -> tuple[DeviceLoad, ...]:
    tiers = dict(p.storage)
    charges = _charges([it for it, d in zip(p.items, devices) if d in tiers])
    runs = {d.name: _Run(d, charges if j == 0 else None) for j, d in enumerate(p.compute)}
    for item, name in zip(p.items, devices):
        if name in runs:
            runs[name].add(item)
    held = {tier: 0 for tier in tiers}
    for item, name in zip(p.items, devices):
        if name in held:
            held[name] += item.weight_bytes
    stored = tuple(DeviceLoad(tier, cap, held[tier], 0, 0, 0, 0) for tier, cap in p.storage)
    return tuple(run.ledger() for run in runs.values()) + stored
