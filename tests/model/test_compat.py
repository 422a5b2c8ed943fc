"""What differs between transformers versions stays in fitmap.model.compat: fitmap's own calls use the
keyword the installed transformers expects, so plan, check and run raise no FutureWarning on any
supported version (5.25 renamed ``past_key_values`` to ``cache`` and warns at the old name)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers

import fitmap
from fitmap.cli.demo import demo_checkpoint, demo_image
from fitmap.model import compat
from fitmap.pipeline import PlanRequest, prepare
from fitmap.planning.devices import make_machine
from fitmap.runtime.prompting import open_image
from fitmap.runtime.run import answer
from fitmap.simulation.check import check


def test_the_cache_keyword_is_the_one_the_forward_takes():
    model = transformers.Qwen2ForCausalLM
    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert compat._cache_keyword(model.forward) == expected


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_plan_check_and_run_raise_no_future_warning(checkpoints, tmp_path, family):
    d = str(checkpoints(family))
    images = ((100, 80),) if family == "qwen2_vl" else ()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.filterwarnings("error", category=DeprecationWarning, module="fitmap")
        plan = fitmap.plan(d, gpus="2x1GiB", prompt=32, new=8, images=images)
        assert plan.estimate == "simulate"
        prep = prepare(PlanRequest(d, make_machine("2x1GiB", None, None)))
        assert check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan).clean


def test_a_run_with_an_image_raises_no_future_warning(tmp_path):
    path, image = demo_checkpoint(tmp_path), demo_image(tmp_path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.filterwarnings("error", category=DeprecationWarning, module="fitmap")
        got = answer(
            str(path),
            "describe this image .",
            [open_image(image)],
            4,
            make_machine(None, int(size * 0.65), tmp_path / "offload"),
            out=None,
        )
    assert got.new_tokens == 4 and "disk" in set(got.plan.device_map.values())
    assert torch.get_default_dtype() == torch.float32
