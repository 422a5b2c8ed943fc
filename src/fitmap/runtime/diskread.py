"""Disk-tier reads at the disk's rate: a unit's tensors read from the original safetensors
files with large positioned reads into host buffers reused for the whole run.

Each disk unit's tensors are grouped by file and merged into contiguous byte spans
(a layer's tensors usually sit together in a shard), and each span is read with one
``os.preadv`` straight into a buffer: no per-page faults, no mapping kept, no
allocation per read. The tensors handed to the model are views into the buffer, cast
copies where the plan's dtype differs from the checkpoint's.

Buffers come from a small pool (:class:`Buffers`), each the size of the largest disk
unit: one for the unit running, the rest for read-ahead. A buffer goes back to the
pool when its unit has run (CPU execution) or when its copy to the GPU is done (the
pool waits on the copy's CUDA event before reusing it; buffers are pinned then, so
those copies are asynchronous).
"""

from __future__ import annotations

import errno
import os
import queue
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fitmap.errors import CheckpointError
from fitmap.model.inventory import TensorInfo

# safetensors dtype tags fitmap reads as raw bytes (others go through the safetensors library)
DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_READ = 1 << 30  # bytes per preadv call (Linux caps one read near 2 GiB)


@dataclass(frozen=True)
class Piece:
    """One tensor inside a span."""

    key: str  # relative key in the unit
    start: int  # byte offset in the span
    nbytes: int
    dtype: torch.dtype  # as stored
    shape: tuple[int, ...]
    target: torch.dtype  # as the model holds it (a cast when it differs)


@dataclass(frozen=True)
class Span:
    """Contiguous bytes of one file, read with one call."""

    file: Path
    offset: int
    nbytes: int
    pieces: tuple[Piece, ...]


def readable(infos: Sequence[TensorInfo]) -> bool:
    """Whether these safetensors tensors can be read as raw bytes by this module."""
    return all(t.offset >= 0 and t.dtype in DTYPES for t in infos)


def spans(directory: Path, tensors: Mapping[str, tuple[TensorInfo, torch.dtype]]) -> tuple[Span, ...]:
    """``{relative key: (checkpoint tensor, model dtype)}`` as contiguous spans, in file order."""
    by_file: dict[str, list[tuple[str, TensorInfo, torch.dtype]]] = {}
    for key, (info, target) in tensors.items():
        by_file.setdefault(info.file, []).append((key, info, target))
    out = []
    for file, items in sorted(by_file.items()):
        items.sort(key=lambda x: x[1].offset)
        run: list[tuple[str, TensorInfo, torch.dtype]] = []
        for item in items:
            if run and item[1].offset != run[-1][1].offset + run[-1][1].nbytes:
                out.append(_span(directory / file, run))
                run = []
            run.append(item)
        out.append(_span(directory / file, run))
    return tuple(out)


def _span(path: Path, run: list[tuple[str, TensorInfo, torch.dtype]]) -> Span:
    base = run[0][1].offset
    pieces = tuple(
        Piece(key, info.offset - base, info.nbytes, DTYPES[info.dtype], tuple(info.shape), target)
        for key, info, target in run
    )
    return Span(path, base, run[-1][1].offset + run[-1][1].nbytes - base, pieces)


# --------------------------------------------------------------------------- buffers
BLOCK = 4096  # O_DIRECT: file offsets, lengths and memory addresses aligned to this


def _down(n: int) -> int:
    return n // BLOCK * BLOCK


def _up(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def region(span: Span) -> tuple[int, int]:
    """(file offset, bytes) of the block-aligned region that holds ``span``."""
    start = _down(span.offset)
    return start, _up(span.offset + span.nbytes) - start


def buffer_bytes(unit_spans: Sequence[Span]) -> int:
    """Bytes of buffer a unit's spans take, each read as its block-aligned region."""
    return sum(region(s)[1] for s in unit_spans)


class Buffer:
    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.raw = torch.empty(nbytes + BLOCK, dtype=torch.uint8, pin_memory=pinned)
        skip = -self.raw.data_ptr() % BLOCK  # the usable part starts block-aligned
        self.data = self.raw[skip : skip + nbytes]
        # writable: reads land here. numpy's stubs declare ndarray's buffer protocol only on 3.12+.
        self.view = memoryview(self.raw.numpy())[skip : skip + nbytes]  # type: ignore[arg-type]  # ndarray is a buffer
        self.copied: torch.cuda.Event | None = None  # CUDA event of the last copy out of it


class Buffers:
    """The pool. ``acquire`` blocks until a buffer is free (and its last copy out has finished)."""

    def __init__(self, nbytes: int, count: int, pinned: bool) -> None:
        self.count = count
        self.nbytes = nbytes
        self._free: queue.SimpleQueue[Buffer] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(Buffer(nbytes, pinned))

    def acquire(self) -> Buffer:
        buf = self._free.get()
        if buf.copied is not None:
            buf.copied.synchronize()  # the GPU may still be reading it
            buf.copied = None
        return buf

    def release(self, buf: Buffer, copied: torch.cuda.Event | None = None) -> None:
        buf.copied = copied
        self._free.put(buf)


@dataclass
class HostRead:
    """A unit's weights in host memory, and how to give their buffer back."""

    weights: dict[str, torch.Tensor]
    buffer: Buffer | None
    pool: Buffers | None

    def release(self, copied: torch.cuda.Event | None = None) -> None:
        """The weights may be overwritten now (``copied``: after this CUDA event)."""
        if self.buffer is not None and self.pool is not None:
            self.pool.release(self.buffer, copied)
            self.buffer = None


class UnitReader:
    """Reads one disk unit: ``reader()`` -> :class:`HostRead`."""

    def __init__(self, unit_spans: tuple[Span, ...], pool: Buffers) -> None:
        self.spans = unit_spans
        self.pool = pool

    def __call__(self) -> HostRead:
        buf = self.pool.acquire()
        try:
            weights, needs_buffer, at = {}, False, 0
            for span in self.spans:
                start, size = region(span)
                _read_region(span.file, start, span.offset + span.nbytes - start, buf.view[at : at + size])
                base = at + span.offset - start
                for p in span.pieces:
                    t = _as_tensor(buf.data[base + p.start : base + p.start + p.nbytes], p)
                    if p.target != p.dtype and t.is_floating_point():
                        t = t.to(p.target)  # a copy: the buffer is not needed for it
                    elif t.numel() and _inside(t, buf.data):
                        needs_buffer = True
                    weights[p.key] = t
                at += size
        except BaseException:
            self.pool.release(buf)
            raise
        if not needs_buffer:
            self.pool.release(buf)
            return HostRead(weights, None, None)
        return HostRead(weights, buf, self.pool)


def _inside(t: torch.Tensor, data: torch.Tensor) -> bool:
    return data.data_ptr() <= t.data_ptr() < data.data_ptr() + data.numel()


def _as_tensor(raw: torch.Tensor, p: Piece) -> torch.Tensor:
    """The bytes as the stored dtype and shape: a view, or a copy when they are not aligned for it."""
    if not p.nbytes:
        return torch.empty(p.shape, dtype=p.dtype)
    try:
        return raw.view(p.dtype).view(p.shape)
    except RuntimeError:
        return raw.clone().view(p.dtype).view(p.shape)


def read_into(path: Path, offset: int, target: memoryview) -> None:
    """Fill ``target`` with the bytes of ``path`` from ``offset``: buffered positioned reads (the page cache
    keeps what is read often, as a MoE layer's popular experts are), safe to call from several threads."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"cannot open {path}: {e.strerror}; the file is missing, re-download it") from None
    try:
        done = 0
        while done < len(target):
            n = os.preadv(fd, [target[done : done + MAX_READ]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{path} ends before byte {offset + len(target)}; re-download the file")
            done += n
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}; re-download the file") from None
    finally:
        os.close(fd)


_NO_DIRECT: set[Path] = set()  # directories where O_DIRECT was refused (tmpfs, some network file systems)


def _read_region(path: Path, start: int, needed: int, target: memoryview) -> None:
    """Read at least ``needed`` bytes of ``path`` from block-aligned ``start`` into ``target``
    (a block-aligned region of a buffer). With ``O_DIRECT`` the disk writes straight into the
    buffer: no copy through the page cache on this machine's cores, and no page cache filled
    with weights that will not fit there anyway. Falls back to buffered reads."""
    direct = getattr(os, "O_DIRECT", 0) and path.parent not in _NO_DIRECT
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError as e:
        if direct and e.errno == errno.EINVAL:
            _NO_DIRECT.add(path.parent)
            return _read_region(path, start, needed, target)
        raise CheckpointError(f"cannot open {path}: {e.strerror}; the file is missing, re-download it") from None
    try:
        done = 0
        while done < needed:
            try:
                n = os.preadv(fd, [target[done : min(len(target), done + MAX_READ)]], start + done)
            except OSError as e:
                if direct and e.errno == errno.EINVAL:
                    _NO_DIRECT.add(path.parent)
                    os.close(fd)
                    fd = os.open(path, os.O_RDONLY)
                    direct = 0
                    continue
                raise CheckpointError(f"cannot read {path}: {e.strerror}; re-download the file") from None
            if n == 0:
                raise CheckpointError(
                    f"{path} ended at byte {start + done}, inside a tensor: the file is truncated, re-download it"
                )
            done += n
    finally:
        os.close(fd)
