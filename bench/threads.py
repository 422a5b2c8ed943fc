"""CPU threads under load: decode of the demo model with torch's default intra-op threads (one
per core) vs fitmap's choice (``fitmap.runtime.threads``), on a quiet machine and with one
busy-loop process per core beside it.

The model is loaded once the way ``fitmap run`` loads it (its plan, ``fitmap.runtime.loader``),
and each measurement is ``fitmap.runtime.run.generate``: greedy, ``--tokens`` new tokens,
tokens/s over the whole call. Rounds interleave everything: in each round, quiet then loaded,
and within each the variants in turn (their order alternating between rounds); the table has
the medians. The busy loops run only during the loaded half of a round and are killed in a
``finally``.

    .venv/bin/python bench/threads.py                 # about a minute here
    .venv/bin/python bench/threads.py --rounds 3 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BUSY = "while True: pass"


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = ap.parse_args()

    import torch

    from fitmap import pipeline
    from fitmap.cli.demo import demo_checkpoint
    from fitmap.planning.devices import make_machine
    from fitmap.runtime import threads
    from fitmap.runtime.loader import load
    from fitmap.runtime.prompting import Prompter
    from fitmap.runtime.run import generate, local_model_dir, plan_for_run, text_tokens

    default = torch.get_num_threads()
    model = demo_checkpoint(Path(tempfile.gettempdir()) / "fitmap-bench-threads")
    machine = make_machine(None, "4GiB")
    prep = pipeline.prepare(pipeline.PlanRequest(str(model), machine, estimate="analytic"))
    model_dir = local_model_dir(prep)
    prompter = Prompter.for_model(model_dir, prep.skeleton.config, False)
    prompter.add_user("describe the picture please .", [])
    plan, _ = plan_for_run(
        str(model), text_tokens(prompter, prep.skeleton.config), [], args.tokens, None, machine, False
    )
    chosen = threads.choose([plan], env={})
    variants = {f"torch's default: {default} (one per core)": default, f"fitmap's choice: {chosen.count}": chosen.count}
    cores = threads.cores()
    loaded = load(model_dir, plan)

    def tok_s(count: int) -> float:
        torch.set_num_threads(count)
        _, n, seconds = generate(loaded, prompter, args.tokens, None)
        return n / seconds

    tok_s(default)
    tok_s(chosen.count)  # warm-up, both counts
    got: dict[tuple[str, str], list[float]] = {}
    t0 = time.perf_counter()
    with loaded:
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for state in ("quiet", "loaded"):
                procs: list[subprocess.Popen] = []
                try:
                    if state == "loaded":
                        procs = busy_loops(cores)
                        time.sleep(0.3)
                    for name in order:
                        got.setdefault((name, state), []).append(tok_s(variants[name]))
                finally:
                    stop(procs)
    wall = time.perf_counter() - t0
    print(
        f"demo model ({sum(f.stat().st_size for f in model.glob('*.safetensors')) / 2**20:.0f} MiB), "
        f"{args.tokens} new tokens, {args.rounds} rounds, {cores} cores, loaded = {cores} busy loop(s); "
        f"{wall:.0f} s; fitmap chose {chosen.count}: {chosen.why}\n"
    )
    print("| threads | quiet tok/s | under load tok/s | slowdown under load |")
    print("|---|---|---|---|")
    for name in variants:
        quiet, busy = statistics.median(got[name, "quiet"]), statistics.median(got[name, "loaded"])
        print(f"| {name} | {quiet:.1f} | {busy:.1f} | {quiet / busy:.1f}x |")
    print("\nper round:", json.dumps({f"{k[0]} / {k[1]}": [round(x, 1) for x in v] for k, v in got.items()}))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[0]} / {k[1]}": v for k, v in got.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
