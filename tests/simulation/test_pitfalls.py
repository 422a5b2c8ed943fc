"""The device mismatches users report, reproduced by tiny remote-code models (tests/pitfalls).

For each model: the hand-written map users would try fails in simulation with the
error they see on real GPUs; ``check`` repairs it with a few hooks (no unit moves);
the repaired plan simulates clean; and a real CPU run with the runtime's boundary
hooks and the repairs gives the unsplit model's greedy tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import transformers

from fitmap import pipeline
from fitmap.dispatch import hooks, repairs
from fitmap.planning.devices import make_machine
from fitmap.planning.plan import Plan
from fitmap.planning.workload import Workload
from fitmap.simulation import vision_inputs
from fitmap.simulation.check import CheckReport, check
from fitmap.simulation.memory import Simulation
from fitmap.simulation.simulate import simulate
from tests.pitfalls import PITFALLS, make_pitfall

CPU = torch.device("cpu")
IMAGE_TOKEN, IMAGE_TOKENS = 500, 4  # tests/pitfalls/vlm: a 28x28 image in 14x14 patches


# (module the mismatch happens in, op, the model's file in the code line)
FAILS_IN = {
    "glm": ("transformer.encoder", "aten.cat", "modeling_pitfall_glm.py"),
    "vlm": ("", "aten.masked_scatter", "modeling_pitfall_vlm.py"),
    "tied": ("lm_head", None, "modeling_pitfall_tied.py"),
    "rope": ("model.blocks.2.attn.rotary_emb", "aten.mul", "modeling_pitfall_rope.py"),
    "nexttok": ("", "aten.cat", "modeling_pitfall_nexttok.py"),
}

REPAIRED_BY = {
    "glm": {
        ("align-outputs", "transformer.encoder.layers.2", "0"),
        ("align-outputs", "transformer.encoder.layers.3", "0"),
    },
    "vlm": {("align-outputs", "mlp1", "0")},
    "tied": {("align-inputs", "lm_head", "0")},
    "rope": {
        ("align-inputs", "model.blocks.2.attn.rotary_emb", "0"),
        ("follow-inputs", "model.blocks.2.attn.rotary_emb", "1"),
        ("align-inputs", "model.blocks.3.attn.rotary_emb", "0"),
        ("follow-inputs", "model.blocks.3.attn.rotary_emb", "1"),
    },
    "nexttok": {("align-outputs", "lm_head", "0")},
}


@contextlib.contextmanager
def llava_layout_inputs():
    """The pitfall VLM takes LLaVA's inputs (pixel_values [images, 3, S, S], one image
    token per feature); fitmap's input builder knows families by model type."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(vision_inputs._FAMILIES, "pitfall_vlm", vision_inputs._llava)
        yield


@dataclass
class Case:
    directory: Path
    prep: pipeline.Prepared
    bare: Plan
    sim: Simulation  # the bare map, simulated
    report: CheckReport  # check of the bare map

    def simulate(self, plan: Plan) -> Simulation:
        sk = self.prep.skeleton
        with llava_layout_inputs():
            return simulate(sk.config, self.prep.inventory.task, sk, plan, trust_remote_code=True)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("pitfalls")
    cache: dict[str, Case] = {}

    def get(name: str, **config) -> Case:
        key = name + repr(sorted(config.items()))
        if key not in cache:
            cache[key] = _case(make_pitfall(name, root, **config), name)
        return cache[key]

    return get


def _case(directory: Path, name: str) -> Case:
    images = ((28, 28),) if name == "vlm" else ()
    req = pipeline.PlanRequest(
        str(directory),
        make_machine("2x16GiB", "8GiB"),
        Workload(2, 12, 4, images),
        trust_remote_code=True,
        estimate="analytic",
    )
    prep = pipeline.prepare(req)
    bare_map = PITFALLS[name].bare_map
    assert list(bare_map) == [u.name for u in prep.skeleton.units], "the bare map places every unit, in order"
    bare = replace(pipeline.plan(req, prep), device_map=bare_map, repairs=())
    sk = prep.skeleton
    with llava_layout_inputs():
        sim = simulate(sk.config, prep.inventory.task, sk, bare, trust_remote_code=True)
        report = check(sk.config, prep.inventory.task, sk, bare, trust_remote_code=True)
    return Case(directory, prep, bare, sim, report)


# --------------------------------------------------------------------------- simulation
@pytest.mark.parametrize("name", list(PITFALLS))
def test_bare_map_fails_with_the_error_users_see(case, name):
    m = case(name).sim.mismatch
    assert m is not None, f"{name}: the hand-written map should fail"
    module, op, source = FAILS_IN[name]
    assert m.module == module and set(m.devices) == {"0", "1"}
    assert op is None or m.op == op
    msg = m.message()
    assert "Expected all tensors to be on the same device, but found at least two devices" in msg
    assert "cuda:0" in msg and "cuda:1" in msg and "meta" not in msg
    assert (module or "the top-level model") in msg
    file, line, code = m.code.split(":", 2)
    assert file == source and line.isdigit() and code.strip(), m.code


@pytest.mark.parametrize("name", list(PITFALLS))
def test_check_repairs_it_with_hooks_only(case, name):
    c = case(name)
    assert c.report.clean and c.report.mismatches[0] == c.sim.mismatch
    assert {(r.kind, r.module, r.device) for r in c.report.repairs} == REPAIRED_BY[name]
    assert c.report.plan.device_map == c.bare.device_map  # nothing had to move
    assert c.report.plan.repairs == c.report.repairs


@pytest.mark.parametrize("name", list(PITFALLS))
def test_repaired_plan_simulates_clean(case, name):
    c = case(name)
    sim = c.simulate(c.report.plan)
    assert sim.mismatch is None and sim.stage == "done"
    assert {d.device for d in sim.devices} >= {"0", "1"}


def test_blocks_are_found_without_no_split_modules(case):
    """nexttok declares no ``_no_split_modules``: its blocks are the repeated ModuleList children."""
    sk = case("nexttok").prep.skeleton
    assert sk.no_split == ("DecoderLayer",)
    assert [u.layer for u in sk.units if u.kind == "block"] == [0, 1, 2, 3]


def test_a_repair_that_changes_nothing_is_taken_back(case):
    """rope: aligning the rotary module's inputs to its own layer's device is the first idea; the same
    mismatch comes back, so the repair is dropped and "run it where the tables are" is tried."""
    report = case("rope").report
    assert [(r.kind, r.module, r.device) for r in report.tried] == [
        ("align-inputs", "model.blocks.2.attn.rotary_emb", "1")
    ]
    assert len(report.mismatches) == 1


# --------------------------------------------------------------------------- real run
def _prompt(name: str) -> dict[str, torch.Tensor]:
    if name != "vlm":
        return {"input_ids": torch.tensor([[1, 5, 7, 9, 11, 13], [1, 40, 41, 42, 43, 44]])}
    image = [IMAGE_TOKEN] * IMAGE_TOKENS
    torch.manual_seed(1)
    return {
        "input_ids": torch.tensor([[1, *image, 7, 9], [1, *image, 70, 90]]),
        "pixel_values": torch.randn(2, 3, 28, 28),
    }


def _greedy(model, name: str) -> torch.Tensor:
    return model.generate(**_prompt(name), max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("name", list(PITFALLS))
def test_real_cpu_run_with_hooks_and_repairs_matches_unsplit(case, name):
    c = case(name)
    load = transformers.AutoModelForCausalLM.from_pretrained
    expected = _greedy(load(c.directory, trust_remote_code=True).eval(), name)
    model = load(c.directory, trust_remote_code=True).eval()
    boundary = hooks.attach(model, {u: CPU for u in c.report.plan.device_map}, CPU)
    handles = repairs.apply(model, c.report.plan.repairs, lambda device: CPU)
    assert len(handles) >= len(c.report.plan.repairs)
    got = _greedy(model, name)
    assert torch.equal(got, expected), f"{name}: {got.tolist()} != {expected.tolist()}"
    assert got.shape[1] == _prompt(name)["input_ids"].shape[1] + 6
    boundary.remove()
    for h in handles:
        h.remove()
