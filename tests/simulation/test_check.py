"""fitmap check: clean plans stay untouched, repairs survive the plan file, and what
cannot be repaired ends in one clear DeviceMismatch."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from fitmap import pipeline
from fitmap.dispatch import repairs
from fitmap.errors import DeviceMismatch
from fitmap.planning.devices import make_machine
from fitmap.planning.plan import Plan, Repair
from fitmap.planning.workload import Workload
from fitmap.simulation.check import check, propose, raise_unrepaired
from fitmap.simulation.fake import fake_device
from fitmap.simulation.memory import Mismatch
from fitmap.simulation.simulate import simulate
from tests.pitfalls import PITFALLS, make_pitfall


def _prepared(model: str, workload: Workload, trust_remote_code: bool = False):
    req = pipeline.PlanRequest(
        model, make_machine("2x16GiB", "64GiB"), workload, trust_remote_code=trust_remote_code, estimate="analytic"
    )
    prep = pipeline.prepare(req)
    return prep, pipeline.plan(req, prep)


def _check(prep, plan, **kw):
    sk = prep.skeleton
    return check(sk.config, prep.inventory.task, sk, plan, trust_remote_code=True, **kw)


def test_clean_catalog_plan_has_no_mismatch_and_no_repair():
    prep, plan = _prepared("llama-3.1-8b", Workload(1, 128, 16))
    assert len({str(d) for d in plan.device_map.values()}) == 2, "the plan should use both GPUs"
    report = check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan)
    assert report.clean and report.mismatches == () and report.repairs == () and report.tried == ()
    assert report.plan.device_map == plan.device_map and report.plan.estimate == "simulate"
    assert {d.device for d in report.devices} >= {"0", "1"}
    assert all(d.weights_bytes > 0 and d.peak_bytes >= d.weights_bytes for d in report.devices if d.device != "cpu")
    raise_unrepaired(report)  # nothing to raise


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """ChatGLM's cross-layer KV cat on the hand-written two-GPU map, checked."""
    prep, plan = _prepared(str(make_pitfall("glm", tmp_path_factory.mktemp("glm"))), Workload(1, 8, 2), True)
    bare = replace(plan, device_map=PITFALLS["glm"].bare_map, repairs=())
    return prep, bare, _check(prep, bare)


def test_repairs_round_trip_through_the_plan_json(glm, tmp_path):
    prep, _, report = glm
    assert report.clean and report.repairs
    path = tmp_path / "plan.json"
    report.plan.save(path)
    loaded = Plan.load(path)
    assert loaded.repairs == report.plan.repairs and loaded.device_map == report.plan.device_map
    assert json.loads(path.read_text())["repairs"][0] == {
        "kind": "align-outputs",
        "module": "transformer.encoder.layers.2",
        "device": "0",
        "reason": "aten.cat in transformer.encoder needs it on 0",
    }
    sk = prep.skeleton
    sim = simulate(sk.config, prep.inventory.task, sk, loaded, trust_remote_code=True)
    assert sim.mismatch is None and sim.stage == "done"
    again = _check(prep, loaded)  # a checked plan checks clean, with nothing added
    assert again.clean and again.repairs == () and again.plan.repairs == loaded.repairs


def test_out_of_rounds_keeps_only_simulated_repairs_and_raises(glm):
    prep, bare, _ = glm
    report = _check(prep, bare, max_rounds=1)
    assert not report.clean and report.repairs == () and report.plan.repairs == ()
    with pytest.raises(DeviceMismatch, match=r"aten\.cat in transformer\.encoder .* cuda:0 and cuda:1"):
        raise_unrepaired(report)


def test_unrepairable_mismatch_ends_in_a_clear_device_mismatch(tmp_path):
    """The model itself moves the next token to the CPU (numpy-style post-processing):
    no hook or device map can change that."""
    directory = make_pitfall("nexttok", tmp_path, greedy_on_cpu=True)
    prep, plan = _prepared(str(directory), Workload(1, 8, 2), True)
    report = _check(prep, replace(plan, device_map=PITFALLS["nexttok"].bare_map, repairs=()))
    assert not report.clean and report.repairs == () and report.plan.repairs == ()
    assert report.mismatches[-1].devices == ("0", "cpu")
    with pytest.raises(DeviceMismatch) as e:
        raise_unrepaired(report)
    msg = str(e.value)
    assert "found at least two devices, cuda:0 and cpu" in msg
    assert "modeling_pitfall_nexttok.py:" in msg and "torch.cat((input_ids, next_tokens)" in msg
    assert "no device map can fix it" in msg


def _mismatch(module: str, unit: str | None, operands, op: str = "aten.mul") -> Mismatch:
    devices = tuple(dict.fromkeys(d for d, _, _ in operands))
    return Mismatch(op, devices, module, unit, "m.py:1: x", tuple(operands))


PLACED = {"embed": "0", "layers.0": "0", "layers.1": "0", "layers.2": "1", "layers.3": "1", "head": "1"}


def test_a_repair_in_one_block_is_made_in_every_block_placed_elsewhere():
    m = _mismatch("", None, [("0", None, False), ("1", "layers.2.kv", False)], "aten.cat")
    remedy = propose(m, [], PLACED)
    assert [(r.kind, r.module, r.device) for r in remedy] == [
        ("align-outputs", "layers.2.kv", "0"),
        ("align-outputs", "layers.3.kv", "0"),
    ]


def test_a_module_met_from_several_devices_answers_its_caller():
    """rotary aligned to 0 for one caller, then needed on 1 by another: its outputs follow its inputs."""
    fixes = [Repair("align-outputs", "rotary", "0")]
    m = _mismatch("layers.2.attn", "layers.2", [("1", None, False), ("0", "rotary", False)])
    assert [(r.kind, r.module) for r in propose(m, fixes, PLACED | {"rotary": "0"})] == [("follow-inputs", "rotary")]


def test_colocation_comes_last():
    m = _mismatch("layers.2.attn", "layers.2", [("1", None, False), ("0", "embed", False)])
    tried = {("align-outputs", "embed", "1"), ("align-inputs", "layers.2.attn", "1")}
    assert [(r.kind, r.module, r.device) for r in propose(m, [], PLACED, tried)] == [("colocate", "embed", "1")]


def test_run_there_and_answer_the_caller_on_fake_devices():
    """align-inputs to the module's state + follow-inputs: computed on meta:0, returned where the caller is."""

    class Scale(nn.Module):
        def forward(self, x):
            return x * self.table

    with FakeTensorMode(allow_non_fake_inputs=True):
        m = Scale()
        m.table = torch.ones(4, device="meta:0")
        x = torch.ones(2, 4, device="meta:1")
        with pytest.raises(RuntimeError, match="found at least two devices"):
            m(x)
        fixes = [Repair("align-inputs", "", "0"), Repair("follow-inputs", "", "1")]  # the order check writes them
        handles = repairs.apply(m, fixes, fake_device)
        assert m(x).device == torch.device("meta:1")
        assert m(torch.ones(2, 4, device="meta:0")).device == torch.device("meta:0")
        for h in handles:
            h.remove()


def test_plan_check_replans_with_the_headroom_its_replay_needed(checkpoints):
    """When the full replay peaks above the plan's estimate on a GPU, `plan --check` plans again with that
    GPU's reserve raised by the difference, and checks the new plan."""
    from dataclasses import replace as dc_replace
    from types import SimpleNamespace

    from fitmap import pipeline
    from fitmap.cli.plan_commands import _replan_with_headroom
    from fitmap.planning.devices import make_machine
    from fitmap.planning.workload import Workload

    req = pipeline.PlanRequest(str(checkpoints("llama")), make_machine("2x1GiB", None), Workload(1, 64, 8))
    prep = pipeline.prepare(req)
    planned = pipeline.plan(req, prep)
    over = 64 * 2**20
    replay = SimpleNamespace(
        predicted=[dc_replace(d, total_bytes=d.total_bytes + (over if d.device == "1" else 0)) for d in planned.devices]
    )
    again, rechecked, extra = _replan_with_headroom(
        req, prep, planned, replay, SimpleNamespace(trust_remote_code=False)
    )
    assert extra == {"1": over} and rechecked.fits and rechecked.clean
    before = {d.device: d.reserve_bytes for d in planned.devices}
    for d in again.devices:  # a GPU the new plan leaves empty keeps nothing back
        if d.units:
            assert d.reserve_bytes == before[d.device] + (over if d.device == "1" else 0), d.device
