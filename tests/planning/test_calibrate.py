"""fitmap calibrate: measured once per machine, saved in fitmap's cache, read by plan."""

import json
import platform

import pytest
import torch

from fitmap.cli import main
from fitmap.planning import calibrate, devices
from fitmap.sizes import GiB, MiB


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FITMAP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_on_a_cpu_machine_it_measures_the_disk_and_says_there_is_no_gpu(cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["calibrate", "--disk", str(tmp_path / "disk"), "--size", "16MiB"])
    out = capsys.readouterr().out
    assert code == 0 and "no GPU" in out and "GB/s cold sequential read" in out
    cal = calibrate.load()
    assert cal is not None and cal.gpus == () and cal.disk_read > 0 and cal.ram_copy > 0
    assert cal.disk_dir == str(tmp_path / "disk") and not list((tmp_path / "disk").iterdir())  # test file removed
    assert main(["calibrate", "--show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["disk_read"] == cal.disk_read


@pytest.mark.parametrize(
    "args,needle",
    [
        (["calibrate", "--show"], "no calibration of this machine"),
        (["calibrate", "--size", "1MiB"], "too small"),
        (["calibrate", "--size", "lots"], "cannot read size"),
        (["calibrate", "--peer"], "start it on every host with torchrun"),
    ],
)
def test_bad_input_is_one_line(cache, capsys, args, needle):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def _saved(cache, gpus=(), disk_read=1e9):
    cal = calibrate.Calibration(
        platform.node(), "2026-11-27T00:00:00+00:00", "x", tuple(gpus), str(cache), disk_read, 10e9
    )
    calibrate.save(cal)
    return cal


def test_plan_takes_the_reserve_of_a_calibrated_gpu(cache, monkeypatch):
    monkeypatch.setattr(devices, "detected_gpus", lambda: [("NVIDIA H200", 140 * GiB), ("NVIDIA H200", 140 * GiB)])
    default = devices.parse_gpus("0,1")
    assert {g.reserve_source for g in default} == {"default"}
    g0 = calibrate.GpuCalibration(0, "NVIDIA H200", 140 * GiB, 600 * MiB, 0.01, 50e9, 8e9)
    _saved(cache, [g0])
    gpus = devices.parse_gpus("0,1:40GiB")
    assert gpus[0].reserve == 600 * MiB + int(0.01 * 140 * GiB) + calibrate.SAFETY
    assert gpus[0].reserve_source == "calibrated" and gpus[0].reserve < default[0].reserve
    assert gpus[1].reserve_source == "default"  # GPU 1 was not measured
    assert devices.parse_gpus("0", reserve=GiB)[0].reserve_source == "--reserve"
    other = calibrate.Calibration("another-host", "", "x", (g0,), "", 1e9, 1e9)
    calibrate.save(other)
    assert calibrate.load() is None  # made on another machine: not used


def test_plan_reports_what_the_offload_tiers_allow(cache, checkpoints, tmp_path, capsys):
    d = str(checkpoints("llama"))
    args = [
        "plan",
        d,
        "--cpu",
        "800KiB",
        "--disk",
        str(tmp_path),
        "--prompt",
        "16",
        "--new",
        "8",
        "--estimate",
        "analytic",
        "--json",
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["offload_speed"] == {"calibrated": False}
    _saved(cache, disk_read=2e9)
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    speed = data["offload_speed"]
    disk = next(t for t in speed["tiers"] if t["tier"] == "disk")
    ledger = next(x for x in data["devices"] if x["device"] == "disk")
    assert disk["bytes_per_token"] == ledger["weights_bytes"] and disk["bytes_per_second"] == 2e9
    assert speed["max_tokens_per_second"] == pytest.approx(1 / max(t["seconds_per_token"] for t in speed["tiers"]))
    assert main(args[:-1]) == 0  # the table: one line says it
    assert "offload bounds decode at" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_measurements(cache, tmp_path):
    cal = calibrate.measure(tmp_path, 64 * MiB)
    g = cal.gpus[0]
    assert 50 * MiB < g.fixed_bytes < 4 * GiB and 0 <= g.allocator_fraction < 0.5
    assert g.h2d_pinned > g.h2d_pageable / 2 > 0


def test_the_link_to_another_host_is_measured_under_torchrun_and_costs_the_plans_boundaries(cache, tmp_path):
    """Two processes on loopback (gloo): rank 0 saves the link; a plan across hosts then prices its stage
    boundary at the measured rate instead of the assumed 25 Gb/s."""
    import os
    import subprocess
    import sys
    from dataclasses import replace
    from pathlib import Path

    from fitmap.pipeline import PlanRequest, plan
    from fitmap.planning.devices import make_hosts
    from fitmap.planning.workload import Workload
    from tests.serve.server import free_port

    def note() -> str:
        req = PlanRequest("llama-3.1-70b-awq", make_hosts("a:2x24GiB,b:2x24GiB"), Workload(1, 1024, 128))
        return next(n for n in plan(replace(req, estimate="analytic")).notes if "stage boundar" in n)

    assert "assumed 25 Gb/s" in note()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "FITMAP_CACHE": str(cache)}
    done = subprocess.run(
        [torchrun, "--nproc-per-node=2", f"--master-port={free_port()}", "-m", "fitmap.cli", "calibrate", "--peer"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    link = calibrate.load_link()
    assert link is not None and link.bytes_per_s > 1e6 and 0 < link.latency_s < 1
    assert f"{link.bytes_per_s * 8 / 1e9:.2f} Gb/s" in done.stdout
    assert "fitmap calibrate --peer measured" in note()
