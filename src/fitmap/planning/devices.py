"""The device layer: what the user's machine (or an imagined one) offers.

This is the only module that asks torch.cuda / NVML / the OS about hardware; the
rest of fitmap works on :class:`Machine` values, so planning runs anywhere and is
tested without GPUs.

Device strings are parsed here, once:

* ``--gpus 0,1``            detected GPUs by index (CUDA_VISIBLE_DEVICES applies)
* ``--gpus 0:10GiB,1:10GiB`` detected GPUs, each capped at a budget
* ``--gpus 4x24GiB``        hypothetical GPUs (planning on a laptop)
* ``--gpus 2x24GiB,1x80GiB`` mixed hypothetical sizes
* ``--cpu 64GiB``           RAM for offloaded weights (default: available RAM)
* ``--disk DIR``            a disk tier (free space of DIR)
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from fitmap.cache import shorten
from fitmap.errors import BadInput
from fitmap.sizes import MiB, fmt_bytes, parse_size

# Per-GPU reserve for what torch allocations do not show: the CUDA context
# (300-500 MiB on recent drivers with lazy module loading), the cuBLAS/cuBLASLt
# workspaces, and the caching allocator's rounding and fragmentation (a few % of
# what is allocated). llama.cpp keeps 1 GiB free per device for the same reasons.
MAX_GPUS = 1024  # hypothetical GPUs in one plan, at most (the solver is linear in them)
RESERVE_FIXED = 512 * MiB
RESERVE_FRACTION = 0.02


def default_reserve(capacity: int) -> int:
    """Bytes kept free on a GPU of ``capacity`` bytes: 512 MiB + 2% of the card."""
    return RESERVE_FIXED + int(RESERVE_FRACTION * capacity)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU the plan may use. ``index`` is the torch index (after CUDA_VISIBLE_DEVICES)."""

    index: int
    capacity: int  # bytes the plan may use (card total, or the user's cap)
    reserve: int  # bytes kept free for context/workspace/fragmentation
    name: str = ""  # e.g. "NVIDIA A100-SXM4-40GB", or "hypothetical"
    detected: bool = False
    reserve_source: str = "default"  # "default" (512 MiB + 2%) | "calibrated" | "--reserve"


@dataclass(frozen=True)
class Machine:
    gpus: tuple[GpuSpec, ...]
    cpu: int  # bytes of RAM the plan may use for weights
    disk: Path | None  # offload directory, if any
    disk_bytes: int | None  # free bytes there
    hosts: tuple[tuple[str, int], ...] = ()  # several machines: (name, its GPU count), GPUs numbered across them

    def host_of(self, gpu: int) -> str:
        """The host GPU ``gpu`` (numbered across hosts, in their order) is on; "" on one machine."""
        for name, count in self.hosts:
            if gpu < count:
                return name
            gpu -= count
        return ""

    def describe(self) -> str:
        sizes = [fmt_bytes(g.capacity) for g in self.gpus]
        parts = [f"{n} x {size} GPU{'s' if n > 1 else ''}" for size, n in Counter(sizes).items()]
        if self.hosts:
            parts.insert(0, f"{len(self.hosts)} hosts ({', '.join(f'{h}: {n} GPUs' for h, n in self.hosts)})")
        parts.append(f"CPU: {fmt_bytes(self.cpu)}")
        if self.disk is not None:
            parts.append(f"disk {self.disk}: {fmt_bytes(self.disk_bytes or 0)} free")
        return ", ".join(parts)


# --------------------------------------------------------------------------- detection
def detected_gpus() -> list[tuple[str, int]]:
    """(name, total bytes) of each visible CUDA GPU, in torch index order."""
    try:
        import torch

        if torch.cuda.is_available():
            return [
                (torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
                for i in range(torch.cuda.device_count())
            ]
    except Exception:  # a broken CUDA install still lets the user plan hypothetically
        pass
    return _nvml_gpus()


def _nvml_gpus() -> list[tuple[str, int]]:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            found.append((str(pynvml.nvmlDeviceGetName(h)), int(pynvml.nvmlDeviceGetMemoryInfo(h).total)))
    except Exception:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [int(v) for v in visible.split(",") if v.strip().isdigit()]
        found = [found[i] for i in ids if i < len(found)]
    return found


def available_ram() -> int:
    """Bytes of RAM available now (MemAvailable), falling back to total physical RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --------------------------------------------------------------------------- parsing
_HYPO = re.compile(r"^(\d+)\s*[xX]\s*(.+)$")


def parse_gpus(text: str | None, reserve: int | None = None) -> tuple[GpuSpec, ...]:
    """Parse ``--gpus``. ``reserve`` overrides the default per-GPU reserve (bytes)."""
    if text is not None and not isinstance(text, str):
        raise BadInput(
            f"gpus must be a string such as '0,1', '0:10GiB,1:10GiB' or '4x24GiB', not {shorten(repr(text))} "
            f"({type(text).__name__})"
        )
    if text is None or text.strip() in ("", "none"):
        return ()
    specs: list[GpuSpec] = []
    hardware: list[tuple[str, int]] | None = None
    parts = [p.strip() for p in text.split(",")]
    if "" in parts:
        raise BadInput(f"--gpus {shorten(text)!r} has an empty entry; write e.g. 0,1 or 4x24GiB")
    for part in parts:
        m = _HYPO.match(part)
        if m:
            count, size = int(m.group(1)), parse_size(m.group(2))
            if count < 1 or len(specs) + count > MAX_GPUS:
                raise BadInput(f"--gpus {shorten(part)!r}: the count must be between 1 and {MAX_GPUS} GPUs in all")
            for _ in range(count):
                specs.append(
                    GpuSpec(
                        len(specs),
                        size,
                        _reserve(size, reserve),
                        "hypothetical",
                        reserve_source="--reserve" if reserve is not None else "default",
                    )
                )
            continue
        index_text, _, cap_text = part.partition(":")
        if not index_text.strip().isdigit():
            raise BadInput(
                f"cannot read GPU {shorten(part)!r} in --gpus {shorten(text)!r}: write indices (0,1), "
                "budgets (0:10GiB,1:10GiB) or hypothetical GPUs (4x24GiB)"
            )
        index = int(index_text)
        cap_bytes = _cap(part, cap_text) if cap_text else None
        hardware = detected_gpus() if hardware is None else hardware
        if index >= len(hardware):
            raise BadInput(_missing_gpu_message(index, hardware, cap_text))
        name, total = hardware[index]
        cap = min(cap_bytes, total) if cap_bytes is not None else total
        specs.append(_detected_spec(index, name, cap, reserve))
    _reject_duplicates(specs, text)
    for g in specs:
        if reserve is not None and g.reserve >= g.capacity:
            raise BadInput(
                f"--reserve {fmt_bytes(g.reserve)} leaves nothing of GPU {g.index}'s {fmt_bytes(g.capacity)}; "
                "the reserve is per GPU (CUDA context, workspaces): give a smaller --reserve, e.g. 1GiB"
            )
    return tuple(specs)


def _cap(part: str, cap_text: str) -> int:
    """The budget of ``--gpus N:SIZE``, with the entry named when it is not a size."""
    try:
        return parse_size(cap_text)
    except BadInput:
        raise BadInput(
            f"--gpus {shorten(part)!r}: {shorten(cap_text)!r} is not a size; write a budget like "
            f"{shorten(part.split(':')[0])}:10GiB"
        ) from None


def _reserve(capacity: int, override: int | None) -> int:
    return default_reserve(capacity) if override is None else override


def _detected_spec(index: int, name: str, capacity: int, override: int | None) -> GpuSpec:
    """A detected GPU; its reserve from ``--reserve``, else this machine's calibration, else the default."""
    if override is not None:
        return GpuSpec(index, capacity, override, name, True, "--reserve")
    from fitmap.planning import calibrate

    cal = calibrate.load()
    measured = cal.gpu(index, name) if cal is not None else None
    if measured is not None:
        return GpuSpec(index, capacity, measured.reserve(capacity), name, True, "calibrated")
    return GpuSpec(index, capacity, default_reserve(capacity), name, True)


def _missing_gpu_message(index: int, hardware: list[tuple[str, int]], cap_text: str) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"{len(hardware)} GPU(s) visible" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
    example = f"1x{cap_text}" if cap_text else "1x24GiB"
    if not hardware:
        return (
            f"GPU {index} does not exist: this machine has no GPU visible"
            + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
            + f". Plan for hypothetical GPUs with --gpus {example}"
        )
    return (
        f"GPU {index} does not exist: this machine has {seen}. Use an index below "
        f"{len(hardware)}, or plan for hypothetical GPUs with --gpus {example}"
    )


def _reject_duplicates(specs: list[GpuSpec], text: str) -> None:
    detected = [g.index for g in specs if g.detected]
    if len(set(detected)) != len(detected):
        raise BadInput(f"--gpus {shorten(text)!r} names a GPU twice")
    if detected and len(detected) != len(specs):
        raise BadInput(f"--gpus {shorten(text)!r} mixes detected GPUs and hypothetical ones; use one kind")


def make_machine(
    gpus: str | None = None,
    cpu: str | int | None = None,
    disk: str | Path | None = None,
    reserve: str | int | None = None,
) -> Machine:
    """Build a :class:`Machine` from CLI-style values (strings parsed here)."""
    reserve_bytes = _size_or_bytes("reserve", reserve, allow_zero=True)
    gpu_specs = parse_gpus(gpus, reserve_bytes)
    cpu_bytes = _size_or_bytes("cpu", cpu)
    cpu_bytes = available_ram() if cpu_bytes is None else cpu_bytes
    disk_path, disk_bytes = _disk(disk)
    return Machine(gpu_specs, cpu_bytes, disk_path, disk_bytes)


_HOSTS_ALIKE = re.compile(r"^\s*(\d+)\s*x\s*\((.+)\)\s*$")


def parse_hosts(text: str, reserve: int | None = None) -> tuple[tuple[str, tuple[GpuSpec, ...]], ...]:
    """``--hosts``: ``2x(8x80GiB)`` (alike hosts, named host0, host1, ...) or ``a:4x24GiB,b:2x48GiB``
    (named, in pipeline order). Each host's GPUs are hypothetical, as ``--gpus 4x24GiB``."""
    if not isinstance(text, str) or not text.strip():
        raise BadInput("--hosts needs hosts such as 2x(8x80GiB) or a:4x24GiB,b:2x48GiB")
    alike = _HOSTS_ALIKE.match(text)
    if alike:
        count = int(alike.group(1))
        if count < 1:
            raise BadInput(f"--hosts {text!r}: at least one host")
        parts = [(f"host{i}", alike.group(2).strip()) for i in range(count)]
    else:
        parts = []
        for part in text.split(","):
            name, sep, gpus = part.partition(":")
            if not sep or not name.strip() or not _HYPO.match(gpus.strip()):
                raise BadInput(
                    f"cannot read host {part.strip()!r} in --hosts {text!r}: write NAME:COUNTxSIZE per host "
                    "(a:4x24GiB,b:2x48GiB) or COUNTx(COUNTxSIZE) for alike hosts (2x(8x80GiB))"
                )
            parts.append((name.strip(), gpus.strip()))
    names = [n for n, _ in parts]
    if len(set(names)) != len(names):
        raise BadInput(f"--hosts {text!r} names a host twice; give each host its own name")
    if len(parts) < 2:
        raise BadInput(f"--hosts {text!r} is one machine: use --gpus for it")
    out = []
    for name, gpus in parts:
        if not _HYPO.match(gpus):
            raise BadInput(f"--hosts: host {name}'s GPUs {gpus!r} must read COUNTxSIZE, e.g. 8x80GiB")
        out.append((name, parse_gpus(gpus, reserve)))
    return tuple(out)


def make_hosts(
    hosts: str, cpu: str | int | None = None, disk: str | Path | None = None, reserve: str | int | None = None
) -> Machine:
    """A :class:`Machine` of several hosts: their GPUs numbered across them in pipeline order."""
    reserve_bytes = _size_or_bytes("reserve", reserve, allow_zero=True)
    specs: list[GpuSpec] = []
    counts = []
    for name, gpus in parse_hosts(hosts, reserve_bytes):
        specs += [replace(g, index=len(specs) + i) for i, g in enumerate(gpus)]
        counts.append((name, len(gpus)))
    if len(specs) > MAX_GPUS:
        raise BadInput(f"--hosts {hosts!r}: {len(specs)} GPUs in all; at most {MAX_GPUS}")
    machine = make_machine(None, cpu, disk, reserve)
    return replace(machine, gpus=tuple(specs), hosts=tuple(counts))


def _size_or_bytes(name: str, value: str | int | None, allow_zero: bool = False) -> int | None:
    """A size as text ("24GiB") or a whole number of bytes; --name in what a bad one says."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_size(value, allow_zero=allow_zero)
        except BadInput as e:
            raise BadInput(f"--{name}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise BadInput(
            f"{name} must be a size such as '24GiB' or a {'' if allow_zero else 'positive '}whole "
            f"number of bytes, not {value!r} ({type(value).__name__})"
        )
    return value


def _disk(disk: str | Path | None) -> tuple[Path | None, int | None]:
    if disk is None:
        return None, None
    if not isinstance(disk, (str, os.PathLike)):
        raise BadInput(f"disk must be a directory path, not {disk!r} ({type(disk).__name__})")
    path = Path(disk)
    probe = path if path.exists() else path.parent
    if not probe.exists():
        raise BadInput(f"--disk {disk}: neither the directory nor its parent exists; create it first")
    if not path.exists():
        return path, shutil.disk_usage(probe).free
    if not path.is_dir():
        raise BadInput(f"--disk {disk} is a file, not a directory")
    if not os.access(path, os.W_OK):
        raise BadInput(f"--disk {disk} is not writable; choose a directory you can write to")
    return path, shutil.disk_usage(path).free


# --------------------------------------------------------------------------- runtime measurements
def enforce_budget(index: int, budget: int) -> None:
    """Cap what torch may allocate on GPU ``index`` at ``budget`` bytes, so a run that
    needs more than its plan fails there instead of silently using the reserve."""
    import torch

    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), index)
    torch.cuda.reset_peak_memory_stats(index)


def gpu_peak(index: int) -> int:
    """Bytes torch allocated at most on GPU ``index`` since the budget was set."""
    import torch

    return int(torch.cuda.max_memory_allocated(index))


def pinned_host_peak() -> int:
    """Peak bytes of pinned host memory torch's CUDA host allocator held (cpu-tier weights and
    staging buffers on a GPU machine: allocated by CUDA, not ``malloc``); 0 without CUDA."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    try:
        stats = torch.cuda.host_memory_stats()
    except (RuntimeError, AttributeError):
        return 0
    return int(stats.get("allocated_bytes.peak", stats.get("allocated_bytes.all.peak", 0)))


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


class RssSampler:
    """Peak private (anonymous) and file-backed resident memory while the block runs, and the
    peak of the bytes live in the C allocator (``malloc``, where glibc reports it).

    Peak RSS alone mixes the two: pages of mmap'd checkpoints that were read (page
    cache, reclaimable) count as file-backed; weights copied or cast, activations
    and KV are anonymous. Anonymous RSS also keeps what the allocator holds after a
    free (glibc serves later blocks from it), so the live bytes are what compares with
    a plan's tensors; both are kept. Sampled every ``interval`` seconds on a thread.

    glibc counts the live bytes by walking its free lists with the allocator's lock held:
    cheap on a young heap (under a microsecond), but 20 ms on one fragmented into 100,000
    free blocks. So the census takes at most ``LIVE_DUTY`` of the time (the wait after one
    grows with what it cost), and a census slower than ``LIVE_GIVE_UP`` ends the live
    count for the run (``live_peak`` None: the report falls back to resident memory).
    """

    LIVE_DUTY = 0.02
    LIVE_GIVE_UP = 0.05

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.interval = self._wait = interval
        self.live_given_up = False
        self.anon_peak = self.file_peak = 0
        self.anon_start = self.file_start = 0
        self.live_start: int | None = None  # read when the block starts (__enter__)
        self.live_peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self.anon_start, self.file_start = rss_parts()
        self.live_start = self.live_peak = heap_live()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self._wait):
            self._sample()

    def _sample(self) -> None:
        import time

        anon, file = rss_parts()
        self.anon_peak = max(self.anon_peak, anon)
        self.file_peak = max(self.file_peak, file)
        if self.live_peak is None:
            return
        t = time.thread_time()  # the census's own time: not the wait for the GIL after it
        live = heap_live() or 0
        spent = time.thread_time() - t
        if spent > self.LIVE_GIVE_UP:
            self.live_peak, self.live_given_up = None, True
            return
        self.live_peak = max(self.live_peak, live)
        self._wait = max(self.interval, spent / self.LIVE_DUTY)


def mapped_bytes(directory: Path) -> int | None:
    """Resident bytes of this process's mappings of files under ``directory`` (the checkpoint's
    mmap'd pages), from /proc/self/smaps; None where that file does not exist. RssFile alone
    also counts the code pages of libraries first used after the load."""
    prefix = str(Path(directory).resolve()) + "/"
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 6)
                if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's first line
                    inside = len(head) == 6 and head[5].rstrip("\n").startswith(prefix)
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return None
    return total


_MALLINFO: list = []


def heap_live() -> int | None:
    """Bytes the C allocator has handed out and not had back (glibc ``mallinfo2``: in use in
    its arenas + its mmap'd blocks; CPU tensors are allocated there). None elsewhere."""
    if not _MALLINFO:
        import ctypes
        import ctypes.util

        class MallInfo2(ctypes.Structure):
            _fields_ = [
                (n, ctypes.c_size_t)
                for n in (
                    "arena",
                    "ordblks",
                    "smblks",
                    "hblks",
                    "hblkhd",
                    "usmblks",
                    "fsmblks",
                    "uordblks",
                    "fordblks",
                    "keepcost",
                )
            ]

        try:
            fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
            fn.restype, fn.argtypes = MallInfo2, []
        except (OSError, AttributeError):  # not glibc, or glibc before 2.33
            fn = None
        _MALLINFO.append(fn)
    fn = _MALLINFO[0]
    if fn is None:
        return None
    info = fn()
    return info.uordblks + info.hblkhd


def rss_parts() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of this process."""
    anon = file = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file
