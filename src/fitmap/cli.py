"""``fitmap`` command line: parse strings once, call the pipeline, print tables or JSON.

Exit codes: 0 success, 2 bad input or a request that does not fit (one message on
stderr, no traceback), 1 an unexpected error (a bug: traceback kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from fitmap.errors import BadInput, DoesNotFit, FitmapError, SimulationFailed
from fitmap.sizes import fmt_bytes
from fitmap.workload import Dtype, Workload, parse_image


def _machine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices")
    g.add_argument("--gpus", help="0,1 (detected) | 0:10GiB,1:10GiB (capped) | 4x24GiB (hypothetical)")
    g.add_argument("--cpu", help="RAM for offloaded weights, e.g. 64GiB (default: available RAM)")
    g.add_argument("--disk", metavar="DIR", help="directory for the disk tier")
    g.add_argument("--reserve", help="per-GPU reserve for CUDA context/workspace/fragmentation "
                   "(default 512MiB + 2%% of the card)")


def _workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    g.add_argument("--prompt", type=int, default=512, help="prompt text tokens per sequence (default 512)")
    g.add_argument("--new", type=int, default=256, help="new tokens per sequence (default 256)")
    g.add_argument("--image", action="append", default=[], metavar="WxH",
                   help="an image per sequence, e.g. 1344x1344 (repeatable)")
    g.add_argument("--dtype", choices=[d.value for d in Dtype], default="auto")


def _serve_args(p: argparse.ArgumentParser, flag: bool) -> None:
    g = p.add_argument_group("serving")
    if flag:
        g.add_argument("--serve", action="store_true",
                       help="plan for serving: one split copy or k replicas on disjoint GPU groups")
    g.add_argument("--concurrency", type=int, default=None,
                   help="requests served at once, all replicas together (default 8, or the number of GPUs if "
                        "more); each replica's plan holds its share of them, decoded together")
    g.add_argument("--replicas", type=int, default=None, help="this many replicas instead of fitmap's choice")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory, cached Hugging Face id, or catalog name")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own Python code (only if you trust it)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _plan_args(p: argparse.ArgumentParser) -> None:
    from fitmap.solver import Policy

    p.add_argument("--policy", choices=[x.value for x in Policy], default="balanced")
    p.add_argument("--pin", action="append", default=[], metavar="MODULE=DEVICE",
                   help="keep MODULE on DEVICE (a GPU index, cpu or disk); repeatable")
    p.add_argument("--estimate", choices=["simulate", "analytic"], default="simulate",
                   help="activation/KV costs from a fake-device simulation (default) or from config formulas")
    _quantize_arg(p)


def _quantize_arg(p: argparse.ArgumentParser) -> None:
    from fitmap.quant import METHODS

    p.add_argument("--quantize", choices=list(METHODS), default=None,
                   help="quantize the Linear weights while loading: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items())
                   + " (needs bitsandbytes)")


DESCRIPTION = """Run a model bigger than one GPU across your GPUs, CPU RAM and disk: fitmap plans where
each part goes from your workload, checks the plan on fake devices before reading a
weight, then loads, runs, chats or serves it."""
EPILOG = """examples:
  fitmap demo                                              a tiny VLM planned, checked and run offline
  fitmap plan llama-3.1-70b --gpus 4x40GiB --prompt 4096   plan a catalog model for hypothetical GPUs
  fitmap run ./my-model --gpus 0,1 --prompt "Hello"        load once and answer
  fitmap COMMAND --help                                    each command's flags"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fitmap", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true",
                        help="also show the warnings and logs of torch, transformers and huggingface_hub")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="what a model is made of (no weights read)")
    _model_args(p)
    p.add_argument("--dtype", choices=[d.value for d in Dtype], default="auto")
    p = sub.add_parser("plan", help="a device map that fits the workload")
    _model_args(p)
    _machine_args(p)
    _workload_args(p)
    _plan_args(p)
    p.add_argument("--out", metavar="PLAN.json", help="write the plan to a file")
    p.add_argument("--check", action="store_true", help="replay the plan on fake devices and repair mismatches")
    p.add_argument("--max-context", action="store_true",
                   help="report the largest prompt + new tokens that fit (prompt:new ratio kept)")
    p.add_argument("--max-batch", action="store_true", help="with --max-context: also the largest batch")
    _serve_args(p, flag=True)
    p = sub.add_parser("check", help="replay a plan on fake devices: peaks per device, mismatches, repairs")
    _model_args(p)
    p.add_argument("--plan", required=True, metavar="PLAN.json",
                   help="a fitmap plan (repairs are written back), or a bare device map {module: device} "
                        "such as infer_auto_device_map returns (the fitmap plan goes to MAP.fitmap.json)")
    p.add_argument("--out", metavar="PLAN.json", help="write the checked plan here instead of over --plan")
    p.add_argument("--gpus", help="for a bare device map: the GPUs' memory, as for fitmap plan")
    p.add_argument("--cpu", help="for a bare device map: CPU RAM for offloaded weights")
    p.add_argument("--disk", help="for a bare device map: disk-tier directory")
    p.add_argument("--reserve", help="for a bare device map: per-GPU reserve")
    g = p.add_argument_group("for a bare device map: the workload to replay (a fitmap plan holds its own)")
    g.add_argument("--batch", type=int, default=None, help="sequences per batch (default 1)")
    g.add_argument("--prompt", type=int, default=None, help="prompt text tokens per sequence (default 512)")
    g.add_argument("--new", type=int, default=None, help="new tokens per sequence (default 256)")
    g.add_argument("--image", action="append", default=[], metavar="WxH",
                   help="an image per sequence, e.g. 1344x1344 (repeatable)")
    for name, text in (("run", "load the model once and answer one prompt"),
                       ("chat", "a multi-turn conversation (type /image PATH to attach an image, /exit to quit)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model", help="model directory or cached Hugging Face id")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="run the model's own Python code (only if you trust it)")
        if name == "run":
            p.add_argument("--prompt", required=True, help="the prompt text")
        p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image file (repeatable)")
        p.add_argument("--new", type=int, default=128, help="largest number of new tokens (default 128)")
        p.add_argument("--plan", metavar="PLAN.json", help="run this plan (made by fitmap plan --out)")
        _machine_args(p)
        _quantize_arg(p)
    p = sub.add_parser("serve", help="an OpenAI-compatible server: one split copy or several replicas, each "
                                     "loaded once")
    p.add_argument("model", help="model directory or cached Hugging Face id")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own Python code (only if you trust it)")
    p.add_argument("--plan", metavar="SERVE.json", help="a serve plan (fitmap plan --serve --out)")
    _machine_args(p)
    g = p.add_argument_group("what each request may use (the plan's workload)")
    g.add_argument("--prompt", type=int, default=2048, help="prompt tokens per request (default 2048, at most the "
                                                            "model's window less --new)")
    g.add_argument("--new", type=int, default=256, help="largest max_tokens a request may ask (default 256)")
    g.add_argument("--image", action="append", default=[], metavar="WxH",
                   help="room for an image of this size per request (repeatable)")
    _serve_args(p, flag=False)
    _quantize_arg(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting or running before 429 (default 64)")
    g.add_argument("--max-batch", type=int, default=8,
                   help="greedy text requests a replica decodes together (default 8, at most its plan's share of "
                        "--concurrency; 1: one at a time)")
    sub.add_parser("demo", help="plan + check a full-size VLM, then run a small random one with disk offload")
    p = sub.add_parser("calibrate", help="measure this machine once (GPU fixed cost, copy and disk rates) for plan")
    p.add_argument("--disk", metavar="DIR", help="directory on the disk to measure (default: fitmap's cache)")
    p.add_argument("--size", default="512MiB", help="test file size for the disk read (default 512MiB)")
    p.add_argument("--show", action="store_true", help="print the saved calibration, measure nothing")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def parse_pins(pins: Sequence[str]) -> dict[str, str]:
    out = {}
    for text in pins:
        module, sep, device = text.partition("=")
        if not sep or not module or not device:
            raise BadInput(f"cannot read --pin {text!r}: write MODULE=DEVICE, e.g. model.visual=0")
        out[module.strip()] = device.strip()
    return out


def request_from(args: argparse.Namespace):
    from fitmap.devices import make_machine
    from fitmap.pipeline import PlanRequest
    from fitmap.solver import Policy

    workload = Workload(args.batch, args.prompt, args.new, tuple(parse_image(i) for i in args.image))
    machine = make_machine(args.gpus, args.cpu, args.disk, args.reserve)
    return PlanRequest(args.model, machine, workload, Dtype(args.dtype), Policy(args.policy),
                       parse_pins(args.pin), args.trust_remote_code, args.estimate, args.quantize)


def cmd_inspect(args: argparse.Namespace) -> int:
    from fitmap import report
    from fitmap.inventory import inventory
    from fitmap.skeleton import planned_dtype, skeleton

    inv = inventory(args.model)
    sk = skeleton(inv, planned_dtype(inv, Dtype(args.dtype).torch_name), args.trust_remote_code)
    if args.json:
        print(json.dumps(report.inspect_json(inv, sk), indent=2))
    else:
        report.print_inspect(inv, sk)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from fitmap import pipeline, report

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
            if checked.clean and not checked.fits:     # the full replay peaked above the plan's estimate
                planned, checked, headroom = _replan_with_headroom(req, prep, planned, checked, args)
            result = checked.plan
        except SimulationFailed as e:     # the plan is shown; the check's one line ends the command
            unchecked = e
    if args.out and result.fits and unchecked is None:   # not written when it does not fit: nothing half-done
        result.save(args.out)
    speed = report.offload_speed(result) if result.fits else {}
    if args.json:
        print(json.dumps(result.to_json() | (_check_json(checked) if checked else {}) | speed, indent=2))
    else:
        report.print_plan(planned)
        if prep.inventory.source == "config":
            report.console.print(f"no weights in {prep.inventory.path}: planned from config.json's shapes at "
                                 f"{planned.dtype}, as for a catalog model")
        report.print_machine_notes(req.machine, result, speed)
        if headroom:
            report.console.print("re-planned after the check: its full replay peaked above the estimate, so "
                                 + ", ".join(f"GPU {d} keeps {fmt_bytes(b)} more free" for d, b in headroom.items())
                                 + " (in the reserve column)")
        if checked:
            report.print_check(checked)
    if unchecked is not None:
        raise unchecked
    if not result.fits:
        raise DoesNotFit(result.advice or _check_failure(checked))
    return 0


def _print_serve_plan(req, prep, args) -> int:
    from fitmap import report
    from fitmap.serve.placement import serve_plan

    sp = serve_plan(req, _concurrency(args, req.machine), args.replicas, prep)
    if args.out:
        Path(args.out).write_text(json.dumps(sp.to_json(), indent=2) + "\n")
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


def _concurrency(args, machine) -> int:
    c = args.concurrency if args.concurrency is not None else max(8, len(machine.gpus))
    if c < 1:
        raise BadInput(f"--concurrency must be at least 1 (got {c})")
    return c


def cmd_serve(args: argparse.Namespace) -> int:
    from fitmap import pipeline
    from fitmap.devices import make_machine
    from fitmap.run import local_model_dir
    from fitmap.serve.placement import ServePlan, serve_plan

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise BadInput("fitmap serve needs FastAPI and uvicorn: pip install -e '.[serve]' (or pip install fastapi "
                       "uvicorn)") from None
    for name in ("prompt", "new", "port", "max_queue", "max_batch"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    _port_free(args.host, args.port)
    machine = make_machine(args.gpus, args.cpu, args.disk, args.reserve)
    req = pipeline.PlanRequest(args.model, machine, Workload(1, args.prompt, args.new,
                                                             tuple(parse_image(i) for i in args.image)),
                               trust_remote_code=args.trust_remote_code, estimate="analytic", quantize=args.quantize)
    prep = pipeline.prepare(req)
    window = pipeline.context_window(prep)
    if args.new >= window:
        raise BadInput(f"--new {args.new} leaves no room for a prompt: the model reads at most {window} tokens")
    req = replace(req, workload=replace(req.workload, prompt=min(args.prompt, window - args.new)))
    model_dir = local_model_dir(prep)
    if args.plan:
        try:
            sp = ServePlan.from_json(json.loads(Path(args.plan).read_text()))
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read the serve plan {args.plan}: {e}; write one with fitmap plan --serve --out")\
                from None
    else:
        sp = serve_plan(req, _concurrency(args, machine), args.replicas, prep)
    return _serve(model_dir, sp, args)


def _port_free(host: str, port: int) -> None:
    """Before anything is loaded: the address can be bound (else one line, not uvicorn's log)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise BadInput(f"--host {host!r} is not an address this machine resolves ({e}); use 127.0.0.1 or 0.0.0.0") \
            from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise BadInput(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port (or --host)") \
                from None


def _serve(model_dir, sp, args) -> int:
    import uvicorn

    from fitmap.serve.app import Limits, create_app
    from fitmap.serve.engine import Engine

    engine = Engine(model_dir, sp, args.trust_remote_code, args.max_queue, args.max_batch)
    engine.start()
    name = args.model
    print(f"fitmap serve: {name} on http://{args.host}:{args.port}/v1 — {sp.choice}; {len(sp.replicas)} "
          f"replica(s) loaded", flush=True)
    app = create_app(engine, name, args.api_key, Limits(queue=args.max_queue))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0


def _replan_with_headroom(req, prep, planned, checked, args):
    """Plan again with each GPU's reserve raised by what the check's full replay held above the plan's
    estimate there (activations live across units: image features, a sliding cache's prefill), then
    check that plan. Returns (plan, its check, GPU -> bytes added); the first ones if it no longer fits."""
    from fitmap import pipeline

    est = {d.device: d.total_bytes for d in planned.devices}
    extra = {d.device: d.total_bytes - est.get(d.device, d.total_bytes) for d in checked.predicted
             if d.device.isdigit() and d.total_bytes > est.get(d.device, d.total_bytes)}
    if not extra:
        return planned, checked, {}
    gpus = tuple(replace(g, reserve=g.reserve + extra.get(str(g.index), 0)) for g in req.machine.gpus)
    again = pipeline.plan(replace(req, machine=replace(req.machine, gpus=gpus)), prep)
    if not again.fits:
        return planned, checked, {}
    rechecked = _check(prep, again, args.trust_remote_code)
    return (again, rechecked, extra) if rechecked.fits else (planned, checked, {})


def _check(prep, plan, trust_remote_code: bool):
    from fitmap.check import check

    return check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan, trust_remote_code)


def _check_json(report) -> dict:
    from dataclasses import asdict

    return {"check": {
        "clean": report.clean, "fits": report.fits,
        "mismatches": [asdict(m) | {"message": m.message()} for m in report.mismatches],
        "repairs": [asdict(r) for r in report.repairs],
        "devices": [asdict(d) | {"activation_bytes": d.activation_bytes} for d in report.devices],
    }}


def _check_failure(report) -> str:
    if report is None:
        return "the plan does not fit"
    if not report.clean:
        m = report.mismatches[-1]
        return (f"{m.message()}; fitmap could not repair it. Keep the units involved on one device: plan "
                "again with fitmap plan ... --pin MODULE=DEVICE")
    over = [d for d in report.predicted if d.total_bytes > d.capacity_bytes and d.device != "disk"]
    return "simulated peaks exceed capacity on " + ", ".join(
        f"{d.device}: {d.total_bytes / 2**30:.2f} of {d.capacity_bytes / 2**30:.2f} GiB" for d in over
    ) + "; plan again with a shorter --prompt or more --cpu offload"


def _print_limits(req, prep, args) -> int:
    from dataclasses import replace

    from fitmap import pipeline

    lim = pipeline.limits(req, prep, batch_too=args.max_batch)
    verify = None
    if lim.max_context:
        gpus_only = replace(req.machine, cpu=0, disk=None, disk_bytes=None) if req.machine.gpus else req.machine
        at_max = replace(req.workload, prompt=lim.prompt, new=lim.new)
        verify = pipeline.plan(replace(req, machine=gpus_only, workload=at_max), prep)
    data = {"max_context": lim.max_context, "prompt": lim.prompt, "new": lim.new, "batch": req.workload.batch,
            "max_batch": lim.max_batch, "model_window": lim.window, "limited_by_model_window": lim.model_limited,
            "estimate": verify.estimate if verify else req.estimate,
            "fits_at_max_context": bool(verify and verify.fits)}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        from fitmap.report import console

        where = "on the GPUs alone" if req.machine.gpus else "in RAM and disk"
        console.print(f"largest context at batch {req.workload.batch} {where}: {lim.max_context} tokens "
                      f"(prompt {lim.prompt} + new {lim.new}), {data['estimate']} costs; a plan at that "
                      f"context {'fits' if data['fits_at_max_context'] else 'does NOT fit'}"
                      + (f"; this is the model's own window ({lim.window} text tokens beside the images), memory allows more"
                         if lim.model_limited else ""))
        if lim.max_batch is not None:
            console.print(f"largest batch at {req.workload.prompt}+{req.workload.new} tokens: {lim.max_batch}")
    if not lim.max_context:
        raise DoesNotFit(f"{req.model} does not fit these devices even with a 1-token context")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from fitmap import pipeline, report, usermap
    from fitmap.devices import make_machine
    from fitmap.plan import Plan
    from fitmap.workload import Dtype

    bare = usermap.read(args.plan)
    plan = Plan.load(args.plan) if bare is None else None
    if plan is not None:
        _refuse_workload_for_a_plan(args)
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(plan.dtype if plan else "", "auto")
    workload = plan.workload if plan else _map_workload(args)
    req = pipeline.PlanRequest(args.model, make_machine(None, 1), workload, Dtype(dtype),
                               trust_remote_code=args.trust_remote_code, quantize=plan.quantize if plan else None)
    prep = pipeline.prepare(req)     # weights sized as the plan's (quantized ones too); the simulation runs bf16
    out = args.out or args.plan
    modules = None
    if bare is None and set(plan.device_map) != {u.name for u in prep.skeleton.units}:
        modules = _modules(prep, args.trust_remote_code)
        if usermap.fits_model(plan.device_map, prep.skeleton, modules[0]):
            bare = dict(plan.device_map)        # a plan whose map names other modules (a split block)
    if bare is not None:
        plan, out = _check_user_map(args, prep, bare, modules or _modules(prep, args.trust_remote_code), plan)
    pipeline.require_matching(plan, prep)
    checked = _check(prep, plan, args.trust_remote_code)
    checked.plan.save(out)
    if args.json:
        print(json.dumps(checked.plan.to_json() | _check_json(checked), indent=2))
    else:
        report.print_check(checked)
        if bare is not None:
            report.console.print(f"fitmap plan (whole units) written to {out}")
    if not checked.fits:
        raise DoesNotFit(_check_failure(checked))
    return 0


def _map_workload(args: argparse.Namespace):
    """The workload a bare device map is replayed with: the options given, else fitmap plan's defaults."""
    given = {k: v for k, v in (("batch", args.batch), ("prompt", args.prompt), ("new", args.new)) if v is not None}
    return Workload(images=tuple(parse_image(i) for i in args.image), **given)


def _refuse_workload_for_a_plan(args: argparse.Namespace) -> None:
    used = [f"--{k}" for k in ("batch", "prompt", "new", "image") if getattr(args, k) not in (None, [])]
    if used:
        verb = "describe" if len(used) > 1 else "describes"
        raise BadInput(f"{', '.join(used)} {verb} the workload of a bare device map; {args.plan} is a fitmap plan "
                       f"and replays its own workload (make a new one: fitmap plan {args.model} ... "
                       f"{' '.join(used)} ...)")


def _modules(prep, trust_remote_code: bool) -> tuple[list[str], list[str]]:
    """Every module path of the model (a map may name parameterless ones, e.g. a rotary embedding),
    and those of its ModuleLists and ModuleDicts; the model is built once, on meta."""
    import torch
    from torch import nn

    from fitmap.skeleton import build_model, empty_weights

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

    from fitmap import report, usermap
    from fitmap.devices import make_machine

    sk = prep.skeleton
    names, containers = modules
    dm = usermap.normalized(raw, [p for u in sk.units for p in u.params], names)
    dm = usermap.expanded(dm, containers, names)
    if given is not None and args.gpus is None:
        machine = usermap.machine_of(given)
    else:
        machine = make_machine(args.gpus, args.cpu, args.disk, args.reserve)
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


def cmd_run(args: argparse.Namespace) -> int:
    from fitmap import report
    from fitmap.devices import make_machine
    from fitmap.prompting import open_image
    from fitmap.run import answer

    if args.new < 1:
        raise BadInput(f"--new must be at least 1 (got {args.new})")
    images = [open_image(p) for p in args.image]
    machine = make_machine(args.gpus, args.cpu, args.disk, args.reserve)
    result = answer(args.model, args.prompt, images, args.new, machine, args.plan, args.trust_remote_code,
                    quantize=args.quantize)
    report.print_plan(result.plan)
    report.console.print(f"({result.new_tokens} tokens in {result.seconds:.2f} s; load {result.load_seconds:.2f} s)")
    report.print_memory(result.memory, result.plan)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from fitmap.chat import chat
    from fitmap.devices import make_machine

    machine = make_machine(args.gpus, args.cpu, args.disk, args.reserve)
    return chat(args.model, args.image, args.new, machine, args.plan, args.trust_remote_code, quantize=args.quantize)


def cmd_demo(args: argparse.Namespace) -> int:
    from fitmap.demo import run_demo

    return run_demo()


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fitmap import calibrate

    if args.show:
        cal = calibrate.load()
        if cal is None:
            raise BadInput(f"no calibration of this machine in {calibrate.saved_path()}; run fitmap calibrate")
    else:
        from fitmap.sizes import parse_size

        size = parse_size(args.size)
        if size < 16 << 20:
            raise BadInput(f"--size {args.size} is too small to time a disk read; use at least 16MiB")
        cal = calibrate.measure(Path(args.disk) if args.disk else None, size)
        path = calibrate.save(cal)
    if args.json:
        print(json.dumps(cal.to_json(), indent=2))
    else:
        for line in calibrate.describe(cal):
            print(line)
        if not args.show:
            print(f"saved to {path}; fitmap plan uses it for the GPUs it detects and for offload speed")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "inspect": cmd_inspect, "plan": cmd_plan, "check": cmd_check, "run": cmd_run, "chat": cmd_chat,
    "demo": cmd_demo, "calibrate": cmd_calibrate, "serve": cmd_serve,
}


def quiet_third_parties() -> None:
    """A user sees fitmap's lines only: torch's and transformers' warnings, transformers' logs
    below errors, hub progress bars and what model code prints while it is built are hidden
    (``fitmap --verbose`` shows them)."""
    import logging
    import warnings

    from fitmap import skeleton

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)   # "pip install kernels" notes at import
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)  # a fake op's own traceback:
    # the simulation says in one line which op and source line stopped it
    skeleton.MODEL_PRINTS = False       # remote code's print()s while it is built ("Flash attention is not ...")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


_VALUE_OPTIONS = ("--cpu", "--gpus", "--reserve", "--batch", "--prompt", "--new", "--size")


def _negative_values_attached(argv: Sequence[str]) -> list[str]:
    """``--cpu -5GiB`` as ``--cpu=-5GiB``: argparse takes a value starting with ``-`` for an option
    and says only "expected one argument"; attached, the value reaches fitmap's own check."""
    out: list[str] = []
    for token in argv:
        if out and out[-1] in _VALUE_OPTIONS and token[:1] == "-" and token[1:2].isdigit():
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = _negative_values_attached(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_third_parties()
    try:
        return HANDLERS[args.command](args)
    except FitmapError as e:
        print(f"fitmap {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from fitmap.errors import ModelCodeError

        if not ModelCodeError.raised_in_model_code(e):
            raise
        print(f"fitmap {args.command}: {ModelCodeError.from_exception(f'running {args.command}', e)}", file=sys.stderr)
        return ModelCodeError.exit_code


if __name__ == "__main__":
    sys.exit(main())
