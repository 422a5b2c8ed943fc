"""The pipeline's own decisions: a model's images recognised from its code when its config.json does
not name a vision tower, and a text model refused in one line."""

from __future__ import annotations

import json

import pytest

from fitmap import pipeline
from fitmap.errors import BadInput
from fitmap.planning.devices import make_machine
from fitmap.planning.workload import Workload
from tests.pitfalls import make_pitfall


def test_a_vlm_whose_config_json_names_no_vision_tower_takes_images(tmp_path):
    """Remote code whose forward takes ``pixel_values`` and whose config class supplies the tower's
    settings by default, with no ``vision_config`` key in config.json: --image is accepted and sized."""
    d = make_pitfall("vlm", tmp_path)
    config = json.loads((d / "config.json").read_text())
    del config["vision_config"]
    (d / "config.json").write_text(json.dumps(config))
    req = pipeline.PlanRequest(
        str(d),
        make_machine("2x1GiB", "1GiB"),
        Workload(1, 16, 4, ((28, 28),)),
        trust_remote_code=True,
        estimate="analytic",
    )
    prep = pipeline.prepare(req)
    assert prep.inventory.task == "causal-lm"  # what config.json alone says
    plan = pipeline.plan(req, prep)
    assert plan.fits and prep.inventory.task == "image-text-to-text"
    assert (
        plan.devices[0].activation_bytes
        > pipeline.plan(
            pipeline.PlanRequest(
                str(d), make_machine("2x1GiB", "1GiB"), Workload(1, 16, 4), trust_remote_code=True, estimate="analytic"
            )
        )
        .devices[0]
        .activation_bytes
    )


def test_a_text_model_with_an_image_is_refused_in_one_line(checkpoints):
    req = pipeline.PlanRequest(
        str(checkpoints("llama")), make_machine("1x1GiB", "1GiB"), Workload(1, 16, 4, ((28, 28),)), estimate="analytic"
    )
    with pytest.raises(BadInput, match=r"text model .* takes no images\): drop --image"):
        pipeline.plan(req)
