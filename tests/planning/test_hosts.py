"""A plan across hosts: each host a contiguous stage, the boundary's cost said, the hosts in the plan file."""

from __future__ import annotations

import pytest

import fitmap
from fitmap.errors import BadInput
from fitmap.pipeline import PlanRequest, plan
from fitmap.planning.devices import make_hosts, parse_hosts
from fitmap.planning.plan import Plan
from fitmap.planning.workload import Workload


def test_hosts_read_alike_and_named():
    alike = parse_hosts("2x(8x80GiB)")
    assert [h for h, _ in alike] == ["host0", "host1"] and all(len(g) == 8 for _, g in alike)
    named = parse_hosts("a:4x24GiB,b:2x48GiB")
    assert [(h, len(g)) for h, g in named] == [("a", 4), ("b", 2)]
    machine = make_hosts("a:4x24GiB,b:2x48GiB")
    assert [g.index for g in machine.gpus] == list(range(6))
    assert machine.host_of(3) == "a" and machine.host_of(4) == "b"


@pytest.mark.parametrize("bad", ["a:2x24GiB", "a:2x24GiB,a:2x24GiB", "a:2x24GiB,b:zz", "", "0x(2x24GiB)"])
def test_bad_hosts_say_what_to_write(bad):
    with pytest.raises(BadInput):
        make_hosts(bad)


def _hosts_in_order(p: Plan) -> list[str]:
    return [p.host_of(u) for u, d in p.device_map.items() if isinstance(d, int)]


@pytest.mark.parametrize(
    ("model", "hosts", "workload"),
    [
        ("llama-3.1-405b", "2x(8x80GiB)", Workload(1, 8192, 1024)),
        ("llama-3.1-70b-awq", "a:2x24GiB,b:2x24GiB", Workload(1, 2048, 512)),
    ],
)
def test_a_model_bigger_than_one_host_splits_once_between_hosts(model, hosts, workload, tmp_path):
    p = plan(PlanRequest(model, make_hosts(hosts), workload, estimate="analytic"))
    assert p.fits
    order = _hosts_in_order(p)
    assert sum(a != b for a, b in zip(order, order[1:])) == 1  # one stage boundary
    assert set(order) == set(p.hosts) and len(p.hosts) == 2
    assert any("1 stage boundary between hosts" in n for n in p.notes)
    p.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json").hosts == p.hosts  # one plan file for every host


def test_a_plan_across_hosts_checks_clean(capsys):
    from fitmap.cli import main

    code = main(["plan", "llama-3.1-70b-awq", "--hosts", "a:2x24GiB,b:2x24GiB", "--prompt", "2048", "--check"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert "no device mismatch" in out


def test_one_machine_plans_have_no_hosts():
    p = fitmap.plan("llama-3.1-8b", "2x24GiB", prompt=512, new=64, estimate="analytic")
    assert p.hosts == {} and "hosts" not in p.to_json()
