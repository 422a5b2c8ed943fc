"""The command line's words: every command, its flags and their help, and the one argv fix-up
(a negative number attached to its flag) that argparse needs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fitmap.planning.workload import Dtype


def _machine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices")
    g.add_argument("--gpus", help="0,1 (detected) | 0:10GiB,1:10GiB (capped) | 4x24GiB (hypothetical)")
    g.add_argument("--cpu", help="RAM for offloaded weights, e.g. 64GiB (default: available RAM)")
    g.add_argument("--disk", metavar="DIR", help="directory for the disk tier")
    g.add_argument(
        "--reserve", help="per-GPU reserve for CUDA context/workspace/fragmentation (default 512MiB + 2%% of the card)"
    )


def _workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    g.add_argument("--prompt", type=int, default=512, help="prompt text tokens per sequence (default 512)")
    g.add_argument("--new", type=int, default=256, help="new tokens per sequence (default 256)")
    g.add_argument(
        "--image", action="append", default=[], metavar="WxH", help="an image per sequence, e.g. 1344x1344 (repeatable)"
    )
    g.add_argument("--dtype", choices=[d.value for d in Dtype], default="auto")


def _serve_args(p: argparse.ArgumentParser, flag: bool) -> None:
    g = p.add_argument_group("serving")
    if flag:
        g.add_argument(
            "--serve", action="store_true", help="plan for serving: one split copy or k replicas on disjoint GPU groups"
        )
    g.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="requests served at once, all replicas together (default 8, or the number of GPUs if "
        "more); each replica's plan holds its share of them, decoded together",
    )
    g.add_argument("--replicas", type=int, default=None, help="this many replicas instead of fitmap's choice")


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads torch computes with (default: from the work a token gives the CPU, one when "
        "the model runs on GPUs; OMP_NUM_THREADS, if set, is kept)",
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory, cached Hugging Face id, or catalog name")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run the model's own Python code (only if you trust it)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _plan_args(p: argparse.ArgumentParser) -> None:
    from fitmap.planning.solver import Policy

    p.add_argument("--policy", choices=[x.value for x in Policy], default="balanced")
    p.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="MODULE=DEVICE",
        help="keep MODULE on DEVICE (a GPU index, cpu or disk); repeatable",
    )
    p.add_argument(
        "--estimate",
        choices=["simulate", "analytic"],
        default="simulate",
        help="activation/KV costs from a fake-device simulation (default) or from config formulas",
    )
    _quantize_arg(p)


def _quantize_arg(p: argparse.ArgumentParser) -> None:
    from fitmap.model.quant import METHODS

    p.add_argument(
        "--quantize",
        choices=list(METHODS),
        default=None,
        help="quantize the Linear weights while loading: "
        + "; ".join(f"{k}: {v}" for k, v in METHODS.items())
        + " (needs bitsandbytes)",
    )


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
        prog="fitmap", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show the warnings and logs of torch, transformers and huggingface_hub",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="what a model is made of (no weights read)")
    _model_args(p)
    p.add_argument("--dtype", choices=[d.value for d in Dtype], default="auto")
    p = sub.add_parser("plan", help="a device map that fits the workload")
    _model_args(p)
    _machine_args(p)
    _workload_args(p)
    _plan_args(p)
    p.add_argument(
        "--hosts",
        help="several machines, in pipeline order: 2x(8x80GiB) (alike) | a:4x24GiB,b:2x48GiB (named); "
        "each host a contiguous stage",
    )
    p.add_argument("--out", metavar="PLAN.json", help="write the plan to a file")
    p.add_argument("--check", action="store_true", help="replay the plan on fake devices and repair mismatches")
    p.add_argument(
        "--max-context",
        action="store_true",
        help="report the largest prompt + new tokens that fit (prompt:new ratio kept)",
    )
    p.add_argument("--max-batch", action="store_true", help="with --max-context: also the largest batch")
    _serve_args(p, flag=True)
    p = sub.add_parser("check", help="replay a plan on fake devices: peaks per device, mismatches, repairs")
    _model_args(p)
    p.add_argument(
        "--plan",
        required=True,
        metavar="PLAN.json",
        help="a fitmap plan (repairs are written back), or a bare device map {module: device} "
        "such as infer_auto_device_map returns (the fitmap plan goes to MAP.fitmap.json)",
    )
    p.add_argument("--out", metavar="PLAN.json", help="write the checked plan here instead of over --plan")
    p.add_argument("--gpus", help="for a bare device map: the GPUs' memory, as for fitmap plan")
    p.add_argument("--cpu", help="for a bare device map: CPU RAM for offloaded weights")
    p.add_argument("--disk", help="for a bare device map: disk-tier directory")
    p.add_argument("--reserve", help="for a bare device map: per-GPU reserve")
    g = p.add_argument_group("for a bare device map: the workload to replay (a fitmap plan holds its own)")
    g.add_argument("--batch", type=int, default=None, help="sequences per batch (default 1)")
    g.add_argument("--prompt", type=int, default=None, help="prompt text tokens per sequence (default 512)")
    g.add_argument("--new", type=int, default=None, help="new tokens per sequence (default 256)")
    g.add_argument(
        "--image", action="append", default=[], metavar="WxH", help="an image per sequence, e.g. 1344x1344 (repeatable)"
    )
    for name, text in (
        ("run", "load the model once and answer one prompt"),
        ("chat", "a multi-turn conversation (type /image PATH to attach an image, /exit to quit)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("model", help="model directory or cached Hugging Face id")
        p.add_argument(
            "--trust-remote-code", action="store_true", help="run the model's own Python code (only if you trust it)"
        )
        if name == "run":
            p.add_argument("--prompt", required=True, help="the prompt text")
        p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image file (repeatable)")
        p.add_argument("--new", type=int, default=128, help="largest number of new tokens (default 128)")
        p.add_argument("--plan", metavar="PLAN.json", help="run this plan (made by fitmap plan --out)")
        _machine_args(p)
        _quantize_arg(p)
        _threads_arg(p)
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible server: one split copy or several replicas, each loaded once"
    )
    p.add_argument("model", help="model directory or cached Hugging Face id")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run the model's own Python code (only if you trust it)"
    )
    p.add_argument("--plan", metavar="SERVE.json", help="a serve plan (fitmap plan --serve --out)")
    _machine_args(p)
    g = p.add_argument_group("what each request may use (the plan's workload)")
    g.add_argument(
        "--prompt",
        type=int,
        default=2048,
        help="prompt tokens per request (default 2048, at most the model's window less --new)",
    )
    g.add_argument("--new", type=int, default=256, help="largest max_tokens a request may ask (default 256)")
    g.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="WxH",
        help="room for an image of this size per request (repeatable)",
    )
    _serve_args(p, flag=False)
    _quantize_arg(p)
    _threads_arg(p)
    g = p.add_argument_group("server")
    g.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model id /v1/models lists and responses carry; requests may name it or the model as "
        "given here (default: the model directory's name, or the Hugging Face id / catalog name as given)",
    )
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on, 1-65535 (default 8000)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting or running before 429 (default 64)")
    g.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        metavar="N",
        help="under torchrun: N continuous batches in flight, so that one stage computes one while another "
        "computes the next (default 1; pays where a step's compute, not its Python, dominates)",
    )
    g.add_argument(
        "--max-batch",
        type=int,
        help="at most this many requests in a replica's running batch (default: as many as its plan's "
        "cache-token budget admits, --concurrency x (prompt + images + new) over the replicas; 1: one at a time)",
    )
    sub.add_parser("demo", help="plan + check a full-size VLM, then run a small random one with disk offload")
    p = sub.add_parser("calibrate", help="measure this machine once (GPU fixed cost, copy and disk rates) for plan")
    p.add_argument("--disk", metavar="DIR", help="directory on the disk to measure (default: fitmap's cache)")
    p.add_argument("--size", default="512MiB", help="test file size for the disk read (default 512MiB)")
    p.add_argument("--show", action="store_true", help="print the saved calibration, measure nothing")
    p.add_argument(
        "--peer",
        action="store_true",
        help="under torchrun, on every host: measure the link between the hosts (for plan --hosts)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


_VALUE_OPTIONS = (
    "--cpu",
    "--gpus",
    "--hosts",
    "--reserve",
    "--batch",
    "--prompt",
    "--new",
    "--size",
    "--port",
    "--threads",
)


def negative_values_attached(argv: Sequence[str]) -> list[str]:
    """``--cpu -5GiB`` as ``--cpu=-5GiB``: argparse takes a value starting with ``-`` for an option
    and says only "expected one argument"; attached, the value reaches fitmap's own check."""
    out: list[str] = []
    for token in argv:
        if out and out[-1] in _VALUE_OPTIONS and token[:1] == "-" and token[1:2].isdigit():
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out
