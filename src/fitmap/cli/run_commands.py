"""The commands that load and run: ``run``, ``chat``, ``serve``, ``demo``, and ``calibrate``, which
measures this machine for the planner."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

from fitmap.cli.plan_commands import concurrency
from fitmap.errors import BadInput
from fitmap.planning.workload import Workload, parse_image


def cmd_serve(args: argparse.Namespace) -> int:
    from fitmap import pipeline
    from fitmap.planning.devices import make_machine
    from fitmap.runtime.run import local_model_dir
    from fitmap.serve.placement import serve_plan

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise BadInput(
            "fitmap serve needs FastAPI and uvicorn: pip install -e '.[serve]' (or pip install fastapi uvicorn)"
        ) from None
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    for name in ("prompt", "new", "max_queue", "max_batch", "micro_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    _threads_in_range(args.threads)
    name = served_name(args.model, args.served_model_name)
    _port_in_range(args.port)
    if rank == 0:  # under torchrun only rank 0 listens; the others run their stage
        _port_free(args.host, args.port)
    machine = make_machine(args.gpus, args.cpu, args.disk, args.reserve)
    req = pipeline.PlanRequest(
        args.model,
        machine,
        Workload(1, args.prompt, args.new, tuple(parse_image(i) for i in args.image)),
        trust_remote_code=args.trust_remote_code,
        estimate="analytic",
        quantize=args.quantize,
    )
    prep = pipeline.prepare(req)
    window = pipeline.context_window(prep)
    if args.new >= window:
        raise BadInput(f"--new {args.new} leaves no room for a prompt: the model reads at most {window} tokens")
    req = replace(req, workload=replace(req.workload, prompt=min(args.prompt, window - args.new)))
    model_dir = local_model_dir(prep)
    if args.plan:
        try:
            sp = _read_serve_plan(json.loads(Path(args.plan).read_text()))
        except (OSError, ValueError) as e:
            raise BadInput(
                f"cannot read the serve plan {args.plan}: {e}; write one with fitmap plan --serve --out"
            ) from None
    else:
        sp = serve_plan(req, concurrency(args, machine), 1 if ranks > 1 else args.replicas, prep)
    if ranks > 1 and len(sp.replicas) != 1:
        raise BadInput(
            f"under torchrun fitmap serve runs one copy as pipeline stages across the {ranks} processes; "
            f"the serve plan has {len(sp.replicas)} replicas (plan with --replicas 1)"
        )
    if ranks > 1 and rank > 0:
        return _serve_stage(model_dir, sp, args)
    return _serve(model_dir, sp, args, name)


def _read_serve_plan(d: dict):
    """A serve plan (``fitmap plan --serve --out``), or a plain plan (``fitmap plan --out``) as one copy."""
    from fitmap.planning.plan import Plan
    from fitmap.serve.placement import Replica, ServePlan

    if "fitmap_plan" in d and "replicas" not in d:
        plan = Plan.from_json(d)
        gpus = tuple(sorted({int(v) for v in plan.device_map.values() if str(v).isdigit()}))
        return ServePlan((Replica(gpus, plan),), plan.workload.batch, "one copy (the plan given)", ())
    return ServePlan.from_json(d)


def _serve_stage(model_dir, sp, args: argparse.Namespace) -> int:
    """A rank > 0 under torchrun: loads its stage of the one copy and runs it for rank 0's server
    until rank 0 stops (then ``StageDone``: exit 0, nothing printed)."""
    from fitmap.runtime import threads
    from fitmap.runtime.run import start

    threads.fix(threads.choose([sp.replicas[0].plan], args.threads))
    start(model_dir, sp.replicas[0].plan, args.trust_remote_code)
    return 0


def served_name(model: str, given: str | None = None) -> str:
    """The id ``fitmap serve`` answers to: ``--served-model-name``, else the model directory's name
    (its last path component), else the Hugging Face id or catalog name as given."""
    if given is not None:
        if not given.strip():
            raise BadInput("--served-model-name must not be empty")
        return given
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve().name or model
    return model


def _calibrate_peer(args: argparse.Namespace) -> int:
    """``fitmap calibrate --peer``, on every host under torchrun: the link to the other hosts."""
    from fitmap.planning import calibrate

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise BadInput(
            "fitmap calibrate --peer measures the link between hosts: start it on every host with torchrun, e.g. "
            "torchrun --nnodes 2 --node-rank R --nproc-per-node 1 --master-addr HOST0 --master-port 29500 "
            "-m fitmap.cli calibrate --peer"
        )
    link = calibrate.measure_link()
    if link is None:  # another rank: it answered rank 0's messages
        return 0
    path = calibrate.save_link(link)
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(link), indent=2))
    else:
        print(link.describe())
        print(f"saved to {path}; fitmap plan --hosts uses it for what a stage boundary costs")
    return 0


def _threads_in_range(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise BadInput(f"--threads must be at least 1 (got {threads})")


def _fix_threads(threads: int | None) -> None:
    from fitmap.runtime import threads as torch_threads

    _threads_in_range(threads)
    torch_threads.fix(torch_threads.Threads(threads, "--threads") if threads is not None else None)


def _port_in_range(port: int) -> None:
    """A TCP port is 1-65535 (the socket layer would take 70000 as 70000 mod 65536, silently)."""
    if not 1 <= port <= 65535:
        raise BadInput(f"--port {port} is not a TCP port; give one from 1 to 65535 (default 8000)")


def _port_free(host: str, port: int) -> None:
    """Before anything is loaded: the address can be bound (else one line, not uvicorn's log)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise BadInput(
            f"--host {host!r} is not an address this machine resolves ({e}); use 127.0.0.1 or 0.0.0.0"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise BadInput(
                f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port (or --host)"
            ) from None


def _serve(model_dir, sp, args, name: str) -> int:
    import uvicorn

    from fitmap.runtime import threads
    from fitmap.serve.app import Limits, create_app
    from fitmap.serve.engine import Engine

    # before the replicas' threads start: each keeps the count it first ran with
    chosen = threads.choose([r.plan for r in sp.replicas], args.threads)
    threads.fix(chosen)
    engine = Engine(model_dir, sp, args.trust_remote_code, args.max_queue, args.max_batch, args.micro_batches)
    engine.start()
    print(
        f"fitmap serve: {name} on http://{args.host}:{args.port}/v1 — {sp.choice}; {len(sp.replicas)} "
        f"replica(s) loaded; {chosen.count} CPU thread(s) each ({chosen.why}); {engine.workers[0].batching}"
        + (" each" if len(engine.workers) > 1 else ""),
        flush=True,
    )
    aliases = (args.model,) if args.model != name else ()
    app = create_app(engine, name, args.api_key, Limits(queue=args.max_queue), aliases=aliases)
    import signal

    # uvicorn stops on SIGTERM and raises it again when done: kept here, the replicas are closed and,
    # under torchrun (which sends it when another rank ends), the rank that is gone is named
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
        signal.signal(signal.SIGTERM, previous)
    if engine.fatal is not None:  # a stage's rank failed: the server stopped; say why, exit 1
        raise engine.fatal
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fitmap.cli import report
    from fitmap.planning.devices import make_machine
    from fitmap.runtime.prompting import open_image
    from fitmap.runtime.run import answer

    if args.new < 1:
        raise BadInput(f"--new must be at least 1 (got {args.new})")
    _fix_threads(args.threads)
    images = [open_image(p) for p in args.image]
    machine = make_machine(args.gpus, args.cpu, args.disk, args.reserve)
    result = answer(
        args.model, args.prompt, images, args.new, machine, args.plan, args.trust_remote_code, quantize=args.quantize
    )
    report.print_plan(result.plan)
    report.console.print(f"({result.new_tokens} tokens in {result.seconds:.2f} s; load {result.load_seconds:.2f} s)")
    report.print_memory(result.memory, result.plan)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from fitmap.cli.chat import chat
    from fitmap.planning.devices import make_machine

    _fix_threads(args.threads)
    machine = make_machine(args.gpus, args.cpu, args.disk, args.reserve)
    return chat(args.model, args.image, args.new, machine, args.plan, args.trust_remote_code, quantize=args.quantize)


def cmd_demo(args: argparse.Namespace) -> int:
    from fitmap.cli.demo import run_demo

    return run_demo()


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fitmap.planning import calibrate

    if args.peer:
        return _calibrate_peer(args)
    if args.show:
        cal = calibrate.load()
        if cal is None:
            raise BadInput(f"no calibration of this machine in {calibrate.saved_path()}; run fitmap calibrate")
    else:
        from fitmap.sizes import parse_size

        size = parse_size(args.size)
        if size < 16 << 20:
            raise BadInput(f"--size {args.size} is too small to time a disk read; use at least 16MiB")
        disk = calibrate.disk_dir(args.disk)  # a bad --disk or cache is one line before anything is measured
        cal = calibrate.measure(disk, size)
        path = calibrate.save(cal)
    if args.json:
        print(json.dumps(cal.to_json(), indent=2))
    else:
        for line in calibrate.describe(cal):
            print(line)
        if not args.show:
            print(f"saved to {path}; fitmap plan uses it for the GPUs it detects and for offload speed")
    return 0
