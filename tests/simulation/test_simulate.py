"""The fake-device simulator: device placement, mismatches, memory against real runs."""

from dataclasses import replace

import pytest
import torch

from fitmap import pipeline
from fitmap.planning.devices import make_machine
from fitmap.planning.workload import Workload
from fitmap.simulation.check import check
from fitmap.simulation.simulate import simulate


def _prepared(model, gpus, workload, cpu="64GiB", estimate="analytic"):
    req = pipeline.PlanRequest(str(model), make_machine(gpus, cpu), workload, estimate=estimate)
    prep = pipeline.prepare(req)
    return prep, pipeline.plan(req, prep)


@pytest.mark.parametrize("family", ["llama", "mixtral", "gemma2", "glm"])
def test_split_over_two_fake_gpus_runs_clean(checkpoints, family):
    prep, plan = _prepared(checkpoints(family), "2x1MiB", Workload(1, 32, 8), cpu="1MiB")
    dm = {u: (0 if i < len(plan.device_map) // 2 else 1) for i, u in enumerate(plan.device_map)}
    for g in prep.skeleton.groups:  # keep the groups whole, as the planner does
        for u in g.units:
            dm[u] = dm[g.units[0]]
    sim = simulate(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan, device_map=dm)
    assert sim.mismatch is None and sim.stage == "done"
    assert {d.device for d in sim.devices} - {"cpu"} == {"0", "1"}
    # model code may make small CPU scalars (gemma2's normalizer): bytes, not a placement
    assert all(d.peak_bytes < 1024 for d in sim.devices if d.device == "cpu")
    # weights per device are the units' planned bytes (plus non-persistent buffers: rotary inv_freq)
    per_dev = {"0": 0, "1": 0}
    for u in prep.skeleton.units:
        per_dev[str(dm[u.name])] += u.weight_bytes
    for d in (d for d in sim.devices if d.device != "cpu"):
        assert 0 <= d.weights_bytes - per_dev[d.device] <= 1024
    assert sum(d.kv_bytes for d in sim.devices) > 0


def test_mismatch_is_reported_with_cuda_names_module_and_code(checkpoints):
    """A tied lm_head split from its embedding fails like on real GPUs, then gets repaired."""
    prep, plan = _prepared(checkpoints("gemma2"), "2x1GiB", Workload(1, 16, 4))
    dm = {u: 0 for u in plan.device_map} | {"lm_head": 1, "model.norm": 1}
    bad = replace(plan, device_map=dm)
    sim = simulate(prep.skeleton.config, prep.inventory.task, prep.skeleton, bad)
    m = sim.mismatch
    assert m is not None and m.module == "lm_head" and set(m.devices) == {"0", "1"}
    msg = m.message()
    assert "found at least two devices, cuda:" in msg and "modeling_gemma2.py" in msg
    report = check(prep.skeleton.config, prep.inventory.task, prep.skeleton, bad)
    assert report.clean and report.repairs[0].kind == "align-inputs" and report.repairs[0].module == "lm_head"


def test_simulated_peak_matches_a_real_cpu_run():
    """Activation + KV peak of the simulation within 10% of the measured one (torch profiler)."""
    import tempfile
    from pathlib import Path

    from bench.sim_accuracy import CASES, make, measured_peak, simulated_peak

    family, overrides, batch, prompt, new = CASES[1]
    with tempfile.TemporaryDirectory() as d:
        path = make(family, overrides, Path(d))
        w = Workload(batch, prompt, new)
        real, (sim, _) = measured_peak(path, w), simulated_peak(path, w)
    assert abs(sim / real - 1) < 0.10, (sim, real)


def test_offloaded_units_stream_through_the_execution_gpu(checkpoints):
    prep, plan = _prepared(checkpoints("llama"), "1x1GiB", Workload(1, 16, 4))
    dm = dict(plan.device_map) | {"model.layers.2": "cpu", "model.layers.3": "cpu"}
    sim = simulate(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan, device_map=dm)
    assert sim.mismatch is None
    gpu = next(d for d in sim.devices if d.device == "0")
    on_gpu = sum(u.weight_bytes for u in prep.skeleton.units if dm[u.name] == 0)
    assert 0 <= gpu.weights_bytes - on_gpu <= 1024  # offloaded weights are not resident on the GPU ...
    block = prep.skeleton.unit("model.layers.3").weight_bytes
    assert gpu.peak_bytes >= on_gpu + block  # ... but pass through it while they run


def test_llama_70b_batch4_simulates_cleanly():
    """(Its speed, a few seconds here, is a benchmark figure, not asserted.)"""
    prep, plan = _prepared("llama-3.1-70b", "4x40GiB", Workload(4, 4096, 1024))
    report = check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan)
    assert report.clean and not report.repairs
    gpus = [d for d in report.predicted if d.device.isdigit()]
    assert len(gpus) == 4 and all(d.total_bytes <= d.capacity_bytes for d in gpus)
    # torch allocations alone: 37-39 GiB per GPU at this workload
    peaks = [d.peak_bytes / 2**30 for d in report.devices if d.device.isdigit()]
    assert all(36 < p < 40 for p in peaks), peaks


def test_mixtral_on_4x24_at_8k_reports_no_mismatch():
    """Planned on simulated costs, the replay of the plan fits too (the analytic estimate
    under-counts MoE routing buffers here)."""
    prep, plan = _prepared("mixtral-8x7b", "4x24GiB", Workload(1, 7168, 1024), estimate="simulate")
    assert plan.fits and plan.estimate == "simulate"
    report = check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan)
    assert report.clean and report.fits


def test_sliding_window_layers_keep_their_window(checkpoints):
    prep, plan = _prepared(checkpoints("gemma2"), "1x1GiB", Workload(1, 200, 100))
    sim = simulate(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan)
    tc = prep.skeleton.config
    per_token = 2 * tc.num_key_value_heads * tc.head_dim * 4
    kv = [sim.unit_kv[f"model.layers.{i}"] for i in range(4)]
    full = 300 * per_token  # prompt + new: the decode step appended the last token
    # gemma2 alternates sliding (window 32) and full layers
    assert sorted(kv) == sorted([full, full, kv[0], kv[0]]) and min(kv) < full / 4


@pytest.mark.parametrize("estimate", ["analytic", "simulate"])
def test_sliding_window_layers_hold_the_whole_prompt_until_the_first_decode_step(checkpoints, estimate):
    """transformers keeps a sliding layer's window as a view of the prefill's keys and values, so the
    prompt's worth stays allocated until decode: the plan counts the prompt for those layers."""
    from fitmap.planning.profile import peak_cached_tokens

    prep, plan = _prepared(checkpoints("gemma2"), "1x1GiB", Workload(1, 200, 100), estimate=estimate)
    tc = prep.skeleton.config
    assert peak_cached_tokens(tc, 0, 300, 200) == 200 and peak_cached_tokens(tc, 1, 300, 200) == 300
    per_token = 2 * tc.num_key_value_heads * tc.head_dim * 4
    planned_kv = next(d for d in plan.devices if d.device == "0").kv_bytes
    assert planned_kv == pytest.approx(2 * 200 * per_token + 2 * 300 * per_token, rel=0.02)  # 2 sliding, 2 full


@pytest.mark.slow
def test_gemma3_27b_with_an_image_checks_within_its_plan():
    """Gemma 3 27B on 2 x 24 GiB with an 896 px image and a 2048-token prompt: 5 of 6 layers slide over
    1024 tokens but hold the 2304-token prefill until decode; planned totals are the check's."""
    prep, plan = _prepared("gemma-3-27b", "2x24GiB", Workload(1, 2048, 512, ((896, 896),)), estimate="simulate")
    report = check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan)
    assert plan.fits and report.clean and report.fits
    for d in report.plan.devices:
        planned = next(p for p in plan.devices if p.device == d.device)
        assert abs(d.total_bytes - planned.total_bytes) < 64 * 2**20, d.device


@pytest.mark.parametrize(
    "family,workload", [("llama", Workload(1, 32, 8)), ("qwen2_vl", Workload(1, 32, 4, ((112, 112),)))]
)
def test_simulation_runs_as_on_a_machine_with_cuda(checkpoints, monkeypatch, family, workload):
    """With CUDA present, FakeTensorMode lifts ``torch.tensor(..., device="meta:0")`` to plain
    ``meta`` (transformers' DynamicLayer makes its empty KV that way); the simulator must keep
    the index, or every simulation on a GPU machine falls back to the analytic estimate
    (found by bench/gpu.py on an H200)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(FakeTensorMode, "avoid_device_init", property(lambda self: False))
    _, plan = _prepared(checkpoints(family), "2x80GiB", workload, estimate="simulate")
    assert plan.estimate == "simulate"


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
def test_one_block_of_each_kind_measures_what_the_whole_model_does(checkpoints, family, monkeypatch):
    """The planner simulates one block per kind (same parameters, same entry in the config's
    per-layer lists such as Gemma-2's layer_types) and gives its costs to the others."""
    from fitmap.simulation import costs as sim_module
    from fitmap.simulation.costs import fewer_layers, simulated_costs

    req = pipeline.PlanRequest(str(checkpoints(family)), make_machine("1x1GiB", "1GiB"), Workload(1, 48, 16))
    prep = pipeline.prepare(req)
    small, rep = fewer_layers(prep.skeleton)
    assert small is not None and len([u for u in small.units if u.layer is not None]) == 2
    if family == "gemma2":  # sliding and full attention alternate: two kinds
        assert set(rep.values()) == {0, 1}
    reduced = simulated_costs(prep, req.workload).profile(prep.skeleton, req.workload)
    monkeypatch.setattr(sim_module, "fewer_layers", lambda sk, trust=False: (None, {}))
    whole = simulated_costs(prep, req.workload).profile(prep.skeleton, req.workload)
    assert reduced.costs == whole.costs and reduced.image_tokens == whole.image_tokens


def test_deepseek_v3_is_measured_on_four_blocks():
    from fitmap.simulation.costs import fewer_layers

    prep = pipeline.prepare(pipeline.PlanRequest("deepseek-v3", make_machine("8x140GiB", "1GiB")))
    small, rep = fewer_layers(prep.skeleton)
    assert len([u for u in small.units if u.layer is not None]) == 4
    assert {rep[i] for i in range(3)} == {0} and {rep[i] for i in range(3, 61)} == {3}  # 3 dense, 58 MoE


class _KernelInterface:
    """Triton's launch protocol (``triton.runtime.jit.KernelInterface``): ``kernel[grid](*args)``
    calls ``kernel.run(*args, grid=grid, warmup=False)``, which reads each tensor's raw pointer."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)


class _RotaryKernel(_KernelInterface):
    __name__ = "rotary_kernel"

    def __init__(self):
        self.launches = 0

    def run(self, *args, grid, warmup, **kwargs):
        [a.data_ptr() for a in args if isinstance(a, torch.Tensor)]  # fails on fake tensors, as in Triton
        self.launches += 1


def test_triton_kernels_in_model_code_launch_on_fake_devices(monkeypatch):
    """CogVLM2's rotary is a Triton kernel writing into ``empty_like(x)``: on fake devices the
    launch checks its operands' devices and leaves the output; on real tensors it runs."""
    import sys
    import types

    from torch._subclasses.fake_tensor import FakeTensorMode

    from fitmap.simulation.fake import fake_device, gpu_attention_kernels
    from fitmap.simulation.memory import MemoryTracker

    jit = types.ModuleType("triton.runtime.jit")
    jit.KernelInterface = _KernelInterface
    monkeypatch.setitem(sys.modules, "triton.runtime.jit", jit)
    kernel = _RotaryKernel()
    with gpu_attention_kernels():
        x = torch.ones(2, 4)
        kernel[(1,)](torch.empty_like(x), x, 4)
        assert kernel.launches == 1
        tracker = MemoryTracker()
        with FakeTensorMode(allow_non_fake_inputs=True), tracker:
            x = torch.ones(2, 4, device=fake_device(0))
            out = torch.empty_like(x)
            kernel[(1,)](out, x, 4)  # same device: no launch, no error
            cos = torch.ones(2, 4, device=fake_device(1))
            with pytest.raises(RuntimeError, match="same device"):
                kernel[(1,)](out, x, cos)
        assert kernel.launches == 1
        assert tracker.mismatch is not None and tracker.mismatch.op == "Triton kernel rotary_kernel"
        assert set(tracker.mismatch.devices) == {"0", "1"}
    assert jit.KernelInterface.__getitem__ is _KernelInterface.__getitem__  # restored
