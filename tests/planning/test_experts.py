"""The planner computes MoE experts on the CPU where streaming them would be slower, and says why."""

from __future__ import annotations

import pytest
import torch

import fitmap
from fitmap.model.catalog_models import build_config, catalog_entry
from fitmap.planning.experts import CPU_COMPUTE, used_fraction


def _cpu_experts(plan) -> list[str]:
    return [u for u, d in plan.device_map.items() if d == CPU_COMPUTE]


@pytest.mark.parametrize(("name", "share"), [("mixtral-8x7b", 2 / 8), ("gpt-oss-120b", 4 / 128)])
def test_the_share_of_experts_a_token_uses_is_the_configs(name, share):
    assert used_fraction(build_config(catalog_entry(name))) == pytest.approx(share)


@pytest.mark.parametrize(
    ("name", "gpus", "cpu"), [("mixtral-8x7b", "1x24GiB", "96GiB"), ("gpt-oss-120b", "1x24GiB", "128GiB")]
)
def test_a_moe_model_bigger_than_its_gpu_runs_its_experts_on_the_cpu(name, gpus, cpu):
    plan = fitmap.plan(name, gpus, cpu, prompt=4096, new=512, estimate="analytic")
    assert plan.fits
    moved = _cpu_experts(plan)
    assert moved and all(m.endswith(".experts") for m in moved)
    blocks = [u for u in plan.device_map if u.startswith("model.layers.") and u.count(".") == 2]
    assert all(plan.device_map[b] == 0 for b in blocks)  # nothing streamed: every block's rest on the GPU
    cpu_ledger = next(d for d in plan.devices if d.device == "cpu")
    assert set(moved) <= set(cpu_ledger.units) and cpu_ledger.weights_bytes > 0
    assert any("computed on the CPU where they live" in n and "tok/s" in n for n in plan.notes)
    if name == "gpt-oss-120b":  # MXFP4 experts kept packed in RAM (4.25 bits a value), and said so
        assert cpu_ledger.weights_bytes < 50 * 2**30
        assert any("kept packed as MXFP4; a token unpacks" in n for n in plan.notes)
        assert plan.cpu_unpack_values > 0


def test_gpt_oss_120b_on_one_24gib_gpu_and_128gib_of_ram_checks_clean(capsys):
    """The issue's case: its MXFP4 experts stay packed in RAM (46 GiB for the 29 layers moved), so one 24 GiB GPU
    and 128 GiB of RAM fit, with a clean check."""
    from fitmap.cli import main

    args = ["plan", "gpt-oss-120b", "--gpus", "1x24GiB", "--prompt", "4096", "--new", "512"]
    code = main([*args, "--cpu", "128GiB", "--check"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert "no device mismatch" in out and "kept packed as MXFP4" in out


def test_a_moe_model_that_fits_its_gpus_keeps_its_experts_there():
    plan = fitmap.plan("mixtral-8x7b", "2x80GiB", "96GiB", prompt=512, new=64, estimate="analytic")
    assert plan.fits and not _cpu_experts(plan)


def test_a_tiny_moe_with_experts_on_the_cpu_replays_clean(checkpoints):
    """Fake GPU too small for the experts: they run on the CPU in the replay, no device mismatch."""
    from fitmap.pipeline import prepare_for
    from fitmap.simulation.check import check

    d = str(checkpoints("qwen3_moe"))
    plan = fitmap.plan(d, "1x523.2MiB", "1GiB", prompt=16, new=4)
    assert plan.fits and _cpu_experts(plan)
    prep = prepare_for(d, plan)
    report = check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan)
    assert report.clean and not report.mismatches
    cpu = next(p for p in report.devices if p.device == "cpu")
    assert cpu.weights_bytes == sum(u.expert_bytes for u in prep.skeleton.units if u.experts in _cpu_experts(plan))


def test_what_the_plan_expects_per_token_counts_the_routed_experts_not_a_stream():
    """With a calibration, the offload speed of a plan with its experts on the CPU is the routed experts'
    bytes over the RAM rate; none of those experts is counted as copied over PCIe."""
    from fitmap.planning.calibrate import Calibration, GpuCalibration, offload_speeds

    plan = fitmap.plan("mixtral-8x7b", "1x24GiB", "96GiB", prompt=4096, new=512, estimate="analytic")
    gpu = GpuCalibration(0, "card", 24 << 30, 1 << 29, 0.05, 25e9, 10e9)
    speeds = offload_speeds(plan, Calibration("h", "now", "2", (gpu,), "/d", 2e9, 40e9))
    assert [(s.tier, s.bytes_per_token) for s in speeds] == [("cpu-compute", plan.cpu_token_bytes)]
    cpu = next(d for d in plan.devices if d.device == "cpu")
    assert plan.cpu_compute_bytes == cpu.weights_bytes and 0 < plan.cpu_token_bytes < plan.cpu_compute_bytes


def test_the_plan_says_what_a_prefill_costs_on_the_cpu_against_copying_the_experts():
    """Per phase: a prefill's products on the CPU (at its matmul rate) or every expert some token picked
    read from RAM, against all of them copied over PCIe; the note says which is faster, and from how
    many tokens the copy wins."""
    from fitmap.planning import experts

    r = experts.Rates(pcie=25e9, ram=20e9, disk=2e9, measured=True, cpu_flops=1e12)
    gib = 1 << 30
    cpu1, gpu = experts.prefill_seconds(1, 64 * gib, 0.25, 2, r)
    assert gpu == 64 * gib / 25e9 and cpu1 == 64 * gib * 0.25 / 20e9  # one token: its quarter, read once
    cpu_long, _ = experts.prefill_seconds(4096, 64 * gib, 0.25, 2, r)
    assert cpu_long == 2 * 4096 * 64 * gib * 0.25 / 2 / 1e12  # compute-bound
    won = experts.copy_wins_from(64 * gib, 0.25, 2, r)
    assert won is not None and 1 < won < 16
    assert (
        experts.prefill_seconds(won, 64 * gib, 0.25, 2, r)[0]
        > gpu
        >= experts.prefill_seconds(won - 1, 64 * gib, 0.25, 2, r)[0]
    )
    slow_link = experts.Rates(pcie=1e9, ram=200e9, disk=2e9, measured=True, cpu_flops=50e12)
    assert experts.copy_wins_from(64 * gib, 0.25, 2, slow_link) > 100  # a fast CPU and slow link: the CPU, longer
    plan = fitmap.plan("mixtral-8x7b", gpus="1x24GiB", cpu="96GiB", prompt=4096, new=256, estimate="analytic")
    note = next(n for n in plan.notes if "computed on the CPU where they live" in n)
    assert "A prefill of 4096 tokens" in note and "the copy wins from about" in note


def test_experts_that_do_not_fit_in_ram_are_left_on_disk_and_read_per_routed_expert(tmp_path, capsys):
    """qwen3-235b-a22b in bf16 (438 GiB) on 2 x 24 GiB + 256 GiB: the experts of the first layers in RAM, those
    of the last on disk, of which a token reads only its routed ones; a clean check."""
    from fitmap.cli import main
    from fitmap.planning.experts import DISK_COMPUTE
    from fitmap.planning.plan import Plan

    args = ["plan", "qwen3-235b-a22b", "--gpus", "2x24GiB", "--cpu", "256GiB", "--disk", str(tmp_path / "offload")]
    out = tmp_path / "plan.json"
    assert main([*args, "--prompt", "4096", "--new", "512", "--check", "--out", str(out)]) == 0
    assert "no device mismatch" in capsys.readouterr().out
    plan = Plan.load(out)
    assert plan.fits
    in_ram, on_disk = _cpu_experts(plan), [u for u, d in plan.device_map.items() if d == DISK_COMPUTE]
    assert in_ram and on_disk and len(in_ram) + len(on_disk) == 94
    order = list(plan.device_map)
    assert max(map(order.index, in_ram)) < min(map(order.index, on_disk))  # the first layers in RAM
    disk = next(d for d in plan.devices if d.device == "disk")
    assert disk.weights_bytes == plan.disk_compute_bytes and set(on_disk) <= set(disk.units)
    assert plan.disk_token_bytes == pytest.approx(plan.disk_compute_bytes * 8 / 128, rel=1e-6)
    assert any("on disk, of which a token reads only its routed experts" in n for n in plan.notes)


def test_a_tiny_moe_planned_with_experts_on_disk_runs_with_from_pretraineds_tokens(checkpoints, tmp_path):
    from fitmap.runtime import loader
    from tests.runtime.test_loader import IDS, reference

    d = checkpoints("qwen3_moe")
    plan = fitmap.plan(str(d), "1x523.2MiB", "128KiB", disk=str(tmp_path), prompt=16, new=4)
    assert plan.fits and any(v == "disk-compute" for v in plan.device_map.values()), plan.notes
    want = reference(d).generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
    from dataclasses import replace

    # this machine has no GPU: GPU 0's units on the CPU, the experts where the plan put them
    on_cpu = {u: "cpu" if v == 0 else v for u, v in plan.device_map.items()}
    plan = replace(plan, device_map=on_cpu, devices=(), execution_device="cpu")
    with loader.load(d, plan, progress=False) as lm:
        assert torch.equal(lm.model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False), want)


def test_without_a_gpu_a_moe_bigger_than_ram_reads_its_routed_experts_from_disk(checkpoints, tmp_path):
    """No GPU, RAM for the rest and some experts, a disk tier: the experts of the last layers stay on disk
    (read per routed expert) instead of whole blocks streamed from there; the run gives from_pretrained's tokens."""
    from fitmap.planning.experts import DISK_COMPUTE
    from fitmap.runtime import loader
    from tests.runtime.test_loader import IDS, reference

    d = checkpoints("qwen3_moe")
    plan = fitmap.plan(str(d), None, "700KiB", disk=str(tmp_path), prompt=16, new=4)
    assert plan.fits and plan.execution_device == "cpu"
    assert any(v == DISK_COMPUTE for v in plan.device_map.values()), plan.notes
    assert not any(v == "disk" for v in plan.device_map.values())  # no block streamed whole
    assert any("reading whole blocks from disk" in n for n in plan.notes)
    want = reference(d).generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
    with loader.load(d, plan, progress=False) as lm:
        assert torch.equal(lm.model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False), want)


def test_a_moe_block_the_user_pins_to_disk_goes_there_whole(checkpoints, tmp_path):
    """A pin names the whole block: its experts are not split off to be computed on the CPU (the pin was
    refused as "not offloadable" before); the run gives from_pretrained's tokens."""
    from fitmap.runtime import loader
    from tests.runtime.test_loader import IDS, reference

    d = checkpoints("qwen3_moe")
    pins = {"model.layers.0": "disk", "model.layers.3": "disk"}
    plan = fitmap.plan(str(d), None, "700KiB", disk=str(tmp_path), prompt=16, new=4, pins=pins)
    assert plan.fits and all(plan.device_map[u] == "disk" for u in pins), plan.device_map
    want = reference(d).generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
    with loader.load(d, plan, progress=False) as lm:
        assert torch.equal(lm.model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False), want)


def test_fp8_experts_on_the_cpu_are_planned_at_their_stored_bytes(checkpoints, tmp_path):
    """A local FP8 checkpoint is sized unpacked where transformers unpacks it (no FP8 kernels); its experts
    computed on the CPU stay as stored, and what the plan puts in RAM for them says so: half of bf16."""
    from fitmap.model.inventory import inventory
    from fitmap.model.skeleton import skeleton
    from fitmap.planning.experts import ram_bytes
    from tests.runtime.test_loader import _deepseek_fp8

    d = _deepseek_fp8(checkpoints("deepseek_v3"), tmp_path / "fp8")
    sk = skeleton(inventory(d), torch.bfloat16)
    moe = [u for u in sk.units if u.experts]
    stored = sum(ram_bytes(sk, u) for u in moe)
    assert abs(stored - sum(u.expert_bytes for u in moe) / 2) < 100
