"""``fitmap calibrate``: measure this machine once and keep the numbers where ``plan`` finds them.

Measured, per GPU: the memory the driver holds that torch's allocator does not show
(CUDA context, cuBLAS/cuBLASLt workspaces: NVML's used memory minus torch's reserved
pool, after a bf16 and an fp32 matrix product), the caching allocator's overhead on a
decoder-like allocation pattern (reserved over allocated), and host-to-device copy
bandwidth from pinned and from pageable memory. For the machine: the disk's cold
sequential read rate (a file written, flushed, evicted from the page cache, read
back with 16 MiB ``readinto``) and RAM copy bandwidth.

Kept as JSON in fitmap's cache (``$FITMAP_CACHE``, else ``~/.cache/fitmap``). ``plan``
then takes each detected GPU's reserve from here instead of the default, and prints
what the offload tiers can deliver per token: bytes per token over the measured rate.

Like :mod:`fitmap.planning.devices`, this module talks to hardware; nothing else calls it
except the CLI and the planner's read of the saved file.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from fitmap.cache import cache_dir, writable_cache_dir, writable_dir
from fitmap.errors import BadInput
from fitmap.sizes import MiB, fmt_bytes

GB = 1e9

FILE = "calibration.json"
VERSION = 1
SAFETY = 64 * MiB  # added to a measured reserve: what one run's measurement cannot see


@dataclass(frozen=True)
class GpuCalibration:
    index: int
    name: str
    total_bytes: int
    fixed_bytes: int  # driver-held memory torch does not account for (context, workspaces)
    allocator_fraction: float  # caching allocator: reserved / allocated - 1 on a decoder-like pattern
    h2d_pinned: float  # bytes/s, pinned host memory -> this GPU
    h2d_pageable: float  # bytes/s, pageable host memory -> this GPU

    def reserve(self, capacity: int) -> int:
        """Bytes to keep free on a budget of ``capacity`` bytes of this GPU."""
        return self.fixed_bytes + int(self.allocator_fraction * capacity) + SAFETY


@dataclass(frozen=True)
class Calibration:
    host: str
    measured_at: str
    torch: str
    gpus: tuple[GpuCalibration, ...]
    disk_dir: str
    disk_read: float  # bytes/s, cold sequential read
    ram_copy: float  # bytes/s, one large tensor copy in RAM
    notes: tuple[str, ...] = ()
    cpu_matmul: float = 0.0  # FLOP/s of a bf16 matrix product on the CPU (0: not measured)
    cpu_unpack: float = 0.0  # MXFP4 values/s the CPU unpacks to bf16 (0: not measured)

    def gpu(self, index: int, name: str) -> GpuCalibration | None:
        """The calibration of GPU ``index``, if it was measured on this card model."""
        return next((g for g in self.gpus if g.index == index and g.name == name), None)

    def to_json(self) -> dict:
        return {"fitmap_calibration": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        if d.get("fitmap_calibration") != VERSION:
            raise ValueError("another version")
        gpus = tuple(GpuCalibration(**g) for g in d["gpus"])
        return cls(
            d["host"],
            d["measured_at"],
            d["torch"],
            gpus,
            d["disk_dir"],
            float(d["disk_read"]),
            float(d["ram_copy"]),
            tuple(d.get("notes", ())),
            float(d.get("cpu_matmul", 0.0)),
            float(d.get("cpu_unpack", 0.0)),
        )


def saved_path() -> Path:
    return cache_dir() / FILE


def load() -> Calibration | None:
    """This machine's saved calibration; None when there is none (or it was made on another host)."""
    try:
        cal = Calibration.from_json(json.loads(saved_path().read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return cal if cal.host == platform.node() else None


def save(cal: Calibration) -> Path:
    path = writable_cache_dir() / FILE
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(cal.to_json(), indent=2) + "\n")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BadInput(
            f"cannot save the calibration to {path}: {e.strerror or e}; set FITMAP_CACHE to a directory "
            "you can write to"
        ) from None
    return path


def disk_dir(text: str | None) -> Path:
    """``--disk`` as given, checked before anything is measured: None is fitmap's cache; otherwise a
    directory that exists or can be made, and that this process can write a test file in."""
    if text is None:
        return writable_cache_dir()
    if not text.strip():
        raise BadInput(
            "--disk is empty; give the directory on the disk to measure (e.g. --disk /nvme/offload), "
            "or leave --disk out to measure the disk of fitmap's cache"
        )
    return writable_dir(Path(text), "--disk", "give --disk a directory you can write to")


# --------------------------------------------------------------------------- measuring
def measure(directory: Path | None = None, size: int = 512 * MiB) -> Calibration:
    """Measure every visible GPU, the disk under ``directory`` (default: fitmap's cache) and RAM.
    The directory and the cache are checked first: a bad one fails before anything is measured."""
    import torch

    disk = disk_dir(None if directory is None else str(directory))
    writable_cache_dir()  # where the result is saved
    notes: list[str] = []
    gpus: list[GpuCalibration] = []
    if torch.cuda.is_available():
        nvml = _Nvml()
        if not nvml.ok:
            notes.append(
                "nvidia-ml-py (pynvml) is not installed: each GPU's fixed cost is measured with "
                "cudaMemGetInfo, which also counts other processes' memory"
            )
        for i in range(torch.cuda.device_count()):
            gpus.append(_measure_gpu(i, nvml))
    else:
        notes.append("no CUDA GPU visible to torch: GPU reserve and host-to-device bandwidth not measured")
    rate = disk_read_rate(disk, size)
    if rate > 20 * GB:
        notes.append(
            f"{disk} read at {rate / GB:.0f} GB/s after eviction: it looks memory-backed (tmpfs); "
            "calibrate the disk you offload to with --disk DIR"
        )
    return Calibration(
        platform.node(),
        datetime.now(timezone.utc).isoformat(timespec="seconds"),
        torch.__version__,
        tuple(gpus),
        str(disk),
        rate,
        ram_copy_rate(),
        tuple(notes),
        cpu_matmul_rate(),
        cpu_unpack_rate(),
    )


class _Nvml:
    """Driver-side used memory per GPU (NVML), when nvidia-ml-py is installed."""

    def __init__(self) -> None:
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            self.pynvml, self.ok = pynvml, True
        except Exception:
            self.pynvml, self.ok = None, False

    def used(self, index: int) -> int | None:
        if not self.ok:
            return None
        ids = [int(v) for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip().isdigit()]
        physical = ids[index] if index < len(ids) else index
        handle = self.pynvml.nvmlDeviceGetHandleByIndex(physical)
        return int(self.pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def _measure_gpu(index: int, nvml: _Nvml) -> GpuCalibration:
    import torch

    before = nvml.used(index)  # before this process touches the GPU: no context yet
    dev = torch.device("cuda", index)
    with torch.cuda.device(dev):
        torch.empty(1, device=dev)
        for dtype in (torch.bfloat16, torch.float32):  # cuBLAS / cuBLASLt handles and workspaces
            a = torch.randn(2048, 2048, device=dev, dtype=dtype)
            (a @ a).sum().item()
        del a
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(dev)
        after = nvml.used(index) if before is not None else None  # NVML answers both times, or neither
        if before is not None and after is not None:
            fixed = after - before - reserved
        else:
            free, total = torch.cuda.mem_get_info(dev)
            fixed = total - free - reserved
        fraction = _allocator_fraction(dev)
        pinned, pageable = h2d_rates(dev)
    props = torch.cuda.get_device_properties(dev)
    return GpuCalibration(
        index, torch.cuda.get_device_name(dev), int(props.total_memory), max(0, int(fixed)), fraction, pinned, pageable
    )


def _allocator_fraction(dev) -> float:
    """Reserved over allocated, minus 1, at the peak of a decoder-like pattern: weights of
    uneven sizes, then activations freed and re-made at other sizes (about 1.5 GiB)."""
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    sizes = [(i * 7919 % 61 + 3) * MiB + i * 4096 + 512 for i in range(24)]
    weights = [torch.empty(s, dtype=torch.uint8, device=dev) for s in sizes]
    for step in range(8):
        acts = [torch.empty((s // 3) + step * 65536, dtype=torch.uint8, device=dev) for s in sizes[step::3]]
        del acts
    allocated = torch.cuda.max_memory_allocated(dev)
    reserved = torch.cuda.max_memory_reserved(dev)
    del weights
    torch.cuda.empty_cache()
    return max(0.0, reserved / allocated - 1)


def h2d_rates(dev, nbytes: int = 256 * MiB) -> tuple[float, float]:
    """(pinned, pageable) host-to-device bytes/s, median of 5 copies after one warm-up."""
    import torch

    out = []
    for pinned in (True, False):
        host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
        target = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        times = []
        for _ in range(6):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(host, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        out.append(nbytes / statistics.median(times[1:]))
        del host, target
    torch.cuda.empty_cache()
    return out[0], out[1]


def disk_read_rate(directory: Path, size: int, repeats: int = 3) -> float:
    """Bytes/s of a cold sequential read in ``directory``: a file of ``size`` bytes written,
    flushed, evicted from the page cache, read back; the median of ``repeats`` reads."""
    writable_dir(directory, "--disk", "give --disk a directory you can write to")
    block = 16 * MiB
    fd, name = tempfile.mkstemp(prefix=".fitmap-calibrate-", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            chunk = os.urandom(block)
            for _ in range(max(1, size // block)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())  # dirty pages cannot be evicted
        rates = []
        buf = memoryview(bytearray(block))
        total = path.stat().st_size
        for _ in range(repeats):
            _evict(path)
            start = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
            rates.append(total / (time.perf_counter() - start))
        return statistics.median(rates)
    except OSError as e:
        raise BadInput(
            f"cannot measure the disk under {directory}: {e.strerror or e}; give --disk another directory"
        ) from None
    finally:
        path.unlink(missing_ok=True)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def ram_copy_rate(nbytes: int = 256 * MiB) -> float:
    """Bytes/s of copying one large tensor in RAM (median of 5): what a CPU-executed decode
    step can stream its weights at, at best."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:])


def cpu_matmul_rate(n: int = 1024, dtype: str = "bfloat16") -> float:
    """FLOP/s of an ``n`` x ``n`` matrix product on the CPU at torch's thread count (median of 5): what
    routed experts computed there do per second when a prefill's many tokens make it compute-bound."""
    import torch

    a = torch.randn(n, n).to(getattr(torch, dtype))
    b = torch.randn(n, n).to(getattr(torch, dtype))
    times = []
    for _ in range(6):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[1:])


def cpu_unpack_rate(rows: int = 2048, columns: int = 2048) -> float:
    """MXFP4 values/s unpacked to bf16 on the CPU at torch's thread count (median of 5): the work, beside
    the RAM reads, of gpt-oss's routed experts computed packed on the CPU (one expert's matrix here)."""
    import torch

    from fitmap.model import mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (1, rows, columns // mxfp4.BLOCK, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 130, (1, rows, columns // mxfp4.BLOCK), dtype=torch.uint8, generator=g)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        mxfp4.unpack(blocks, scales, torch.bfloat16)
        times.append(time.perf_counter() - start)
    return rows * columns / statistics.median(times[1:])


# --------------------------------------------------------------------------- what a plan can expect
@dataclass(frozen=True)
class TierSpeed:
    tier: str  # "cpu" | "disk" | "cpu-compute" | "disk-compute"
    bytes_per_token: int  # weights streamed per decode step from this tier
    rate: float  # bytes/s it streams at (pinned copies, disk reads)
    via: str  # what the rate is

    @property
    def seconds(self) -> float:
        return self.bytes_per_token / self.rate


def offload_speeds(plan, cal: Calibration) -> list[TierSpeed]:
    """Per offload tier of ``plan``: bytes per decode step and the measured rate that bounds it."""
    ledgers = {d.device: d for d in plan.devices}
    execution = plan.execution_device
    out = []
    cpu = ledgers.get("cpu")
    streamed = (cpu.weights_bytes - plan.cpu_compute_bytes) if cpu is not None else 0
    if plan.cpu_token_bytes:  # MoE experts computed where they live: the routed ones read from RAM
        out.append(TierSpeed("cpu-compute", plan.cpu_token_bytes, cal.ram_copy, "RAM reads of the routed experts"))
    if plan.cpu_unpack_values and cal.cpu_unpack:  # MXFP4 ones unpacked per token (values / values a second)
        out.append(TierSpeed("cpu-compute", plan.cpu_unpack_values, cal.cpu_unpack, "MXFP4 unpacking of them"))
    if cpu is not None and streamed > 0:
        if execution.isdigit():
            g = next((g for g in cal.gpus if g.index == int(execution)), None)
            if g is not None:
                out.append(TierSpeed("cpu", streamed, g.h2d_pinned, f"pinned copies to cuda:{execution}"))
        else:
            out.append(TierSpeed("cpu", streamed, cal.ram_copy, "RAM bandwidth"))
    disk = ledgers.get("disk")
    if plan.disk_token_bytes:  # MoE experts left on disk: a token reads its routed ones
        out.append(TierSpeed("disk-compute", plan.disk_token_bytes, cal.disk_read, "disk reads of the routed experts"))
    if disk is not None and disk.weights_bytes > plan.disk_compute_bytes:
        streamed_disk = disk.weights_bytes - plan.disk_compute_bytes
        out.append(TierSpeed("disk", streamed_disk, cal.disk_read, f"cold reads of {cal.disk_dir}"))
    return out


def expected_tokens_per_second(speeds: list[TierSpeed]) -> float | None:
    """Decode tok/s the offload tiers allow at most: the disk reads and the copies overlap,
    so the slower stream bounds the step (compute and GPU-resident layers not counted)."""
    if not speeds:
        return None
    return 1.0 / max(s.seconds for s in speeds)


# --------------------------------------------------------------------------- the link to other hosts
LINK_FILE = "link.json"


@dataclass(frozen=True)
class Link:
    """The network between this host and the others of a run, as ``fitmap calibrate --peer`` measured
    it under torchrun over torch.distributed (the transport fitmap's stages use): the slowest peer's."""

    host: str
    peers: tuple[str, ...]
    measured_at: str
    bytes_per_s: float  # one way, large messages
    latency_s: float  # one way, a small message

    def describe(self) -> str:
        return (
            f"link {self.host} <-> {', '.join(self.peers)}: {self.bytes_per_s * 8 / 1e9:.2f} Gb/s, "
            f"{self.latency_s * 1e6:.0f} us per message (measured {self.measured_at})"
        )


def save_link(link: Link) -> Path:
    path = writable_cache_dir() / LINK_FILE
    try:
        path.write_text(json.dumps({"fitmap_link": VERSION, **asdict(link)}, indent=2) + "\n")
    except OSError as e:
        raise BadInput(
            f"cannot save the link to {path}: {e.strerror or e}; set FITMAP_CACHE to a directory you can write to"
        ) from None
    return path


def load_link() -> Link | None:
    """The link this host measured last (None: never, or the file is from another host)."""
    try:
        d = json.loads((cache_dir() / LINK_FILE).read_text())
        link = Link(d["host"], tuple(d["peers"]), d["measured_at"], float(d["bytes_per_s"]), float(d["latency_s"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return link if link.host == platform.node() and link.bytes_per_s > 0 else None


def measure_link(size: int = 64 * MiB, repeats: int = 5) -> Link | None:
    """Every rank of a torchrun job calls this; rank 0 measures the link to each other rank (a small
    message's round trip, and a ``size`` message out with a small answer back) and returns the
    slowest peer's numbers; the other ranks answer and return None."""
    import socket

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    names: list = [None] * world
    dist.all_gather_object(names, socket.gethostname())
    small, big = torch.zeros(1), torch.zeros(size // 4)
    worst: tuple[float, float] | None = None
    for peer in range(1, world):
        if rank not in (0, peer):
            continue
        other = peer if rank == 0 else 0
        trips = _exchanges(rank == 0, other, small, small, repeats * 4)
        sends = _exchanges(rank == 0, other, big, small, repeats)
        if rank == 0:
            latency = statistics.median(trips) / 2
            rate = size / max(statistics.median(sends) - 2 * latency, 1e-9)
            if worst is None or rate < worst[0]:
                worst = (rate, latency)
    dist.barrier()
    if rank != 0 or worst is None:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return Link(platform.node(), tuple(str(n) for n in names[1:]), stamp, worst[0], worst[1])


def _exchanges(first: bool, other: int, out, back, times: int) -> list[float]:
    """Seconds of each of ``times`` exchanges with rank ``other``: the ``first`` side sends ``out`` and
    waits for ``back``; the other side receives ``out`` and answers ``back``."""
    import torch.distributed as dist

    took = []
    for _ in range(times):
        t = time.perf_counter()
        if first:
            dist.send(out, other)
            dist.recv(back, other)
        else:
            dist.recv(out, other)
            dist.send(back, other)
        took.append(time.perf_counter() - t)
    return took


def describe(cal: Calibration) -> list[str]:
    """Lines for people."""
    lines = [f"calibration of {cal.host}, {cal.measured_at} (torch {cal.torch})"]
    for g in cal.gpus:
        lines.append(
            f"cuda:{g.index} {g.name}: {fmt_bytes(g.total_bytes)}; fixed cost {fmt_bytes(g.fixed_bytes)} "
            f"(context + workspaces), allocator overhead {g.allocator_fraction:.1%}; reserve on the whole "
            f"card {fmt_bytes(g.reserve(g.total_bytes))}; host->device {g.h2d_pinned / GB:.1f} GB/s pinned, "
            f"{g.h2d_pageable / GB:.1f} GB/s pageable"
        )
    if not cal.gpus:
        lines.append("no GPU: nothing to measure there (plans for detected GPUs keep the default reserve)")
    lines.append(f"disk ({cal.disk_dir}): {cal.disk_read / GB:.2f} GB/s cold sequential read")
    lines.append(f"RAM: {cal.ram_copy / GB:.1f} GB/s copy")
    if cal.cpu_matmul:
        lines.append(f"CPU: {cal.cpu_matmul / 1e9:.0f} GFLOP/s bf16 matrix product")
    if cal.cpu_unpack:
        lines.append(f"CPU: {cal.cpu_unpack / 1e9:.2f} G values/s MXFP4 unpacked to bf16 (gpt-oss's experts)")
    lines += [f"note: {n}" for n in cal.notes]
    return lines
