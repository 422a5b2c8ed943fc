"""Printing for people (rich tables) and machines (JSON dicts)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fitmap.model.inventory import Inventory
from fitmap.model.skeleton import Skeleton
from fitmap.planning.plan import Plan
from fitmap.sizes import GiB, MiB, fmt_bytes

# Pipes and CI logs get a width that fits the ledger; terminals keep their own.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)


def inspect_json(inv: Inventory, sk: Skeleton) -> dict:
    return {
        "model": inv.name,
        "source": inv.source,
        "model_type": inv.config.get("model_type"),
        "model_class": sk.model_class,
        "task": inv.task,
        "weight_format": inv.weight_format,
        "files": list(inv.files),
        "tensors": len(inv.tensors),
        "checkpoint_bytes": inv.total_bytes,
        "bytes_by_dtype": inv.bytes_by_dtype(),
        "planned_dtype": sk.dtype,
        "planned_weight_bytes": sk.weight_bytes,
        "parameters": sum(u.numel for u in sk.units),
        "no_split_classes": list(sk.no_split),
        "units": [{"name": u.name, "kind": u.kind, "weight_bytes": u.weight_bytes, "layer": u.layer} for u in sk.units],
        "groups": {g.name: list(g.units) for g in sk.groups},
        "tied": [list(t) for t in sk.tied],
    }


def print_inspect(inv: Inventory, sk: Skeleton) -> None:
    params = sum(u.numel for u in sk.units)
    console.print(f"[bold]{escape(inv.name)}[/] — {sk.model_class} ({inv.config.get('model_type')}), {inv.source}")
    console.print(f"parameters: {params / 1e9:.2f} B; weights at {sk.dtype}: {fmt_bytes(sk.weight_bytes)}")
    if inv.tensors:
        dtypes = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(inv.bytes_by_dtype().items()))
        console.print(
            f"checkpoint: {len(inv.files)} {inv.weight_format} file(s), {len(inv.tensors)} tensors, "
            f"{fmt_bytes(inv.total_bytes)} ({dtypes})"
        )
    kinds: dict[str, list] = {}
    for u in sk.units:
        kinds.setdefault(u.kind, []).append(u)
    t = Table(title="placement units")
    for col in ("kind", "units", "weights", "examples"):
        t.add_column(col, justify="right" if col in ("units", "weights") else "left")
    for kind, us in kinds.items():
        names = ", ".join(u.name for u in us[:2]) + (" ..." if len(us) > 2 else "")
        t.add_row(kind, str(len(us)), fmt_bytes(sum(u.weight_bytes for u in us)), names)
    console.print(t)
    console.print(f"no-split classes: {', '.join(sk.no_split)}")
    for g in sk.groups:
        console.print(f"kept together ({g.name}): {', '.join(g.units[:6])}{' ...' if len(g.units) > 6 else ''}")


def print_plan(plan: Plan) -> None:
    w = plan.workload
    images = f", images {', '.join(f'{a}x{b}' for a, b in w.images)}" if w.images else ""
    console.print(
        f"[bold]{escape(plan.model)}[/] at batch {w.batch} x "
        f"({w.prompt} prompt + {w.new} new tokens{images}), "
        f"{plan.dtype}{f', Linear weights quantized to {plan.quantize} on load' if plan.quantize else ''}, "
        f"policy {plan.policy}, {escape(plan.estimate)} costs"
    )
    unit, scale = _unit(plan.devices)
    t = Table(caption=f"sizes in {unit}; use = total / capacity", caption_justify="left")
    for col in ("device", "capacity", "weights", "KV", "activ.", "reserve", "stream", "total", "use", "units"):
        t.add_column(col, justify="left" if col == "device" else "right")
    for d in plan.devices:
        use = "" if d.device == "disk" else f"{100 * d.utilization:.0f}%" if d.utilization < 10 else f">{1000}%"
        style = "red" if d.total_bytes > d.capacity_bytes else ""
        sizes = (
            d.capacity_bytes,
            d.weights_bytes,
            d.kv_bytes,
            d.activation_bytes,
            d.reserve_bytes,
            d.stream_bytes,
            d.total_bytes,
        )
        t.add_row(_device_label(d.device), *(f"{x / scale:.2f}" for x in sizes), use, str(len(d.units)), style=style)
    console.print(t)
    for r in plan.repairs:
        console.print(escape(f"repair: {r.kind} {r.module} -> {r.device} ({r.reason})"))
    if plan.hosts:
        spans = [f"{h}: cuda:{g[0]}-{g[-1]}" if len(g) > 1 else f"{h}: cuda:{g[0]}" for h, g in plan.hosts.items() if g]
        console.print(escape(f"hosts ({'; '.join(spans)}): GPUs numbered across hosts, each host's from 0 on it"))
    for note in plan.notes:
        console.print(escape(f"note: {note}"))
    console.print(
        "[green]fits[/]" if plan.fits else f"[red]does not fit[/]: short by {fmt_bytes(plan.shortfall_bytes)}"
    )


def offload_speed(plan: Plan) -> dict:
    """``{"offload_speed": ...}``: per offload tier, bytes per decode step and the measured rate
    that bounds it (from ``fitmap calibrate``); ``{}`` when nothing is offloaded."""
    from fitmap.planning import calibrate

    if not any(d.device in ("cpu", "disk") and d.weights_bytes for d in plan.devices) and not plan.cpu_token_bytes:
        return {}
    cal = calibrate.load()
    if cal is None:
        return {"offload_speed": {"calibrated": False}}
    speeds = calibrate.offload_speeds(plan, cal)
    best = calibrate.expected_tokens_per_second(speeds)
    return {
        "offload_speed": {
            "calibrated": True,
            "measured_at": cal.measured_at,
            "tiers": [
                {
                    "tier": s.tier,
                    "bytes_per_token": s.bytes_per_token,
                    "bytes_per_second": s.rate,
                    "via": s.via,
                    "seconds_per_token": s.seconds,
                }
                for s in speeds
            ],
            "max_tokens_per_second": best,
        }
    }


def print_machine_notes(machine, plan: Plan, speed: dict) -> None:
    """Where each GPU's reserve came from, and what the offload tiers allow per token."""
    sources = {g.reserve_source for g in machine.gpus if g.detected}
    if "calibrated" in sources:
        console.print("reserve: measured by fitmap calibrate")
    elif "default" in sources:
        console.print("reserve: default (512 MiB + 2% of each card); fitmap calibrate measures this machine's")
    info = speed.get("offload_speed")
    if info is None:
        return
    if not info["calibrated"]:
        console.print("offload speed: unknown on this machine; fitmap calibrate measures its copy and disk rates")
        return
    parts = [
        f"{t['tier']} tier {fmt_bytes(t['bytes_per_token'])}/token at {t['bytes_per_second'] / 1e9:.2f} GB/s "
        f"({t['via']})"
        for t in info["tiers"]
    ]
    best = info["max_tokens_per_second"]
    if best:
        console.print(f"offload bounds decode at {best:.2f} tok/s: {'; '.join(parts)}")


def _unit(ledgers) -> tuple[str, int]:
    """GiB for real machines, MiB when every RAM/GPU budget is under 1 GiB (tiny models)."""
    compute = [d.capacity_bytes for d in ledgers if d.device != "disk"] or [GiB]
    return ("GiB", GiB) if max(compute) >= GiB else ("MiB", MiB)


def _device_label(device: str) -> str:
    return f"cuda:{device}" if device.isdigit() else device


def print_check(report) -> None:
    """Simulated per-device peaks against capacity, mismatches met, repairs made."""
    unit, scale = _unit(report.predicted)
    t = Table(
        title="simulated on fake devices",
        caption=f"sizes in {unit}; total = weights + KV + activation peak + reserve + stream",
        caption_justify="left",
    )
    for col in ("device", "capacity", "weights", "KV", "activ. peak", "reserve", "stream", "total", "use"):
        t.add_column(col, justify="left" if col == "device" else "right")
    for d in report.predicted:
        if d.device == "disk":
            continue
        style = "red" if d.total_bytes > d.capacity_bytes else ""
        t.add_row(
            _device_label(d.device),
            *(
                f"{x / scale:.2f}"
                for x in (
                    d.capacity_bytes,
                    d.weights_bytes,
                    d.kv_bytes,
                    d.activation_bytes,
                    d.reserve_bytes,
                    d.stream_bytes,
                    d.total_bytes,
                )
            ),
            f"{100 * d.utilization:.0f}%",
            style=style,
        )
    console.print(t)
    for m in report.mismatches:
        console.print(f"[yellow]mismatch[/]: {escape(m.message())}")
    for r in report.repairs:
        console.print("[green]repair[/]: " + escape(f"{r.kind} {r.module} -> {_device_label(r.device)} ({r.reason})"))
    if report.clean:
        console.print("no device mismatch" + (" after repairs" if report.repairs else ""))
    else:
        console.print("[red]device mismatch not repaired[/]")


def print_memory(uses, plan: Plan | None = None) -> None:
    """Measured vs predicted memory per device after a run (predicted: for ``plan``'s workload,
    which a ``--plan`` made for a larger request exceeds)."""
    caption = "GPUs: torch.cuda.max_memory_allocated; cpu: live allocations and resident memory sampled every 5 ms"
    if plan is not None:
        w = plan.workload
        caption += f"; predicted for the plan's workload, batch {w.batch} x ({w.prompt} prompt + {w.new} new tokens)"
    t = Table(title="memory: measured vs predicted", caption_justify="left", caption=caption)
    for col in ("device", "predicted", "measured", "how"):
        t.add_column(col, justify="right" if col in ("predicted", "measured") else "left")
    for u in uses:
        t.add_row(_device_label(u.device), fmt_bytes(u.predicted_bytes), fmt_bytes(u.measured_bytes), u.what)
    console.print(t)
