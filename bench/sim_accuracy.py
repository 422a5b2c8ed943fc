"""Simulated vs measured memory on real CPU runs.

For small random-weight models, run the same prefill + decode step twice:
  * for real on the CPU, measuring allocations with the torch profiler
    (``profile_memory=True``: every allocation and free, integrated over time);
  * on fake devices with ``fitmap.simulation.simulate`` (no weights, nothing allocated).
and compare the peak of (activations + KV cache), i.e. the peak minus the weights.

    .venv/bin/python bench/sim_accuracy.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitmap import pipeline  # noqa: E402
from fitmap.model.compat import cache_of  # noqa: E402
from fitmap.planning.devices import make_machine  # noqa: E402
from fitmap.planning.workload import Workload  # noqa: E402
from fitmap.simulation.simulate import simulate  # noqa: E402
from fitmap.simulation.steps import decode_inputs, grow_cache, prefill_inputs

CASES = [  # (family, overrides, batch, prompt, new)
    (
        "llama",
        dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
        1,
        1024,
        64,
    ),
    (
        "llama",
        dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
        4,
        512,
        128,
    ),
    (
        "mixtral",
        dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2),
        2,
        512,
        32,
    ),
    (
        "gemma2",
        dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=256,
        ),
        1,
        1024,
        64,
    ),
]


def make(family: str, overrides: dict, root: Path) -> Path:
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import config  # the test suite's tiny families

    cfg = config(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers] + ["full_attention"] * max(
            0, cfg.num_hidden_layers - len(cfg.layer_types)
        )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    path = root / family
    model.save_pretrained(path)
    return path


def measured_peak(path: Path, w: Workload) -> int:
    """Peak bytes above the weights during prefill + growing the cache + one decode step, real CPU."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.ones(w.batch, w.prompt, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with (
        torch.no_grad(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        out = model(**prefill_inputs(model, inputs))
        cache = cache_of(out)
        full = w.prompt + w.new - 1
        cache = grow_cache(cache, full, w.prompt)
        del out
        model(**decode_inputs(model, inputs, cache, full))
        del cache
    return _integrate(prof)


def _integrate(prof) -> int:
    """Peak of the running sum of allocation events (frees are negative)."""
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]":
            events.append((e.start_ns(), e.nbytes()))
    events.sort()
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def simulated_peak(path: Path, w: Workload) -> tuple[int, float]:
    req = pipeline.PlanRequest(str(path), make_machine(None, 1 << 40), w, estimate="analytic")
    prep = pipeline.prepare(req)
    plan = pipeline.plan(req, prep)
    t = time.perf_counter()
    sim = simulate(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan)
    cpu = next(d for d in sim.devices if d.device == "cpu")
    return cpu.peak_bytes - cpu.weights_bytes, time.perf_counter() - t


def rows() -> list[tuple]:
    out = []
    with tempfile.TemporaryDirectory() as d:
        for family, overrides, batch, prompt, new in CASES:
            path = make(family, overrides, Path(d) / f"{family}-{batch}-{prompt}")
            w = Workload(batch, prompt, new)
            real = measured_peak(path, w)
            sim, secs = simulated_peak(path, w)
            out.append((family, batch, prompt, new, real, sim, sim / real - 1, secs))
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    print("| model | batch | prompt | new | measured peak above weights (MiB) | simulated (MiB) | error | sim time |")
    print("|---|---|---|---|---|---|---|---|")
    for fam, b, p, n, real, sim, err, secs in rows():
        mib = f"{real / 2**20:.2f} | {sim / 2**20:.2f}"
        print(f"| tiny {fam} | {b} | {p} | {n} | {mib} | {100 * err:+.1f}% | {secs:.2f} s |")


if __name__ == "__main__":
    main()
