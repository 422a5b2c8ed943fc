"""How many CPU threads torch computes with, chosen from the work a token gives the CPU.

torch starts one intra-op thread per core, and its OpenMP threads spin while they wait
(libgomp spins for a while at every barrier and between parallel regions when a team has
no more threads than there are cores). A decode step of a small model is hundreds of
small parallel regions; when other processes hold the cores, a teammate is descheduled at
nearly every barrier and the spinning threads take CPU time from the one doing the work:
decode of the demo model fell from about 110 to 25 tokens/s on a 2-core machine with a
busy loop per core, where one thread kept about 75 (docs/benchmarks.md, "CPU threads under
load"). Threads pay only when each one has enough weights to stream per token, so:

* ``--threads N`` (``fix``) or the user's own ``OMP_NUM_THREADS``: as given;
* the model computes on GPUs (offloaded units run there too): one thread, the CPU only
  launches kernels and prepares inputs (what ``transformers serve`` does on an accelerator);
* on the CPU: one thread per ``BYTES_PER_THREAD`` of weights the CPU reads per token, at
  least one, at most this process's cores shared among the copies (replicas) that run at once.

torch's thread count is per OS thread once that thread has run an op, so the count is set
before the threads that generate start (``fitmap serve``: before its replicas load).

On the CPU the count is a starting point: between decode steps, :class:`Tuner` samples how many
cores other processes keep busy (``/proc/stat`` less this process's own time) and uses up to
``Threads.most`` threads while the cores are free, one when they are taken. A quiet machine
gets all its cores (a batch of rows computes enough per weight for more threads to pay); a busy
one never has threads spinning at barriers for a core they cannot get.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fitmap.planning.plan import Plan
from fitmap.sizes import fmt_bytes

BYTES_PER_THREAD = 256 << 20  # weights one thread streams per token before a second one pays for its barriers


@dataclass(frozen=True)
class Threads:
    count: int
    why: str
    most: int = 0  # on the CPU: up to this many while other processes leave the cores free (0: fixed)


_fixed: Threads | None = None  # set by fix(): --threads, or fitmap serve's choice for all its replicas


def cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_work(plan: Plan) -> int:
    """Bytes of weights the CPU computes with per token: those on ``cpu``/``disk`` when offloaded
    units run on the CPU (with a GPU execution device they are copied there and run on it), and the
    routed experts a token uses of those computed where they live (MXFP4 ones count the bf16 bytes they
    unpack to: unpacking is work per value)."""
    if plan.execution_device != "cpu":
        return plan.cpu_token_bytes + plan.disk_token_bytes + 2 * plan.cpu_unpack_values
    return sum(d.weights_bytes for d in plan.devices if d.device in ("cpu", "disk"))


def choose(
    plans: Sequence[Plan],
    requested: int | None = None,
    available: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Threads:
    """The intra-op threads for ``plans`` (the copies that decode at once, e.g. serve's replicas)."""
    env = os.environ if env is None else env
    if requested is not None:
        return Threads(requested, "--threads")
    if env.get("OMP_NUM_THREADS"):
        return Threads(torch.get_num_threads(), "OMP_NUM_THREADS")
    copies = max(1, len(plans))
    share = max(1, (available or cores()) // copies)
    work = max((cpu_work(p) for p in plans), default=0)
    if work == 0:
        return Threads(1, "the model computes on GPU(s); the CPU only launches its kernels")
    count = max(1, min(share, work // BYTES_PER_THREAD))
    each = f" per copy, {copies} copies" if copies > 1 else ""
    up = f"; up to {share} while other processes leave the cores free" if share > count else ""
    return Threads(count, f"{fmt_bytes(work)} of weights computed on the CPU per token{each}{up}", most=share)


def fix(threads: Threads | None) -> None:
    """Use ``threads`` from now on (``None``: choose per plan again); sets it for this OS thread."""
    global _fixed
    _fixed = threads
    if threads is not None and threads.why != "OMP_NUM_THREADS":
        _set(threads.count)


def apply(plan: Plan) -> Threads:
    """Set torch's threads for running ``plan`` in this OS thread (and for threads started after)."""
    threads = _fixed or choose((plan,))
    if threads.why != "OMP_NUM_THREADS":
        _set(threads.count)
    return threads


def current() -> Threads | None:
    """The count ``fix`` set for every thread that runs (``fitmap serve``'s replicas), if any."""
    return _fixed


class Tuner:
    """Called between decode steps in the thread that computes. Every ``every`` seconds it samples
    the cores other processes keep busy; it then uses the free cores (shared among ``copies``
    copies computing at once), never fewer than the count chosen from the model's work
    (``threads.count``) nor more than ``threads.most``; a fixed count is left alone. Extra
    threads on taken cores do not pay even for a batch of 32 rows of a small model: measured,
    2 threads under a busy loop per core decoded 175-334 tok/s where 1 thread kept 805-910.
    Linux only (``/proc``); elsewhere the count stays."""

    def __init__(self, threads: Threads | None, copies: int = 1, every: float = 0.2) -> None:
        self.most = threads.most if threads is not None else 0
        self.start = threads.count if threads is not None else 1
        self.copies, self.every = max(1, copies), every
        self.last: tuple[float, int, int, int] | None = None  # (time, all jiffies, busy jiffies, own jiffies)
        self.free: float | None = None  # cores the others left free over the last interval (None: not measured)

    def __call__(self) -> None:
        if self.most <= 1:
            return
        now = time.monotonic()
        if self.last is None or now - self.last[0] >= self.every:
            self._sample(now)
        if self.free is None:
            return
        want = max(1, self.start, min(self.most, int(self.free / self.copies + 0.5)))
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def _sample(self, now: float) -> None:
        sample = _jiffies()
        if sample is None:
            self.most = 0
            return
        total, busy, own, cpus = sample
        if self.last is not None and now - self.last[0] > 5 * self.every:
            # idle since: what the cores did then says nothing of now; the chosen count until measured
            self.last, self.free = None, None
            if torch.get_num_threads() != self.start:
                torch.set_num_threads(self.start)
        if self.last is not None and total > self.last[1]:
            _, total0, busy0, own0 = self.last
            others = max(0.0, (busy - busy0 - (own - own0)) / (total - total0) * cpus)
            self.free = min(cores(), cpus - others)
        self.last = (now, total, busy, own)


def _jiffies() -> tuple[int, int, int, int] | None:
    """(all CPU time, busy CPU time, this process's CPU time) in clock ticks, and the CPUs counted."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    fields = [int(x) for x in lines[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return sum(fields[:8]), sum(fields[:8]) - idle, int(mine[11]) + int(mine[12]), max(1, cpus)


def _set(count: int) -> None:
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    try:  # allowed once, before any inter-op work; decode never uses the inter-op pool anyway
        torch.set_num_interop_threads(count)
    except RuntimeError:
        pass
