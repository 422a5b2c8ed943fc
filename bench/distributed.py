"""One plan served in one process against the same plan as two pipeline stages (torchrun, gloo on
loopback), side by side in one run: what the stage boundary costs per step.

Model: bench/serve.py's tiny Qwen2 (random weights, float32, CPU). The plan: ``fitmap plan MODEL
--cpu 4GiB --batch 8 --out plan.json`` (every unit on the CPU, cache tokens for 8 requests); two
processes cut its blocks in two stages.
One thread per process (torchrun's default; ``--threads 1`` for the single process), so the two runs
use the same CPU time per token; and one process with ``--threads 2``, the same two cores as the two
stages. ``c`` clients (1, 8) each send ``--requests`` chat completions
(greedy, ``max_tokens`` ``--new``); completion tokens/s and p50 latency.

    .venv/bin/python bench/distributed.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import serve as bench_serve  # noqa: E402  (bench/serve.py: the model, the load, the server wait)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,8", help="concurrent clients, comma-separated (default 1,8)")
    ap.add_argument("--requests", type=int, default=3, help="requests per client (default 3)")
    ap.add_argument("--new", type=int, default=32, help="max_tokens per request (default 32)")
    ap.add_argument("--hidden", type=int, default=256, help="the model's hidden size (default 256)")
    ap.add_argument("--layers", type=int, default=6, help="its decoder blocks (default 6)")
    args = ap.parse_args()
    work = Path(tempfile.gettempdir()) / "fitmap-bench"
    model = bench_serve.tiny_qwen2(work, args.hidden, args.layers)
    plan = work / "distributed-plan.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    fitmap = [sys.executable, "-m", "fitmap.cli"]
    clients = [int(c) for c in args.clients.split(",")]
    subprocess.run(
        [*fitmap, "plan", str(model), "--cpu", "4GiB", "--prompt", "64", "--new", str(args.new)]
        + ["--batch", str(max(clients)), "--out", str(plan)],
        check=True,
        env=env,
        capture_output=True,
    )
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    variants = {
        "one process (--threads 1)": lambda p: (
            [*fitmap, "serve", str(model), "--plan", str(plan), "--threads", "1"] + ["--port", str(p)]
        ),
        "one process (--threads 2)": lambda p: (  # the baseline: the same two cores in one process
            [*fitmap, "serve", str(model), "--plan", str(plan), "--threads", "2"] + ["--port", str(p)]
        ),
        "two stages (torchrun, 2 processes x 1 thread)": lambda p: [
            *(torchrun, "--nproc-per-node=2", f"--master-port={bench_serve.free_port()}", "-m", "fitmap.cli"),
            *("serve", str(model), "--plan", str(plan), "--port", str(p)),
        ],
        "two stages, --micro-batches 2": lambda p: [
            *(torchrun, "--nproc-per-node=2", f"--master-port={bench_serve.free_port()}", "-m", "fitmap.cli"),
            *("serve", str(model), "--plan", str(plan), "--port", str(p), "--micro-batches", "2"),
        ],
    }
    print(f"{model.name}; {args.requests} requests per client, max_tokens {args.new}, greedy; {os.cpu_count()} cores\n")
    print("| serving | c | tok/s | p50 latency | errors | distinct texts |")
    print("|---|---|---|---|---|---|")
    for name, cmd in variants.items():
        port = bench_serve.free_port()
        with bench_serve.running(cmd(port), port, env):
            bench_serve.load(port, model.name, 1, 1, args.new)  # warm-up
            for c in clients:
                r = bench_serve.load(port, model.name, c, args.requests, args.new)
                print(f"| {name} | {c} | {r['tok_s']:.1f} | {r['p50']:.2f} s | {r['errors']} | {r['distinct']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
