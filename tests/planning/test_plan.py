import json

import pytest
import torch

import fitmap
from fitmap import pipeline
from fitmap.errors import BadInput
from fitmap.planning.devices import make_machine
from fitmap.planning.plan import Plan
from fitmap.planning.workload import Workload


def _gpu_utils(plan):
    return [d.utilization for d in plan.devices if d.device.isdigit()]


def test_llama_70b_on_4x40_is_balanced():
    plan = fitmap.plan("llama-3.1-70b", "4x40GiB", "64GiB", batch=4, prompt=4096, new=1024)  # simulated costs
    assert plan.estimate == "simulate"
    assert plan.fits
    utils = _gpu_utils(plan)
    assert max(utils) <= 1 and max(utils) - min(utils) <= 0.10
    assert not [u for u, d in plan.device_map.items() if d in ("cpu", "disk")]
    # every GPU holds a contiguous run of layers, in order
    layers = [plan.device_map[f"model.layers.{i}"] for i in range(80)]
    assert layers == sorted(layers)


def test_qwen2_vl_keeps_vision_projector_embeddings_together():
    plan = fitmap.plan(
        "qwen2-vl-7b", "2x16GiB", "64GiB", prompt=3000, new=1000, images=((1344, 1344),), estimate="analytic"
    )
    assert plan.fits
    dm = plan.device_map
    together = {dm["model.language_model.embed_tokens"], dm["model.visual.merger"], dm["model.visual.patch_embed"]}
    together |= {d for k, d in dm.items() if k.startswith("model.visual.blocks.")}
    assert len(together) == 1
    assert dm["lm_head"] == dm["model.language_model.norm"]


def test_impossible_request_reports_shortfall_and_a_way_to_fit():
    plan = fitmap.plan("llama-3.1-70b", "2x24GiB", "16GiB", prompt=4096, new=1024, estimate="analytic")
    assert not plan.fits and plan.shortfall_bytes > 0
    assert "more than 2 x 24.0 GiB GPUs" in plan.advice
    assert "--disk" in plan.advice or "--cpu" in plan.advice


def test_shorter_prompt_is_suggested_when_kv_is_the_problem():
    # weights fit on the GPUs; a huge context does not
    plan = fitmap.plan("llama-3.1-8b", "1x24GiB", "1GiB", batch=8, prompt=60000, new=1000, estimate="analytic")
    assert not plan.fits
    assert "--prompt" in plan.advice
    prompt = int(plan.advice.split("--prompt ")[1].split()[0].rstrip(","))
    assert fitmap.plan("llama-3.1-8b", "1x24GiB", "1GiB", batch=8, prompt=prompt, new=1000, estimate="analytic").fits
    assert not fitmap.plan(
        "llama-3.1-8b", "1x24GiB", "1GiB", batch=8, prompt=prompt + 1, new=1000, estimate="analytic"
    ).fits


def test_tied_model_keeps_embedding_and_head_on_one_device():
    plan = fitmap.plan("gemma-2-27b", "4x16GiB", "8GiB", prompt=1024, new=256, estimate="analytic")
    assert plan.fits
    assert plan.device_map["model.embed_tokens"] == plan.device_map["lm_head"]


def test_pins_are_respected():
    plan = fitmap.plan(
        "llama-3.1-8b", "2x24GiB", "8GiB", pins={"lm_head": "1", "model.layers.20": "0"}, estimate="analytic"
    )
    assert plan.device_map["lm_head"] == 1 and plan.device_map["model.norm"] == 1  # the group follows
    assert plan.device_map["model.layers.20"] == 0
    with pytest.raises(BadInput, match="no such module"):
        fitmap.plan("llama-3.1-8b", "2x24GiB", pins={"model.layerz.3": "0"}, estimate="analytic")
    with pytest.raises(BadInput, match="no such device"):
        fitmap.plan("llama-3.1-8b", "2x24GiB", pins={"lm_head": "7"}, estimate="analytic")


@pytest.mark.parametrize("policy", ["sequential", "min-gpus"])
def test_other_policies(policy):
    plan = fitmap.plan("llama-3.1-8b", "4x24GiB", "8GiB", policy=policy, estimate="analytic")
    assert plan.fits
    used = {d for d in plan.device_map.values()}
    if policy == "min-gpus":
        assert used == {0}
    else:
        assert 0 in used


def test_plan_json_round_trip(tmp_path):
    plan = fitmap.plan("qwen2-vl-7b", "2x16GiB", "8GiB", images=((448, 448),), estimate="analytic")
    f = tmp_path / "plan.json"
    plan.save(f)
    data = json.loads(f.read_text())
    assert data["fits"] is True and data["workload"]["images"] == ["448x448"]
    for d in data["devices"]:
        assert {
            "device",
            "capacity_bytes",
            "weights_bytes",
            "kv_bytes",
            "activation_bytes",
            "reserve_bytes",
            "total_bytes",
        } <= set(d)
    assert Plan.load(f) == plan


def test_cpu_only_machine_spills_to_disk(checkpoints, tmp_path):
    """No GPU: the CPU is the compute device and what does not fit goes to disk."""
    path = checkpoints("llama")
    budget = 800 * 1024  # bytes of RAM: less than the model (850 KiB)
    req = pipeline.PlanRequest(
        str(path), make_machine(None, budget, tmp_path, None), Workload(1, 16, 8), estimate="analytic"
    )
    plan = pipeline.plan(req)
    assert plan.fits
    values = set(plan.device_map.values())
    assert values == {"cpu", "disk"}
    cpu = next(d for d in plan.devices if d.device == "cpu")
    assert cpu.total_bytes <= budget


def test_cpu_only_machine_too_small_says_how_much_ram(checkpoints, tmp_path):
    req = pipeline.PlanRequest(
        str(checkpoints("llama")),
        make_machine(None, 300 * 1024, tmp_path, None),
        Workload(1, 16, 8),
        estimate="analytic",
    )
    plan = pipeline.plan(req)
    assert not plan.fits
    assert "Fits with --cpu" in plan.advice


def test_cpu_only_advice_without_disk_names_both_ways_and_each_fits(checkpoints, tmp_path):
    """Without --disk: all in RAM, or less RAM with a disk directory; each as its own option
    (it once said "--cpu <all in RAM> and --disk DIR", which asked for a disk it did not need)."""
    import re

    path = str(checkpoints("llama"))
    plan = pipeline.plan(
        pipeline.PlanRequest(path, make_machine(None, 300 * 1024), Workload(1, 16, 8), estimate="analytic")
    )
    m = re.search(r"Fits with --cpu (\S+), or with --cpu (\S+) and --disk DIR", plan.advice)
    assert m, plan.advice
    alone, streamed = m.groups()
    assert pipeline.plan(
        pipeline.PlanRequest(path, make_machine(None, alone), Workload(1, 16, 8), estimate="analytic")
    ).fits
    assert pipeline.plan(
        pipeline.PlanRequest(path, make_machine(None, streamed, tmp_path), Workload(1, 16, 8), estimate="analytic")
    ).fits


def test_device_map_is_accepted_by_from_pretrained(checkpoints, tmp_path):
    """transformers takes the plan's map as is, with cpu and disk entries, and gives the same logits."""
    from transformers import AutoModelForCausalLM

    path = checkpoints("llama")
    req = pipeline.PlanRequest(
        str(path), make_machine(None, 800 * 1024, tmp_path, None), Workload(1, 16, 8), estimate="analytic"
    )
    plan = pipeline.plan(req)
    assert {"cpu", "disk"} == set(plan.device_map.values())
    ref = AutoModelForCausalLM.from_pretrained(path)
    placed = AutoModelForCausalLM.from_pretrained(path, device_map=plan.device_map, offload_folder=tmp_path / "off")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(placed(ids).logits, ref(ids).logits)


def test_hypothetical_planning_is_fast_for_deepseek_v3():
    import time

    req = pipeline.PlanRequest(
        "deepseek-v3", make_machine("8x140GiB", "256GiB"), Workload(1, 4096, 1024), estimate="analytic"
    )
    prep = pipeline.prepare(req)
    t = time.perf_counter()
    plan = pipeline.plan(req, prep)
    elapsed = time.perf_counter() - t
    assert plan.fits
    print(f"deepseek-v3 plan: {elapsed:.3f} s")


@pytest.mark.parametrize("gpus,cpu", [(None, "16GiB"), ("2x24GiB", "1GiB"), ("2x24GiB", "30.1GiB")])
def test_advice_fits_when_followed(gpus, cpu, tmp_path):
    """The --cpu the advice names, typed back as printed, fits (it is rounded up, never down)."""
    import re

    import fitmap

    plan = fitmap.plan(
        "qwen2.5-72b", gpus=gpus, cpu=cpu, disk=str(tmp_path) if gpus is None else None, estimate="analytic"
    )
    assert not plan.fits
    m = re.search(r"--cpu (\S+)", plan.advice)
    assert m, plan.advice
    again = fitmap.plan(
        "qwen2.5-72b", gpus=gpus, cpu=m.group(1), disk=str(tmp_path) if gpus is None else None, estimate="analytic"
    )
    assert again.fits, (plan.advice, m.group(1))


def test_a_config_with_more_layers_than_the_weights_does_not_plan(checkpoints, tmp_path):
    import json
    import shutil

    import fitmap

    d = tmp_path / "m"
    shutil.copytree(checkpoints("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": cfg["num_hidden_layers"] + 2}))
    with pytest.raises(fitmap.CheckpointError, match=r"lack .* parameter\(s\) .*model\.layers\.4\."):
        fitmap.plan(str(d), estimate="analytic")


def test_simulated_costs_are_kept_for_the_next_plan(checkpoints, tmp_path, monkeypatch):
    """The same model and workload on another machine reuses the simulation (fitmap's cache)."""
    import fitmap
    from fitmap.simulation import costs

    monkeypatch.setenv("FITMAP_CACHE", str(tmp_path))
    runs = []
    real = costs.simulated_costs
    monkeypatch.setattr(costs, "simulated_costs", lambda *a, **k: runs.append(1) or real(*a, **k))
    d = str(checkpoints("llama"))
    first = fitmap.plan(d, gpus="2x1GiB", prompt=64, new=8)
    second = fitmap.plan(d, gpus="1x1GiB", cpu="1GiB", prompt=64, new=8)
    assert first.estimate == second.estimate == "simulate" and len(runs) == 1
    assert list((tmp_path / "costs").glob("*.json"))
    third = fitmap.plan(d, gpus="2x1GiB", prompt=64, new=8)
    gpus = lambda p: [d for d in p.devices if d.device != "cpu"]  # noqa: E731  (free RAM moves)
    assert gpus(third) == gpus(first) and len(runs) == 1
    fitmap.plan(d, gpus="2x1GiB", prompt=32, new=8)  # another workload: measured
    assert len(runs) == 2


@pytest.mark.parametrize(("gpus", "whole"), [("8x12GiB", True), ("16x9GiB", False)])
def test_an_input_side_larger_than_one_gpu_is_placed_apart_not_refused(gpus, whole, tmp_path):
    """InternVL-78B's input side (InternViT-6B + projector + a 128k-vocab embedding, 13 GiB) fits no
    12 GiB card: the tower and projector go to a GPU of their own (or, on 9 GiB cards, are split at their
    own blocks), apart from the embeddings, and the plan says so; the check replays it clean."""
    from fitmap.cli import main

    plan = fitmap.plan("internvl-78b", gpus, "200GiB", prompt=1024, new=128, images=((448, 448),), estimate="analytic")
    assert plan.fits and len(plan.notes) == 1 and "larger than one GPU" in plan.notes[0]
    tower = {plan.device_map[u] for u in plan.groups["vision"]}
    embeddings = {plan.device_map[u] for u in plan.groups["input"]}
    assert len(embeddings) == 1 and not tower & embeddings and (len(tower) == 1) == whole
    out = tmp_path / "plan.json"
    plan.save(out)
    assert Plan.load(out).notes == plan.notes
    assert main(["check", "internvl-78b", "--plan", str(out)]) == 0


def test_an_input_side_that_fits_stays_together():
    plan = fitmap.plan("internvl-78b", "8x24GiB", "200GiB", prompt=1024, new=128, estimate="analytic")
    assert plan.fits and not plan.notes and "vision" not in plan.groups
    assert len({plan.device_map[u] for u in plan.groups["input"]}) == 1
