"""Planning: fitmap vs accelerate on catalog models and hypothetical machines, in one run.

For each case (model, GPUs, workload) four device maps are made:

* ``fitmap analytic`` / ``fitmap simulate`` — ``pipeline.plan`` with the analytic or
  the simulated per-unit costs (timed without ``pipeline.prepare``; for simulate,
  the first call, which runs the two fake-device simulations that measure the
  costs, and the later calls, which reuse them);
* ``accel greedy``   — accelerate ``infer_auto_device_map`` with ``max_memory`` = the
  GPU capacities (its default behaviour: weights only, module order);
* ``accel balanced`` — the same with ``max_memory=get_balanced_memory(...)`` (the
  map ``device_map="auto"`` gives), timed together.

Planning times are wall clock, the fastest of ``REPEATS`` calls, model already built.

Every map is then judged by one yardstick, fitmap's cost model at the same workload
(simulated costs when the simulation runs, else analytic): per GPU, weights + KV +
largest activation peak + fitmap's per-GPU reserve (512 MiB + 2%, charged only to
a GPU that is used). Offloaded units run on GPU 0, which holds their KV and
activations plus a streaming buffer (2 x the largest offloaded unit for fitmap's
prefetch, 1 x for accelerate's synchronous offload). The maps are also replayed
on fake devices with ``fitmap.simulation.simulate``: the peak of torch allocations per GPU,
no reserve, as DESIGN.md's anchor numbers are quoted.

    .venv/bin/python bench/plan.py                      # the table, every map replayed (~4 min)
    .venv/bin/python bench/plan.py --replay headline    # replay DESIGN.md's anchors only (~2 min)
    .venv/bin/python bench/plan.py --only llama-3.1-8b --replay none
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fitmap import pipeline  # noqa: E402
from fitmap.model.build import build_model
from fitmap.model.catalog_models import catalog_entry  # noqa: E402
from fitmap.model.skeleton import Skeleton  # noqa: E402
from fitmap.planning.devices import Machine, make_machine  # noqa: E402
from fitmap.planning.plan import Plan, Repair  # noqa: E402
from fitmap.planning.profile import Profile, estimate  # noqa: E402
from fitmap.planning.workload import Workload  # noqa: E402
from fitmap.sizes import GiB  # noqa: E402

REPEATS = 5  # planning times are the fastest of this many calls


@dataclass(frozen=True)
class Case:
    model: str
    gpus: str  # hypothetical GPUs, as --gpus takes them
    cpu: str  # RAM for offloaded weights (fitmap's cpu tier, accelerate's "cpu")
    workload: Workload
    headline: bool = False  # one of DESIGN.md's anchors (replayed by --replay headline)

    @property
    def label(self) -> str:
        w = self.workload
        text = f"{w.batch} x ({w.prompt}+{w.new})"
        return text + "".join(f" + {x}x{y} img" for x, y in w.images)


CASES = [
    Case("llama-3.1-70b", "4x40GiB", "256GiB", Workload(4, 4096, 1024), headline=True),
    Case("llama-3.1-8b", "2x16GiB", "64GiB", Workload(1, 3000, 1000), headline=True),
    Case("mixtral-8x7b", "4x24GiB", "128GiB", Workload(1, 7168, 1024), headline=True),
    Case("qwen2.5-72b", "4x48GiB", "256GiB", Workload(1, 8192, 1024)),
    Case("qwen2-vl-7b", "2x16GiB", "64GiB", Workload(1, 3000, 1000, ((1344, 1344),))),
    Case("gemma-2-27b", "2x24GiB", "64GiB", Workload(1, 4096, 1024)),
    Case("deepseek-v3", "8x140GiB", "2048GiB", Workload(1, 4096, 1024)),
    Case("llama-3.1-405b", "8x80GiB", "1024GiB", Workload(1, 2048, 512)),
]


@dataclass
class Row:
    case: Case
    method: str
    device_map: dict[str, int | str]  # as the planner wrote it
    plan_ms: float  # fastest of REPEATS calls
    first_ms: float | None = None  # fitmap simulate: the first call, which measures the costs
    units: dict[str, list[str]] = field(default_factory=dict)  # fitmap unit -> devices holding it
    loads: list[Load] = field(default_factory=list)
    replay: str = ""  # per-GPU replayed peaks, or why there are none
    replay_fits: bool | None = None
    inputs: str = ""  # input group on one device?
    outputs: str = ""  # output group on one device?
    note: str = ""


@dataclass
class Load:
    """One GPU under fitmap's cost model, bytes."""

    capacity: int
    weights: int = 0
    kv: int = 0
    act: int = 0
    stream: int = 0
    reserve: int = 0
    offloaded: int = 0  # weights it streams in from the cpu/disk tiers (not resident)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.act + self.stream + self.reserve


# --------------------------------------------------------------------------- the maps
def fitmap_rows(case: Case, machine: Machine) -> tuple[list[Row], pipeline.Prepared, dict[str, Plan], float]:
    req = pipeline.PlanRequest(case.model, machine, case.workload, estimate="analytic")
    t = time.perf_counter()
    prep = pipeline.prepare(req)
    prepare_ms = 1000 * (time.perf_counter() - t)
    plan, ms = best_of(lambda: pipeline.plan(req, prep))
    rows = [Row(case, "fitmap analytic", dict(plan.device_map), ms)]
    plans = {"analytic": plan}
    req = replace(req, estimate="simulate")
    t = time.perf_counter()
    plan = pipeline.plan(req, prep)  # the first call simulates twice to measure the costs
    first_ms = 1000 * (time.perf_counter() - t)
    _, ms = best_of(lambda: pipeline.plan(req, prep))
    note = "simulation failed, analytic costs" if prep.simulation_error else ""
    rows.append(Row(case, "fitmap simulate", dict(plan.device_map), ms, first_ms, note=note))
    plans["simulate"] = plan
    return rows, prep, plans, prepare_ms


def best_of(make, repeats: int = REPEATS):
    """``make()``'s result and its fastest wall time in ms (a shared machine adds noise, never removes it)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = make()
        best = min(best, 1000 * (time.perf_counter() - t))
    return result, best


def meta_model(prep: pipeline.Prepared) -> torch.nn.Module:
    """The model as transformers would hand it to accelerate: on meta, FP8 Linear layers for
    FP8 checkpoints (transformers' own FineGrainedFP8 replacement, as ``from_pretrained`` does)."""
    dtype = getattr(torch, prep.skeleton.dtype)
    with torch.device("meta"):
        model = build_model(prep.skeleton.config, prep.inventory.task, dtype)
    if prep.inventory.source == "catalog" and catalog_entry(prep.inventory.name).fp8_linear:
        from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.utils.quantization_config import FineGrainedFP8Config

        config = FineGrainedFP8Config(weight_block_size=(128, 128), activation_scheme="dynamic")
        replace_with_fp8_linear(model, get_keys_to_not_convert(model), config, pre_quantized=True)
    return model


def accelerate_rows(case: Case, machine: Machine, prep: pipeline.Prepared) -> tuple[list[Row], dict[str, int]]:
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map

    model = meta_model(prep)
    dtype = getattr(torch, prep.skeleton.dtype)
    no_split = list(model._no_split_modules or [])
    capacities = {g.index: g.capacity for g in machine.gpus} | {"cpu": machine.cpu}
    rows = []
    with _quiet():  # "Device 0 is not available": these GPUs are hypothetical
        greedy, ms = best_of(
            lambda: infer_auto_device_map(
                model, max_memory=dict(capacities), no_split_module_classes=no_split, dtype=dtype
            )
        )
        rows.append(Row(case, "accel greedy", dict(greedy), ms))

        def balanced_map():
            budget = get_balanced_memory(
                model, max_memory=dict(capacities), no_split_module_classes=no_split, dtype=dtype
            )
            return infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)

        balanced, ms = best_of(balanced_map)
        rows.append(Row(case, "accel balanced", dict(balanced), ms))
        sizes = dict(compute_module_sizes(model, dtype=dtype))
    return rows, sizes


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------- judging
def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def unit_devices(sk: Skeleton, device_map: dict[str, int | str]) -> dict[str, list[str]]:
    """fitmap unit -> the devices holding it: the map's key that contains the unit (coarser
    maps), or every key inside it (a finer map splits the unit)."""
    out = {}
    for u in sk.units:
        outer = [k for k in device_map if _under(u.name, k)]
        if outer:
            out[u.name] = [str(device_map[max(outer, key=len)])]
        else:
            out[u.name] = sorted({str(d) for k, d in device_map.items() if _under(k, u.name)})
    return out


def loads(
    sk: Skeleton,
    profile: Profile,
    machine: Machine,
    placed: dict[str, list[str]],
    sizes: dict[str, int] | None,
    device_map: dict,
    stream_copies: int,
) -> list[Load]:
    """Per GPU under fitmap's cost model (see the module docstring)."""
    gpus = {str(g.index): Load(g.capacity) for g in machine.gpus}
    execution = str(machine.gpus[0].index)
    offloaded_weights = []
    for cost in profile.costs:
        devices = placed[cost.name] or [execution]
        share = _shares(cost.name, cost.weight_bytes, devices, sizes, device_map)
        for device, weight in share.items():
            if device in gpus:
                gpus[device].weights += weight
            else:
                offloaded_weights.append(weight)
        runs_on = {d if d in gpus else execution for d in devices}
        for device in runs_on:
            gpus[device].act = max(gpus[device].act, cost.act_bytes)
        gpus[devices[0] if devices[0] in gpus else execution].kv += cost.kv_bytes
    if offloaded_weights:
        gpus[execution].stream = stream_copies * max(offloaded_weights)
        gpus[execution].offloaded = sum(offloaded_weights)
    for g, spec in zip(gpus.values(), machine.gpus):
        g.reserve = spec.reserve if g.weights or g.kv or g.act else 0
    return list(gpus.values())


def _shares(
    unit: str, weight: int, devices: list[str], sizes: dict[str, int] | None, device_map: dict
) -> dict[str, int]:
    """A unit's weight bytes per device; a unit split by a finer map is shared out by the map's
    own module sizes."""
    if len(devices) == 1 or not sizes:
        return {devices[0]: weight}
    parts: dict[str, int] = {}
    for k, d in device_map.items():
        if _under(k, unit):
            parts[str(d)] = parts.get(str(d), 0) + sizes.get(k, 0)
    total = sum(parts.values()) or 1
    return {d: weight * n // total for d, n in parts.items()}


def group_check(sk: Skeleton, placed: dict[str, list[str]], kind: str) -> str:
    """yes when the weighted units of the input (or output) group share one device."""
    group = next((g for g in sk.groups if g.name == kind), None)
    if group is None:
        return "-"
    devices = {d for n in group.units if sk.unit(n).weight_bytes for d in placed[n]}
    return "yes" if len(devices) <= 1 else "no (" + ",".join(sorted(devices, key=_device_order)) + ")"


def _device_order(d: str) -> tuple[int, int]:
    return (0, int(d)) if d.isdigit() else (1, 0 if d == "cpu" else 1)


# --------------------------------------------------------------------------- replay
def replay(prep: pipeline.Prepared, template: Plan, row: Row, cache: dict) -> None:
    """The map on fake devices: torch allocations per GPU at their peak (GiB).

    Accelerate's runtime moves every module's inputs to that module's device; its maps
    are replayed the same way (an input-alignment hook per map key), so a map is not
    blamed for a mismatch accelerate's hooks would have fixed. The simulator builds
    every floating weight at the plan dtype (bf16 even for FP8 checkpoints), so each
    GPU's resident weights are swapped for the checkpoint bytes the yardstick counts.
    fitmap's runtime prefetches one more offloaded unit than the simulation streams:
    that buffer is added to the execution GPU of fitmap's maps.
    """
    from fitmap.simulation.simulate import simulate

    dm = {u: (int(d[0]) if d[0].isdigit() else d[0]) for u, d in row.units.items() if len(d) == 1}
    if len(dm) != len(row.units):
        row.replay = "split unit: not replayed"
        return
    key = (row.method.startswith("accel"), tuple(sorted(dm.items())))
    if key not in cache:
        fixes: tuple[Repair, ...] = ()
        if key[0]:
            fixes = tuple(
                Repair("align-inputs", k, str(d) if str(d).isdigit() else template.execution_device)
                for k, d in row.device_map.items()
                if _is_module(prep, k)
            )
        sk = prep.skeleton
        sim = simulate(
            sk.config,
            prep.inventory.task,
            sk,
            replace(template, device_map=dm, repairs=()),
            device_map=dm,
            plan_repairs=fixes,
        )
        cache[key] = sim
    sim = cache[key]
    if sim.mismatch is not None:
        row.replay = f"device mismatch: {sim.mismatch.op} in {sim.mismatch.module}"
        return
    by_device = {p.device: p for p in sim.devices}
    specs = [d for d in template.devices if d.device.isdigit()]
    peaks = []
    for spec, load in zip(specs, row.loads):
        p = by_device.get(spec.device)
        peak = 0 if p is None or p.peak_bytes == 0 else p.peak_bytes - p.weights_bytes + load.weights
        if peak and spec is specs[0] and row.method.startswith("fitmap"):
            peak += load.stream // 2
        peaks.append(peak)
    row.replay = "/".join(f"{b / GiB:.2f}" for b in peaks)
    simulated_weights = sum(p.weights_bytes for p in sim.devices if p.device.isdigit())
    if abs(simulated_weights - sum(g.weights for g in row.loads)) > GiB:
        row.replay += f" (weights: {simulated_weights / GiB:.0f} GiB simulated -> checkpoint bytes)"
    row.replay_fits = all(b == 0 or b + s.reserve_bytes <= s.capacity_bytes for b, s in zip(peaks, specs))


def _is_module(prep: pipeline.Prepared, key: str) -> bool:
    params = {p for u in prep.skeleton.units for p in u.params}
    return key not in params


# --------------------------------------------------------------------------- the table
def run_case(case: Case, replay_it: bool) -> tuple[list[Row], str]:
    machine = make_machine(case.gpus, case.cpu)
    frows, prep, plans, prepare_ms = fitmap_rows(case, machine)
    t = time.perf_counter()
    meta_model(prep)
    build_ms = 1000 * (time.perf_counter() - t)
    arows, sizes = accelerate_rows(case, machine, prep)
    sk = prep.skeleton
    profile = prep.simulated.profile(sk, case.workload) if prep.simulated is not None else estimate(sk, case.workload)
    cache: dict = {}
    for row in frows + arows:
        row.units = unit_devices(sk, row.device_map)
        row.inputs, row.outputs = group_check(sk, row.units, "input"), group_check(sk, row.units, "output")
        fitmap_own = row.method.startswith("fitmap")
        row.loads = loads(
            sk, profile, machine, row.units, None if fitmap_own else sizes, row.device_map, 2 if fitmap_own else 1
        )
        if replay_it:
            replay(prep, plans["simulate"], row, cache)
    _self_check(frows[1], plans["simulate"])
    no_reserve = pipeline.plan(
        pipeline.PlanRequest(
            case.model, make_machine(case.gpus, case.cpu, reserve=0), case.workload, estimate="simulate"
        ),
        prep,
    )
    analytic = estimate(sk, case.workload)
    setup = (
        f"{case.model}: fitmap prepare {prepare_ms:.0f} ms, accelerate meta model {build_ms:.0f} ms; "
        f"judged with {profile.method} costs; largest block activation analytic "
        f"{_largest_block_act(sk, analytic) / GiB:.2f} GiB, simulated {_largest_block_act(sk, profile) / GiB:.2f} GiB; "
        f"offloaded by fitmap simulate {_offloaded(plans['simulate']) / GiB:.1f} GiB, "
        f"with --reserve 0 {_offloaded(no_reserve) / GiB:.1f} GiB"
    )
    return frows + arows, setup


def _offloaded(plan: Plan) -> int:
    return sum(d.weights_bytes for d in plan.devices if d.device in ("cpu", "disk"))


def _largest_block_act(sk: Skeleton, profile: Profile) -> int:
    return max((c.act_bytes for c, u in zip(profile.costs, sk.units) if u.kind == "block"), default=0)


def _self_check(row: Row, plan: Plan) -> None:
    """The yardstick must agree with fitmap's own ledger on fitmap's own plan."""
    own = [d.total_bytes for d in plan.devices if d.device.isdigit()]
    mine = [g.total for g in row.loads]
    if own != mine:
        row.note = (row.note + "; " if row.note else "") + (
            "ledger differs from yardstick: " + "/".join(f"{(a - b) / GiB:+.2f}" for a, b in zip(own, mine))
        )


def markdown(rows: list[Row], replayed: bool) -> str:
    head = [
        "model",
        "GPUs",
        "workload",
        "method",
        "max util %",
        "spread %",
        "fits?",
        "w/o reserve?",
        "offloaded",
        "plan ms",
        "inputs 1 dev",
        "outputs 1 dev",
    ]
    if replayed:
        head += ["replayed peak GiB per GPU", "replay fits?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        used = [g.total / g.capacity for g in r.loads if g.total]
        util = 100 * max(used, default=0)
        spread = 100 * (max(used) - min(used)) if len(used) > 1 else 0.0
        idle = len(r.loads) - len(used)
        fits = all(g.total <= g.capacity for g in r.loads)
        bare = all(g.total - g.reserve <= g.capacity for g in r.loads)
        cells = [
            r.case.model,
            r.case.gpus,
            r.case.label,
            r.method,
            f"{util:.1f}",
            f"{spread:.1f}" + (f" ({idle} idle)" if idle else ""),
            "yes" if fits else "**no**",
            "yes" if bare else "**no**",
            offloaded(r),
            plan_time(r),
            r.inputs,
            r.outputs,
        ]
        if replayed:
            cells += [r.replay or "-", {None: "-", True: "yes", False: "**no**"}[r.replay_fits]]
        if r.note:
            cells[3] += f" ({r.note})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_time(r: Row) -> str:
    if r.first_ms is None:
        return f"{r.plan_ms:.1f}"
    return f"{r.first_ms:.0f} first, {r.plan_ms:.1f} after"


def offloaded(r: Row) -> str:
    tiers = [d for d in ("cpu", "disk") if any(d in ds for ds in r.units.values())]
    if not tiers:
        return "none"
    n = sum(1 for ds in r.units.values() if set(ds) & set(tiers))
    gib = sum(g.offloaded for g in r.loads) / GiB
    return f"{n} units, {gib:.1f} GiB to {'+'.join(tiers)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--replay",
        choices=("all", "headline", "none"),
        default="all",
        help="which cases to replay on fake devices (headline: DESIGN.md's anchors only)",
    )
    ap.add_argument("--only", action="append", help="run only this model (repeatable)")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if not args.only or c.model in args.only]
    if not cases:
        ap.error(f"--only: no such case; choose from {', '.join(c.model for c in CASES)}")
    rows, setups = [], []
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # imports out of the first case's prepare time
        pipeline.prepare(pipeline.PlanRequest(cases[0].model, make_machine(cases[0].gpus, cases[0].cpu)))
    for case in cases:
        do_replay = args.replay == "all" or (args.replay == "headline" and case.headline)
        t = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            case_rows, setup = run_case(case, do_replay)
        rows += case_rows
        setups.append(setup)
        print(f"# {case.model} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    print(markdown(rows, args.replay != "none"))
    print()
    for s in setups:
        print(f"- {s}")
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
