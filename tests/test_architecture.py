"""The package's shape: every documented public name imports, and fitmap's own import graph has no
cycle (the layers themselves are checked by ``lint-imports`` in ``make test``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import fitmap

DOCUMENTED = [
    (
        "fitmap",
        [
            "plan",
            "check",
            "load",
            "Plan",
            "Workload",
            "FitmapError",
            "BadInput",
            "CheckpointError",
            "DoesNotFit",
            "DeviceMismatch",
            "__version__",
        ],
    ),
    ("fitmap.cli", ["main", "build_parser"]),
    ("fitmap.pipeline", ["PlanRequest", "prepare", "plan"]),
    ("fitmap.planning.plan", ["Plan", "DeviceLedger", "Repair", "make_plan"]),
    ("fitmap.planning.devices", ["make_machine", "Machine", "GpuSpec"]),
    ("fitmap.planning.solver", ["solve", "Item", "Gpu", "Tiers", "Policy", "Assignment"]),
    ("fitmap.planning.images", ["image_shape", "ImageShape"]),
    ("fitmap.model.inventory", ["inventory", "Inventory"]),
    ("fitmap.model.skeleton", ["skeleton", "Skeleton", "Unit", "Group"]),
    ("fitmap.simulation.simulate", ["simulate", "Simulation"]),
    ("fitmap.simulation.check", ["check", "CheckReport"]),
    ("fitmap.simulation.costs", ["simulated_costs", "SimulatedCosts"]),
    ("fitmap.runtime.loader", ["load", "LoadedModel"]),
    ("fitmap.runtime.run", ["answer"]),
    ("fitmap.serve.placement", ["serve_plan"]),
]


@pytest.mark.parametrize(("module", "names"), DOCUMENTED)
def test_every_documented_name_imports(module, names):
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


def test_the_public_plan_is_the_function():
    from fitmap import plan

    assert callable(plan) and plan is fitmap.plan and plan.__module__ == "fitmap"


def _graph() -> dict[str, set[str]]:
    """fitmap's modules and the fitmap modules each imports (at any depth in its code)."""
    import grimp

    graph = grimp.build_graph("fitmap")
    return {m: {d for d in graph.find_modules_directly_imported_by(m)} for m in graph.modules}


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d == "fitmap" or d.startswith(m + "."):  # the package's own __init__ and its children
                continue
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m != "fitmap" and m not in state and (cycle := visit(m)):
            pytest.fail(" -> ".join(cycle))


def test_modules_stay_readable():
    """One screen-ish module per job; the solver is one algorithm whose helpers share private types
    (see docs/architecture.md)."""
    allowed = {"planning/solver.py": 600}
    root = Path(fitmap.__file__).parent
    long = {
        str(p.relative_to(root)): n
        for p in root.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > allowed.get(str(p.relative_to(root)), 560)
    }
    assert not long, long
