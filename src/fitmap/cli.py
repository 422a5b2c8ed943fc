"""``fitmap`` command line: parse strings once, call the pipeline, print tables or JSON.

Exit codes: 0 success, 2 bad input or a request that does not fit (one message on
stderr, no traceback), 1 an unexpected error (a bug: traceback kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from fitmap.errors import BadInput, DoesNotFit, FitmapError
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
    p.add_argument("--estimate", choices=["simulate", "analytic"], default="analytic",
                   help="activation/KV costs from a fake-device simulation or from config formulas")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fitmap", description=__doc__.splitlines()[0])
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
                       parse_pins(args.pin), args.trust_remote_code, args.estimate)


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
    result = pipeline.plan(req)
    if args.out:
        result.save(args.out)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        report.print_plan(result)
    if not result.fits:
        raise DoesNotFit(result.advice)
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {"inspect": cmd_inspect, "plan": cmd_plan}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except FitmapError as e:
        print(f"fitmap {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
