"""The commands that plan and prove, reading no weight: ``inspect``, ``plan`` (with ``--check``,
``--max-context``, ``--serve``) and ``check`` (a fitmap plan, or a user's bare device map)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fitmap.errors import BadInput, DoesNotFit, SimulationFailed
from fitmap.planning.workload import Dtype, Workload, parse_image
from fitmap.sizes import fmt_bytes


def parse_pins(pins: Sequence[str]) -> dict[str, str]:
    out = {}
    for text in pins:
        module, sep, device = text.partition("=")
        if not sep or not module or not device:
            raise BadInput(f"cannot read --pin {text!r}: write MODULE=DEVICE, e.g. model.visual=0")
        out[module.strip()] = device.strip()
    return out


def request_from(args: argparse.Namespace):
    from fitmap.pipeline import PlanRequest
    from fitmap.planning.devices import make_hosts, make_machine
    from fitmap.planning.solver import Policy

    workload = Workload(args.batch, args.prompt, args.new, tuple(parse_image(i) for i in args.image))
    hosts = getattr(args, "hosts", None)
    if hosts and args.gpus:
        raise BadInput("give --gpus (one machine) or --hosts (several), not both")
    machine = (
        make_hosts(hosts, args.cpu, args.disk, args.reserve)
        if hosts
        else make_machine(args.gpus, args.cpu, args.disk, args.reserve)
    )
    return PlanRequest(
        args.model,
        machine,
        workload,
        Dtype(args.dtype),
        Policy(args.policy),
        parse_pins(args.pin),
        args.trust_remote_code,
        args.estimate,
        args.quantize,
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    from fitmap.cli import report
    from fitmap.model.build import planned_dtype
    from fitmap.model.inventory import inventory
    from fitmap.model.skeleton import skeleton

    inv = inventory(args.model)
    sk = skeleton(inv, planned_dtype(inv, Dtype(args.dtype).torch_name), args.trust_remote_code)
    if args.json:
        print(json.dumps(report.inspect_json(inv, sk), indent=2))
    else:
        report.print_inspect(inv, sk)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from fitmap import pipeline
    from fitmap.cli import report

    req = request_from(args)
    prep = pipeline.prepare(req)
    if args.serve or args.replicas or args.concurrency:
        return _print_serve_plan(req, prep, args)
    if args.max_context or args.max_batch:
        return _print_limits(req, prep, args)
    result = planned = pipeline.plan(req, prep)
    checked = unchecked = None
    headroom: dict[str, int] = {}
    if args.check and result.fits:
        try:
            checked = _check(prep, result, args.trust_remote_code)
            if checked.clean and not checked.fits:  # the full replay peaked above the plan's estimate
                planned, checked, headroom = _replan_with_headroom(req, prep, planned, checked, args)
            result = checked.plan
        except SimulationFailed as e:  # the plan is shown; the check's one line ends the command
            unchecked = e
    if args.out and result.fits and unchecked is None:  # not written when it does not fit: nothing half-done
        result.save(args.out)
    speed = report.offload_speed(result) if result.fits else {}
    if args.json:
        print(json.dumps(result.to_json() | (_check_json(checked) if checked else {}) | speed, indent=2))
    else:
        report.print_plan(planned)
        if prep.inventory.source == "config":
            report.console.print(
                f"no weights in {prep.inventory.path}: planned from config.json's shapes at "
                f"{planned.dtype}, as for a catalog model"
            )
        report.print_machine_notes(req.machine, result, speed)
        if headroom:
            report.console.print(
                "re-planned after the check: its full replay peaked above the estimate, so "
                + ", ".join(f"GPU {d} keeps {fmt_bytes(b)} more free" for d, b in headroom.items())
                + " (in the reserve column)"
            )
        if checked:
            report.print_check(checked)
    if unchecked is not None:
        raise unchecked
    if not result.fits:
        raise DoesNotFit(result.advice or _check_failure(checked))
    return 0


def _print_serve_plan(req, prep, args) -> int:
    from fitmap.cli import report
    from fitmap.serve.placement import serve_plan

    sp = serve_plan(req, concurrency(args, req.machine), args.replicas, prep)
    if args.out:
        _write_plan(args.out, json.dumps(sp.to_json(), indent=2) + "\n")
    if args.json:
        print(json.dumps(sp.to_json(), indent=2))
        return 0
    report.console.print(f"[bold]serve:[/] {sp.choice}")
    for line in sp.reasons:
        report.console.print(f"  {line}")
    for i, r in enumerate(sp.replicas):
        report.console.print(f"[bold]replica {i}[/] (GPUs {', '.join(map(str, r.gpus)) or 'none: CPU'})")
        report.print_plan(r.plan)
    return 0


def _write_plan(path: str, text: str) -> None:
    """``text`` to ``--out``; one line, as :meth:`Plan.save` says it, when it cannot be written there."""
    p = Path(path)
    try:
        p.write_text(text)
    except OSError as e:
        raise BadInput(
            f"cannot write the plan to {p}: {e.strerror or e}; give --out a file path in a directory you can write to"
        ) from None


def _replan_with_headroom(req, prep, planned, checked, args):
    """Plan again with each GPU's reserve raised by what the check's full replay held above the plan's
    estimate there (activations live across units: image features, a sliding cache's prefill), then
    check that plan. Returns (plan, its check, GPU -> bytes added); the first ones if it no longer fits."""
    from fitmap import pipeline

    est = {d.device: d.total_bytes for d in planned.devices}
    extra = {
        d.device: d.total_bytes - est.get(d.device, d.total_bytes)
        for d in checked.predicted
        if d.device.isdigit() and d.total_bytes > est.get(d.device, d.total_bytes)
    }
    if not extra:
        return planned, checked, {}
    gpus = tuple(replace(g, reserve=g.reserve + extra.get(str(g.index), 0)) for g in req.machine.gpus)
    again = pipeline.plan(replace(req, machine=replace(req.machine, gpus=gpus)), prep)
    if not again.fits:
        return planned, checked, {}
    rechecked = _check(prep, again, args.trust_remote_code)
    return (again, rechecked, extra) if rechecked.fits else (planned, checked, {})


def _check(prep, plan, trust_remote_code: bool):
    from fitmap.simulation.check import check

    return check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan, trust_remote_code)


def _check_json(report) -> dict:
    from dataclasses import asdict

    return {
        "check": {
            "clean": report.clean,
            "fits": report.fits,
            "mismatches": [asdict(m) | {"message": m.message()} for m in report.mismatches],
            "repairs": [asdict(r) for r in report.repairs],
            "devices": [asdict(d) | {"activation_bytes": d.activation_bytes} for d in report.devices],
        }
    }


def _check_failure(report) -> str:
    if report is None:
        return "the plan does not fit"
    if not report.clean:
        m = report.mismatches[-1]
        return (
            f"{m.message()}; fitmap could not repair it. Keep the units involved on one device: plan "
            "again with fitmap plan ... --pin MODULE=DEVICE"
        )
    over = [d for d in report.predicted if d.total_bytes > d.capacity_bytes and d.device != "disk"]
    return (
        "simulated peaks exceed capacity on "
        + ", ".join(f"{d.device}: {d.total_bytes / 2**30:.2f} of {d.capacity_bytes / 2**30:.2f} GiB" for d in over)
        + "; plan again with a shorter --prompt or more --cpu offload"
    )


def _print_limits(req, prep, args) -> int:
    from dataclasses import replace

    from fitmap import pipeline

    lim = pipeline.limits(req, prep, batch_too=args.max_batch)
    verify = None
    if lim.max_context:
        gpus_only = replace(req.machine, cpu=0, disk=None, disk_bytes=None) if req.machine.gpus else req.machine
        at_max = replace(req.workload, prompt=lim.prompt, new=lim.new)
        verify = pipeline.plan(replace(req, machine=gpus_only, workload=at_max), prep)
    data = {
        "max_context": lim.max_context,
        "prompt": lim.prompt,
        "new": lim.new,
        "batch": req.workload.batch,
        "max_batch": lim.max_batch,
        "model_window": lim.window,
        "limited_by_model_window": lim.model_limited,
        "estimate": verify.estimate if verify else req.estimate,
        "fits_at_max_context": bool(verify and verify.fits),
    }
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        from fitmap.cli.report import console

        where = "on the GPUs alone" if req.machine.gpus else "in RAM and disk"
        console.print(
            f"largest context at batch {req.workload.batch} {where}: {lim.max_context} tokens "
            f"(prompt {lim.prompt} + new {lim.new}), {data['estimate']} costs; a plan at that "
            f"context {'fits' if data['fits_at_max_context'] else 'does NOT fit'}"
            + (
                f"; this is the model's own window ({lim.window} text tokens beside the images), memory allows more"
                if lim.model_limited
                else ""
            )
        )
        if lim.max_batch is not None:
            console.print(f"largest batch at {req.workload.prompt}+{req.workload.new} tokens: {lim.max_batch}")
    if not lim.max_context:
        raise DoesNotFit(f"{req.model} does not fit these devices even with a 1-token context")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from fitmap import pipeline
    from fitmap.cli import report
    from fitmap.planning import usermap
    from fitmap.planning.devices import make_machine
    from fitmap.planning.plan import Plan
    from fitmap.planning.workload import Dtype

    bare = usermap.read(args.plan)
    plan = Plan.load(args.plan) if bare is None else None
    if plan is not None:
        _refuse_workload_for_a_plan(args)
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(plan.dtype if plan else "", "auto")
    workload = plan.workload if plan else _map_workload(args)
    req = pipeline.PlanRequest(
        args.model,
        make_machine(None, 1),
        workload,
        Dtype(dtype),
        trust_remote_code=args.trust_remote_code,
        quantize=plan.quantize if plan else None,
    )
    prep = pipeline.prepare(req)  # weights sized as the plan's (quantized ones too); the simulation runs bf16
    out = args.out or args.plan
    modules = None
    if bare is None and plan is not None and set(plan.device_map) != {u.name for u in prep.skeleton.units}:
        modules = _modules(prep, args.trust_remote_code)
        if usermap.fits_model(plan.device_map, prep.skeleton, modules[0]):
            bare = dict(plan.device_map)  # a plan whose map names other modules (a split block)
    if bare is not None:
        plan, out = _check_user_map(args, prep, bare, modules or _modules(prep, args.trust_remote_code), plan)
    assert plan is not None  # the saved plan, or the one made from the user's map
    pipeline.require_matching(plan, prep)
    checked = _check(prep, plan, args.trust_remote_code)
    if checked.fits:  # a plan that fails its check is not written: nothing half-done
        checked.plan.save(out)
    if args.json:
        print(json.dumps(checked.plan.to_json() | _check_json(checked), indent=2))
    else:
        report.print_check(checked)
        if bare is not None and checked.fits:
            report.console.print(f"fitmap plan (whole units) written to {out}")
    if not checked.fits:
        raise DoesNotFit(_check_failure(checked) + f"; nothing was written to {out}")
    return 0


def _map_workload(args: argparse.Namespace):
    """The workload a bare device map is replayed with: the options given, else fitmap plan's defaults."""
    given = {k: v for k, v in (("batch", args.batch), ("prompt", args.prompt), ("new", args.new)) if v is not None}
    return Workload(images=tuple(parse_image(i) for i in args.image), **given)


def _refuse_workload_for_a_plan(args: argparse.Namespace) -> None:
    used = [f"--{k}" for k in ("batch", "prompt", "new", "image") if getattr(args, k) not in (None, [])]
    if used:
        verb = "describe" if len(used) > 1 else "describes"
        raise BadInput(
            f"{', '.join(used)} {verb} the workload of a bare device map; {args.plan} is a fitmap plan "
            f"and replays its own workload (make a new one: fitmap plan {args.model} ... "
            f"{' '.join(used)} ...)"
        )


def _modules(prep, trust_remote_code: bool) -> tuple[list[str], list[str]]:
    """Every module path of the model (a map may name parameterless ones, e.g. a rotary embedding),
    and those of its ModuleLists and ModuleDicts; the model is built once, on meta."""
    import torch
    from torch import nn

    from fitmap.model.build import build_model, empty_weights

    sk = prep.skeleton
    with empty_weights():
        model = build_model(sk.config, prep.inventory.task, getattr(torch, sk.dtype), trust_remote_code)
    named = list(model.named_modules())
    return [n for n, _ in named], [n for n, m in named if isinstance(m, (nn.ModuleList, nn.ModuleDict))]


def _check_user_map(args: argparse.Namespace, prep, raw: dict, modules: tuple[list[str], list[str]], given=None):
    """The user's own map replayed as given (its errors and the repairs that fix it in place),
    then the whole-unit fitmap plan made from it, to be checked and written. The GPUs are
    ``--gpus``, else those of the plan the map came in (``given``), else detected."""
    from dataclasses import replace
    from pathlib import Path

    from fitmap.cli import report
    from fitmap.planning import usermap
    from fitmap.planning.devices import make_machine

    sk = prep.skeleton
    names, containers = modules
    dm = usermap.normalized(raw, [p for u in sk.units for p in u.params], names)
    dm = usermap.expanded(dm, containers, names)
    if given is not None and args.gpus is None:
        machine, gpus_from = usermap.machine_of(given), "the plan it came in lists"
    else:
        machine = make_machine(args.gpus, args.cpu, args.disk, args.reserve)
        gpus_from = "without --gpus fitmap has" if args.gpus is None else f"--gpus {_shorten(args.gpus)} gives"
    usermap.check_devices(dm, machine, gpus_from)
    user = usermap.as_plan(prep.inventory.name, sk, dm, machine, given.workload if given else _map_workload(args))
    found = _check(prep, user, args.trust_remote_code)
    if not args.json:
        report.console.print(f"your map ({len(raw)} entries) on fake devices:")
        report.print_check(found)
    units = usermap.to_units(sk, found.plan.device_map)
    out = args.out or str(Path(args.plan).with_suffix("")) + ".fitmap.json"
    if given is not None and args.out is None:
        out = args.plan
    return replace(user, device_map=units, repairs=(), policy="from user map"), out


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def concurrency(args, machine) -> int:
    c = args.concurrency if args.concurrency is not None else max(8, len(machine.gpus))
    if c < 1:
        raise BadInput(f"--concurrency must be at least 1 (got {c})")
    return c
