"""Mixture-of-experts layers whose routed experts are computed where they live, in CPU RAM.

A MoE decoder block holds attention, a router, maybe shared experts, and its routed experts,
of which each token uses ``num_experts_per_tok`` of ``num_experts``. When the model does not fit
the GPUs, streaming a block to the GPU copies *every* expert over PCIe for every token; computing
the routed experts on the CPU reads only the ones the token picked, from RAM (what llama.cpp's
``--cpu-moe`` / ``-ot exps=CPU`` and KTransformers do). The rest of the block stays on its GPU.

:func:`choose` weighs the two per decode step: the bytes of the experts a token uses over the RAM
bandwidth, against the bytes streamed over PCIe (and read from disk), with ``fitmap calibrate``'s
measured rates or stated defaults, and moves the experts of as few layers as make the rest fit
the GPUs without streaming. In the plan's ``device_map`` such an experts module says
``"cpu-compute"``: its weights stay in RAM and it runs on the CPU; its inputs go there and its
output comes back to its block's GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fitmap.model import configs, mxfp4
from fitmap.model.skeleton import Skeleton, Unit
from fitmap.planning.solver import Assignment, Item
from fitmap.sizes import fmt_bytes

CPU_COMPUTE = "cpu-compute"  # device_map value: weights in RAM, computed on the CPU
DISK_COMPUTE = "disk-compute"  # device_map value: weights on disk, the routed ones read and computed on the CPU

# Rates without `fitmap calibrate` (bytes/s): one PCIe 4.0 x16 link's pinned copies, and a desktop's
# RAM copy rate. Said as defaults in the plan's note.
DEFAULT_PCIE = 25e9
DEFAULT_RAM = 20e9
DEFAULT_DISK = 2e9
DEFAULT_CPU_FLOPS = 1e12  # bf16 matrix products of a 16-32 core AVX-512 server CPU
DEFAULT_UNPACK = 3e9  # MXFP4 values/s such a CPU unpacks to bf16 (about 0.3 G/s a core measured, 16 cores)

_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "moe_topk", "top_k", "experts_per_token")


def used_fraction(config) -> float:
    """The share of a layer's routed experts one token uses (``num_experts_per_tok / num_experts``)."""
    tc = configs.text_config(config)
    total = next((v for k in _EXPERT_COUNTS if isinstance(v := getattr(tc, k, None), int) and v > 0), None)
    top = next((v for k in _TOP_K if isinstance(v := getattr(tc, k, None), int) and v > 0), None)
    return min(1.0, top / total) if total and top else 1.0


def moe_blocks(sk: Skeleton) -> list[Unit]:
    return [u for u in sk.units if u.experts and u.expert_bytes]


def _expert_values(sk: Skeleton) -> int:
    """Values in one MoE block's routed experts (gate, up and down matrices of every expert)."""
    tc = configs.text_config(sk.config)
    count = next((v for k in _EXPERT_COUNTS if isinstance(v := getattr(tc, k, None), int) and v > 0), 0)
    inter = getattr(tc, "moe_intermediate_size", None) or getattr(tc, "intermediate_size", None) or 0
    return count * 3 * int(tc.hidden_size) * int(inter)


def _stored_per_value(sk: Skeleton) -> float | None:
    """Bytes a value of the routed experts takes as the checkpoint stores them, for the quantized formats
    fitmap keeps as stored on the CPU (MXFP4: 4.25 bits; FP8: a byte, plus a float32 scale per 128 x 128
    block); None for others."""
    from fitmap.model import quant

    method = (quant.declared(sk.config) or {}).get("quant_method")
    return {"mxfp4": mxfp4.PACKED_BYTES_PER_VALUE, "fp8": 1 + 4 / (128 * 128)}.get(str(method))


def mxfp4_values(sk: Skeleton) -> int:
    """Values in one MoE block's routed experts when the checkpoint stores them as MXFP4 (gpt-oss as
    released), else 0."""
    from fitmap.model import quant

    return _expert_values(sk) if (quant.declared(sk.config) or {}).get("quant_method") == "mxfp4" else 0


def ram_bytes(sk: Skeleton, u: Unit) -> int:
    """Bytes block ``u``'s routed experts take in RAM computed there. Quantized experts (MXFP4 as gpt-oss is
    released, FP8 as DeepSeek-V3 is) stay as the checkpoint stores them (fitmap unpacks a token's experts per
    forward), also where the plan sizes them unpacked on a GPU (transformers unpacks them on load where the
    format's kernels cannot run)."""
    per_value = _stored_per_value(sk)
    values = _expert_values(sk) if per_value else 0
    if per_value is None or not values or u.expert_bytes < values * 1.5:  # not kept as stored, or sized so
        return u.expert_bytes
    return u.expert_bytes - int(values * _itemsize(sk)) + int(values * per_value)


@dataclass(frozen=True)
class Rates:
    pcie: float  # bytes/s, pinned host -> execution GPU
    ram: float  # bytes/s the CPU reads weights at
    disk: float
    measured: bool
    cpu_flops: float = DEFAULT_CPU_FLOPS  # FLOP/s of the CPU's bf16 matrix products
    unpack: float = DEFAULT_UNPACK  # MXFP4 values/s the CPU unpacks
    unpack_measured: bool = False
    cpu_executes: bool = False  # no GPU: units on the cpu run where they are, nothing crosses PCIe

    def cpu_experts(self, nbytes: float, values: float = 0.0) -> float:
        """Seconds the CPU takes for routed experts of ``nbytes`` in RAM, ``values`` of them MXFP4 it unpacks
        (the reads and the unpacking stream together: the slower bounds)."""
        return max(nbytes / self.ram, values / self.unpack)

    def said(self) -> str:
        how = "measured by fitmap calibrate" if self.measured else "defaults; fitmap calibrate measures this machine"
        link = "" if self.cpu_executes else f", PCIe {self.pcie / 1e9:.0f} GB/s"
        return f"RAM {self.ram / 1e9:.0f} GB/s{link} ({how})"


def rates(execution: str) -> Rates:
    from fitmap.planning import calibrate

    cal = calibrate.load()
    if cal is None:
        return Rates(DEFAULT_PCIE, DEFAULT_RAM, DEFAULT_DISK, False, cpu_executes=execution == "cpu")
    g = next((g for g in cal.gpus if str(g.index) == execution), None)
    flops = cal.cpu_matmul or DEFAULT_CPU_FLOPS
    unpack = cal.cpu_unpack or DEFAULT_UNPACK
    return Rates(
        g.h2d_pinned if g else DEFAULT_PCIE,
        cal.ram_copy,
        cal.disk_read,
        True,
        flops,
        unpack,
        bool(cal.cpu_unpack),
        execution == "cpu",
    )


def prefill_seconds(
    tokens: int, in_ram: int, share: float, itemsize: float, r: Rates, packed: bool = False
) -> tuple[float, float]:
    """A prefill of ``tokens`` tokens through routed experts of ``in_ram`` bytes (``itemsize`` bytes a
    value), of which a token uses ``share``: (seconds computing them on the CPU: the tokens' products at
    the CPU's matmul rate, or the experts some token picked read from RAM (and unpacked, ``packed``),
    whichever bounds; seconds copying them all to the GPU over PCIe instead, where their products cost
    next to nothing)."""
    flops = 2 * tokens * in_ram * share / itemsize
    touched = in_ram * (1 - (1 - share) ** tokens)  # experts at least one of the tokens picked
    reads = r.cpu_experts(touched, touched / itemsize if packed else 0.0)
    return max(flops / r.cpu_flops, reads), in_ram / r.pcie


def copy_wins_from(
    in_ram: int, share: float, itemsize: float, r: Rates, most: int = 1 << 24, packed: bool = False
) -> int | None:
    """The fewest prefill tokens for which copying the experts to the GPU beats computing them on the CPU."""

    def copy_wins(t: int) -> bool:
        cpu, gpu = prefill_seconds(t, in_ram, share, itemsize, r, packed)
        return gpu < cpu

    if not copy_wins(most):
        return None
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if copy_wins(mid) else (mid + 1, hi)
    return lo


def step_seconds(
    result: Assignment, items: Sequence[Item], r: Rates, cpu_expert_bytes: float = 0.0, unpacked: float = 0.0
) -> float:
    """Seconds one decode step spends on weights not resident on a GPU: streamed (PCIe and disk overlap:
    the slower bounds) and routed experts read (and ``unpacked`` values unpacked) by the CPU; GPU compute
    not counted."""
    cpu = sum(it.weight_bytes for it, d in zip(items, result.devices) if d == "cpu" and not r.cpu_executes)
    disk = sum(it.weight_bytes for it, d in zip(items, result.devices) if d == "disk")
    return max(cpu / r.pcie, disk / r.disk) + (r.cpu_experts(cpu_expert_bytes, unpacked) if cpu_expert_bytes else 0)


@dataclass(frozen=True)
class Choice:
    blocks: tuple[Unit, ...]  # blocks whose routed experts run on the CPU
    result: Assignment
    items: tuple[Item, ...]
    note: str
    token_bytes: int  # of the moved experts, those one token uses
    expert_bytes: int  # of the moved experts, in RAM
    token_values: int = 0  # of the moved experts, MXFP4 values one token unpacks
    on_disk: tuple[Unit, ...] = ()  # blocks whose routed experts are computed on the CPU from disk
    disk_bytes: int = 0  # of their experts, on disk
    disk_token_bytes: int = 0  # of those, read per token (the routed ones)


def choose(
    sk: Skeleton,
    items: Sequence[Item],
    names: Sequence[tuple[str, ...]],
    base: Assignment,
    solve: Callable[[list[Item], int], Assignment],
    execution: str,
    prompt: int = 0,
    disk: bool = False,
) -> Choice | None:
    """The fewest MoE blocks (first ones first, as ``--n-cpu-moe`` counts) whose experts computed on the
    CPU let the rest fit the GPUs without streaming, or all of them; kept when a decode step is faster
    than ``base`` (or ``base`` does not fit). ``names``: each item's units; ``solve(items, ram_used)``
    solves with that much RAM taken by experts. ``prompt``: the tokens of a prefill (batch x prompt), for
    what the plan says of that phase. ``disk``: with a disk tier, when the experts of all blocks do not fit
    in RAM, those of the last blocks stay on disk and a token reads only its routed experts from there."""
    where = {n: i for i, units in enumerate(names) for n in units}
    blocks = [u for u in moe_blocks(sk) if items[where[u.name]].pin is None]  # a pinned block goes whole
    if not blocks:
        return None
    share = used_fraction(sk.config)
    r = rates(execution)

    def attempt(k: int, in_ram: int | None = None) -> tuple[Assignment, list[Item]]:
        """Experts of the first ``k`` blocks off the GPUs, those of the first ``in_ram`` (all) of them in RAM."""
        moved = blocks[:k]
        less = {where[u.name]: 0 for u in moved}
        for u in moved:
            less[where[u.name]] += u.expert_bytes
        trimmed = [_without(it, less.get(i, 0)) for i, it in enumerate(items)]
        return solve(trimmed, sum(ram_bytes(sk, u) for u in moved[:in_ram])), trimmed

    def streams(a: Assignment) -> bool:  # on a machine without GPUs the cpu is where units run, not a tier
        return any(d in ("disk",) if execution == "cpu" else d in ("cpu", "disk") for d in a.devices)

    lo, hi = 1, len(blocks)
    best = attempt(hi)
    kept = hi  # blocks whose experts are in RAM; the rest of the moved ones on disk
    if not best[0].fits:
        if not disk or not attempt(hi, 0)[0].fits:
            return None
        low, high = 0, hi - 1
        while low < high:  # the most blocks with their experts in RAM (monotone: more there, less room)
            mid = (low + high + 1) // 2
            low, high = (mid, high) if attempt(hi, mid)[0].fits else (low, mid - 1)
        lo, kept, best = hi, low, attempt(hi, low)
    while lo < hi:  # the fewest blocks that fit without streaming (monotone: more moved, less on the GPUs)
        mid = (lo + hi) // 2
        tried = attempt(mid)
        if tried[0].fits and not streams(tried[0]):
            hi, best = mid, tried
        else:
            lo = mid + 1
    if lo == len(blocks) and kept == lo:
        best = attempt(lo)
    kept = min(kept, lo)
    result, trimmed = best
    moved, on_disk = blocks[:kept], blocks[kept:lo]
    in_ram = sum(ram_bytes(sk, u) for u in moved)
    disk_bytes = sum(ram_bytes(sk, u) for u in on_disk)
    used, disk_used = in_ram * share, disk_bytes * share
    values = mxfp4_values(sk) * lo * share
    mine = step_seconds(result, trimmed, r, used + disk_used, values) + disk_used / r.disk
    theirs = step_seconds(base, items, r) if base.fits else float("inf")
    if mine >= theirs:
        return None
    layer_word = "layer" if lo == 1 else "layers"
    alternative = "reading whole blocks from disk" if r.cpu_executes else "streaming them to the GPU"
    where_said = (
        f"where they live: {fmt_bytes(in_ram)} in RAM ({kept} {'layer' if kept == 1 else 'layers'}), "
        f"{fmt_bytes(disk_bytes)} on disk, of which a token reads only its routed experts"
        if on_disk
        else f"where they live ({fmt_bytes(in_ram)}{_packed(values, r)})"
    )
    note = (
        f"experts of {lo} MoE {layer_word} computed on the CPU {where_said}: a token reads {share:.1%} of them "
        f"({fmt_bytes(int(used + disk_used))}{f', {fmt_bytes(int(disk_used))} from disk' if on_disk else ''}) "
        f"per step; decode bound {_rate(mine)} against {_rate(theirs)} {alternative} ({r.said()}"
        f"{f', disk {r.disk / 1e9:.1f} GB/s' if on_disk else ''}). "
        + (
            ""
            if r.cpu_executes
            else _prefill_note(
                prompt, in_ram, share, mxfp4.PACKED_BYTES_PER_VALUE if values else _itemsize(sk), r, values > 0
            )
        )
    )
    return Choice(
        tuple(moved),
        result,
        tuple(trimmed),
        note.strip(),
        int(used),
        in_ram,
        int(values),
        tuple(on_disk),
        disk_bytes,
        int(disk_used),
    )


def _itemsize(sk: Skeleton) -> float:
    import torch

    try:
        return float(getattr(torch, sk.dtype).itemsize)
    except (AttributeError, TypeError):
        return 2.0


def _prefill_note(tokens: int, in_ram: int, share: float, itemsize: float, r: Rates, packed: bool) -> str:
    """What a prefill of ``tokens`` tokens costs on the CPU against copying the experts to the GPU, and
    from how many tokens the copy is faster. fitmap computes the prefill on the CPU too (the runtime
    does not switch per phase yet): the note says what that costs."""
    if tokens <= 0 or share <= 0:
        return ""
    cpu, gpu = prefill_seconds(tokens, in_ram, share, itemsize, r, packed)
    crossover = copy_wins_from(in_ram, share, itemsize, r, packed=packed)
    rate = f"{r.cpu_flops / 1e12:.2f} TFLOP/s bf16 on the CPU{'' if r.measured else ', a default'}"
    faster = "copying them to the GPU would be faster" if gpu < cpu else "the CPU is faster"
    since = f"; the copy wins from about {crossover} tokens" if crossover else ""
    return (
        f"A prefill of {tokens} tokens computes them in about {cpu:.1f} s on the CPU against {gpu:.1f} s copying "
        f"them to the GPU (at {rate}): {faster}{since}. fitmap computes prefill on the CPU as well (it does not "
        "switch per phase yet)"
    )


def _packed(values: float, r: Rates) -> str:
    """What the note says of MXFP4 experts: kept packed, and the unpacking a token costs."""
    if not values:
        return ""
    rate = f"{r.unpack / 1e9:.1f} G/s{' (measured)' if r.unpack_measured else ', a default'}"
    return f", kept packed as MXFP4; a token unpacks the {values / 1e6:.0f} M values it uses, at {rate}"


def _without(it: Item, nbytes: int) -> Item:
    if not nbytes:
        return it
    from dataclasses import replace

    return replace(it, weight_bytes=it.weight_bytes - nbytes, offloadable=False)


def _rate(seconds: float) -> str:
    if seconds == float("inf"):
        return "no fit"
    if seconds <= 0:
        return "GPU-bound"
    rate = 1 / seconds
    return f"{rate:.0f} tok/s" if rate >= 10 else f"{rate:.1f} tok/s" if rate >= 1 else f"{rate:.2g} tok/s"
