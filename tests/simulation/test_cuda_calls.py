"""Model code that calls CUDA itself (device contexts, set_device, current_device, synchronize,
streams, events, ``.cuda()``) is replayed on a machine without a GPU: the calls are answered on the
fake devices, the replay reports its peaks, and nothing of torch.cuda stays changed afterwards."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fitmap
from fitmap import pipeline
from fitmap.cli import main
from fitmap.planning.devices import make_machine
from fitmap.planning.workload import Workload
from fitmap.simulation.check import check
from fitmap.simulation.cuda_calls import cuda_calls_on_fakes
from fitmap.simulation.simulate import simulate
from tests.pitfalls import OTHERS, make_pitfall


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_pitfall("cudacalls", tmp_path_factory.mktemp("cudacalls"))


def test_the_model_really_calls_cuda_where_it_thinks_it_is_on_a_gpu():
    """Without the replay's answers the first call fails here, as it did for CogVLM2's rotary."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the calls would not fail")
    with pytest.raises((RuntimeError, AssertionError, AttributeError)):
        with torch.cuda.device(1):
            pass


def test_a_hand_written_map_replays_with_peaks_and_no_mismatch(model):
    req = pipeline.PlanRequest(
        str(model), make_machine("2x16GiB", "8GiB"), Workload(1, 16, 4), trust_remote_code=True, estimate="analytic"
    )
    prep = pipeline.prepare(req)
    bare = replace(pipeline.plan(req, prep), device_map=OTHERS["cudacalls"].bare_map, repairs=())
    sk = prep.skeleton
    sim = simulate(sk.config, prep.inventory.task, sk, bare, trust_remote_code=True)
    assert sim.mismatch is None and sim.stage == "done"
    assert {d.device for d in sim.devices} >= {"0", "1"} and all(d.peak_bytes > 0 for d in sim.devices)
    report = check(sk.config, prep.inventory.task, sk, bare, trust_remote_code=True)
    assert report.clean and not report.repairs


def test_plan_simulates_and_check_passes_from_the_command_line(model, tmp_path, capsys):
    plan = fitmap.plan(str(model), gpus="2x1GiB", prompt=16, new=4, trust_remote_code=True)
    assert plan.estimate == "simulate" and set(plan.device_map.values()) == {0, 1}
    out = tmp_path / "plan.json"
    plan.save(out)
    code = main(["check", str(model), "--plan", str(out), "--trust-remote-code"])
    text = " ".join(capsys.readouterr().out.split())
    assert code == 0 and "no device mismatch" in text


def _cuda_entry_points() -> tuple:
    return (
        torch.cuda.device,
        torch.cuda.set_device,
        torch.cuda.current_device,
        torch.cuda.synchronize,
        torch.cuda.Stream,
        torch.cuda.Event,
        torch.cuda.stream,
        torch.Tensor.cuda,
        torch.autocast,
    )


def test_cuda_calls_are_answered_on_fakes_and_restored():
    before = _cuda_entry_points()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, cuda_calls_on_fakes():
        x = mode.from_tensor(torch.ones(2, 3))
        assert x.cuda(1).device == torch.device("meta", 1)
        torch.cuda.set_device(1)
        assert torch.cuda.current_device() == 1 and x.cuda().device == torch.device("meta", 1)
        with torch.cuda.device("cuda:0"):
            assert torch.cuda.current_device() == 0
        assert torch.cuda.current_device() == 1
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.synchronize()
        assert event.query()
        assert torch.ones(2).cuda is not None  # a real tensor keeps torch's own .cuda
    after = _cuda_entry_points()
    assert after == before
