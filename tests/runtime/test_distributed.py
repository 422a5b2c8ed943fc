"""One plan run as pipeline stages in several processes started by torchrun (gloo on loopback): the
same greedy tokens as from_pretrained in one process; a rank that dies ends every rank with one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from tests.runtime.test_loader import IDS, plan_for
from tests.serve.server import free_port

DRIVER = Path(__file__).with_name("stages_driver.py")


def _torchrun(procs: int, model: Path, plan: Path, out: Path, new: int = 8, env: dict | None = None, timeout=240):
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        f"--nproc-per-node={procs}",
        f"--master-port={free_port()}",
        str(DRIVER),
        str(model),
        str(plan),
        str(out),
        str(new),
    ]
    environment = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "FITMAP_DIST_TIMEOUT": "20"} | (env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment)


@pytest.mark.parametrize("procs", [2, 3])
def test_stages_in_several_processes_give_from_pretraineds_tokens(checkpoints, tmp_path, procs):
    d = checkpoints("llama")
    plan_for(d).save(tmp_path / "plan.json")
    done = _torchrun(procs, d, tmp_path / "plan.json", tmp_path / "out.json")
    assert done.returncode == 0, done.stderr[-2000:]
    want = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    expected = want.generate(input_ids=IDS, max_new_tokens=8, do_sample=False)
    got = json.loads((tmp_path / "out.json").read_text())
    assert torch.equal(torch.tensor(got["tokens"]), expected)
    assert torch.equal(torch.tensor(got["again"]), expected[:1])  # a second generation gets a fresh cache
    # before loading, each rank says which files it reads: the last stage, not every shard
    said = _rank_lines(done.stderr, "reads")
    assert sorted(said) == list(range(procs))
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    last = [name for name in shards if name in said[procs - 1]]
    assert 0 < len(last) < len(shards)
    # after loading, each rank's weights measured from its tensors, beside what the plan's units for it weigh
    held = _rank_lines(done.stderr, "holds")
    assert sorted(held) == list(range(procs))
    for line in held.values():
        measured = _size(line.split(" holds ")[1].split(" on ")[0])
        planned = _size(line.split("for this rank: ")[1].split(" of weights")[0])
        assert planned > 0 and abs(measured - planned) <= 0.02 * planned + 4096, line


def _rank_lines(stderr: str, verb: str) -> dict[int, str]:
    """Each rank's line, found anywhere in the ranks' shared stderr: a line is one write, but another
    process's unfinished line (gloo's C++ logging, a progress bar) may stand before it."""
    return {int(m[1]): m[0] for m in re.finditer(rf"fitmap rank (\d+): {verb} [^\n]*", stderr)}


def _size(text: str) -> float:
    number, unit = text.split()
    return float(number) * 1024 ** ["B", "KiB", "MiB", "GiB", "TiB"].index(unit)


def test_a_vlm_split_across_processes_gives_from_pretraineds_tokens_with_an_image(checkpoints, tmp_path):
    """Qwen2-VL: vision tower and embeddings on rank 0, the text blocks cut in two; the mrope positions and
    the rotary tables the model hands its blocks travel with the hidden states."""
    from tests.runtime.stages_driver import image_inputs

    d = checkpoints("qwen2_vl")
    plan_for(d).save(tmp_path / "plan.json")
    done = _torchrun(2, d, tmp_path / "plan.json", tmp_path / "out.json", new=6)
    assert done.returncode == 0, done.stderr[-2000:]
    want = transformers.AutoModelForImageTextToText.from_pretrained(d).eval()
    expected = want.generate(**image_inputs(want.config), max_new_tokens=6, do_sample=False)
    got = json.loads((tmp_path / "out.json").read_text())
    assert torch.equal(torch.tensor(got["tokens"]), expected)
    assert torch.equal(torch.tensor(got["again"]), expected)


def test_a_rank_that_dies_ends_every_rank_with_one_line(checkpoints, tmp_path):
    d = checkpoints("llama")
    plan_for(d).save(tmp_path / "plan.json")
    start = time.monotonic()
    done = _torchrun(2, d, tmp_path / "plan.json", tmp_path / "out.json", new=32, env={"STAGES_DRIVER_KILL_RANK": "1"})
    assert time.monotonic() - start < 60
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("fitmap: ")]
    assert len(said) == 1 and said[0].startswith("fitmap: rank 1 (stage model.layers.2 .. model.layers.3) is gone:")
    assert not (tmp_path / "out.json").exists()


def test_a_rank_with_another_plan_file_stops_every_rank_before_loading(checkpoints, tmp_path):
    from dataclasses import replace

    from fitmap.planning.workload import Workload

    d = checkpoints("llama")
    plan = plan_for(d)
    plan.save(tmp_path / "plan.json")
    replace(plan, workload=Workload(1, 99, 9)).save(tmp_path / "other.json")
    done = _torchrun(
        2, d, tmp_path / "plan.json", tmp_path / "out.json", env={"STAGES_DRIVER_PLAN_1": str(tmp_path / "other.json")}
    )
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("fitmap: ")]
    assert said and all("rank 1's plan file differs from rank 0's" in line for line in said)
