"""Image inputs made by the model's own processor (a tiny Gemma 3 with a real Gemma3Processor): the
planner simulates the model with them, counts image tokens as the processor places them, keeps the
vision side together, the check is clean, and a cpu + disk split answers about an image as
from_pretrained does."""

from __future__ import annotations

import pytest
import torch
import transformers

from fitmap.planning.workload import Workload
from fitmap.runtime import loader
from fitmap.simulation.vision_inputs import vision_inputs
from tests.tiny import gemma3_with_processor


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return gemma3_with_processor(tmp_path_factory.mktemp("vlm") / "gemma3")


@pytest.mark.parametrize("size", [(56, 40), (28, 28), (300, 120)])
def test_image_tokens_are_the_processors(gemma3, size):
    config = transformers.AutoConfig.from_pretrained(gemma3)
    inputs, tokens = vision_inputs(config, Workload(2, 32, 4, (size,)), torch.device("cpu"))
    assert tokens == 4  # mm_tokens_per_image: pooled to 4
    assert inputs["input_ids"].shape == (2, 32 + 4)  # the prompt's 32 text tokens + the image's
    assert int((inputs["input_ids"][0] == config.image_token_index).sum()) == 4
    assert inputs["pixel_values"].shape == (2, 3, 28, 28) and "token_type_ids" in inputs


def test_plan_with_an_image_is_simulated_with_the_vision_side_together_and_checks_clean(gemma3):
    import fitmap
    from fitmap.pipeline import PlanRequest, prepare
    from fitmap.planning.devices import make_machine
    from fitmap.simulation.check import check

    plan = fitmap.plan(str(gemma3), gpus="2x1GiB", prompt=64, new=8, images=((56, 40),))
    assert plan.fits and plan.estimate == "simulate"
    input_side = plan.groups["input"]
    assert any("vision_tower" in u for u in input_side) and any("projector" in u for u in input_side)
    assert len({plan.device_map[u] for u in input_side}) == 1
    prep = prepare(PlanRequest(str(gemma3), make_machine("2x1GiB", None, None)))
    report = check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan)
    assert report.clean


def test_cpu_and_disk_split_answers_about_an_image_as_from_pretrained(gemma3):
    from PIL import Image

    from fitmap.runtime.prompting import Prompter
    from tests.runtime.test_loader import plan_for

    config = transformers.AutoConfig.from_pretrained(gemma3)
    prompter = Prompter.for_model(gemma3, config)
    prompter.add_user("describe this image .", [Image.new("RGB", (56, 40), (200, 30, 30))])
    inputs = prompter.inputs(torch.device("cpu"))
    want = transformers.AutoModelForImageTextToText.from_pretrained(gemma3).eval()
    tokens = want.generate(**inputs, max_new_tokens=6, do_sample=False)
    layers = [u for u in plan_for(gemma3).device_map if ".language_model.layers." in u]
    with loader.load(gemma3, plan_for(gemma3, {layers[-1]: "disk"}), progress=False) as lm:
        got = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, tokens)


def test_without_a_processor_gemma3_is_shaped_from_its_config(checkpoints):
    """A checkpoint without processor files (and a catalog entry): the LLaVA-style builder with the count the
    config declares (mm_tokens_per_image); simulated, vision side together, check clean."""
    import fitmap
    from fitmap.pipeline import PlanRequest, prepare
    from fitmap.planning.devices import make_machine
    from fitmap.simulation.check import check

    d = checkpoints("gemma3")
    config = transformers.AutoConfig.from_pretrained(d)
    _, tokens = vision_inputs(config, Workload(1, 16, 4, ((56, 56),)), torch.device("cpu"))
    assert tokens == config.mm_tokens_per_image
    plan = fitmap.plan(str(d), gpus="2x1GiB", prompt=64, new=8, images=((56, 56),))
    assert plan.fits and plan.estimate == "simulate"
    prep = prepare(PlanRequest(str(d), make_machine("2x1GiB", None, None)))
    assert check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan).clean
