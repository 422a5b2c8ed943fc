"""Vision-language models on fake devices: processor-shaped inputs, hybrid propagation."""

import pytest
import torch
import transformers
from torch._subclasses.fake_tensor import FakeTensorMode

from fitmap import pipeline
from fitmap.errors import BadInput
from fitmap.model.build import build_model
from fitmap.model.catalog_models import build_config, catalog_entry
from fitmap.model.compat import cache_of
from fitmap.planning.devices import make_machine
from fitmap.planning.images import image_shape
from fitmap.planning.workload import Workload
from fitmap.simulation import hybrid
from fitmap.simulation.simulate import simulate
from fitmap.simulation.vision_inputs import vision_inputs
from tests.tiny import config as tiny_config

# two images of different sizes (grids 6x8 and 4x4 patches), two sequences
TINY = Workload(2, 20, 5, ((100, 80), (56, 56)))


def _prepared(model, gpus, workload, cpu="64GiB"):
    req = pipeline.PlanRequest(str(model), make_machine(gpus, cpu), workload, estimate="analytic")
    prep = pipeline.prepare(req)
    return prep, pipeline.plan(req, prep)


def _image_tokens(config, workload):
    return sum(image_shape(config, w, h).tokens for w, h in workload.images)


def test_qwen2_vl_inputs_are_shaped_as_the_processor_makes_them():
    cfg = tiny_config("qwen2_vl")
    inputs, tokens = vision_inputs(cfg, TINY, torch.device("cpu"), torch.bfloat16)
    assert tokens == _image_tokens(cfg, TINY) == 12 + 4
    ids = inputs["input_ids"]
    assert ids.shape == (2, TINY.prompt + tokens) and ids.dtype == torch.long
    assert torch.equal(inputs["image_grid_thw"], torch.tensor([[1, 6, 8], [1, 4, 4]] * 2))
    pv = inputs["pixel_values"]
    assert pv.shape == (2 * (48 + 16), 3 * 2 * 14 * 14) and pv.dtype == torch.bfloat16
    assert torch.equal(inputs["mm_token_type_ids"], (ids == cfg.image_token_id).long())
    assert torch.equal(inputs["attention_mask"], torch.ones_like(ids))
    row = ids[0].tolist()
    for n in (12, 4):  # <|vision_start|> + one run of image tokens + <|vision_end|> per image
        start = row.index(cfg.vision_start_token_id)
        assert row[start + 1 : start + 1 + n] == [cfg.image_token_id] * n
        assert row[start + 1 + n] == cfg.vision_end_token_id
        row = row[start + n + 2 :]


def test_llava_and_internvl_inputs_match_the_image_token_counts():
    w = Workload(1, 100, 10, ((1344, 1344),))
    llava = build_config(catalog_entry("llava-1.5-13b"))
    inputs, tokens = vision_inputs(llava, w, torch.device("cpu"))
    assert tokens == 576 and inputs["pixel_values"].shape == (1, 3, 336, 336)
    assert inputs["pixel_values"].dtype == torch.float16  # the checkpoint's dtype
    assert (inputs["input_ids"] == llava.image_token_id).sum() == 576 and inputs["input_ids"].shape == (1, 676)
    internvl = build_config(catalog_entry("internvl-78b"))
    inputs, tokens = vision_inputs(internvl, w, torch.device("cpu"))
    assert image_shape(internvl, 1344, 1344).tiles == 10  # a 3x3 grid and the thumbnail
    assert tokens == 10 * 256 and inputs["pixel_values"].shape == (10, 3, 448, 448)
    assert (inputs["input_ids"] == internvl.image_token_id).sum() == tokens


def test_unknown_vision_family_says_so():
    cfg = transformers.Qwen2Config()
    cfg.model_type = "mystery_vl"
    with pytest.raises(BadInput, match="mystery_vl"):
        vision_inputs(cfg, TINY, torch.device("cpu"))


def test_tiny_qwen2_vl_simulates_with_images_on_two_fake_gpus(checkpoints):
    prep, plan = _prepared(checkpoints("qwen2_vl"), "2x1MiB", TINY, cpu="1MiB")
    units = list(plan.device_map)
    dm = {u: (0 if i < len(units) // 2 else 1) for i, u in enumerate(units)}
    for g in prep.skeleton.groups:  # keep the groups whole, as the planner does
        for u in g.units:
            dm[u] = dm[g.units[0]]
    sim = simulate(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan, device_map=dm)
    assert sim.mismatch is None and sim.stage == "done"
    assert sim.image_tokens == _image_tokens(prep.skeleton.config, TINY)
    assert {d.device for d in sim.devices} - {"cpu"} == {"0", "1"}
    assert sum(d.kv_bytes for d in sim.devices) > 0


def test_fake_run_computes_the_real_runs_positions_and_a_real_run_accepts_the_inputs(checkpoints):
    """The same inputs, real on the CPU and fake with hybrid propagation: the model takes
    them, and the M-RoPE deltas the fake run computed are the real run's."""
    real_model = transformers.AutoModelForImageTextToText.from_pretrained(checkpoints("qwen2_vl")).eval()
    cfg = real_model.config
    inputs, tokens = vision_inputs(cfg, TINY, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        out = real_model(**inputs, use_cache=True)
    seq = TINY.prompt + tokens
    assert out.logits.shape == (2, seq, cfg.text_config.vocab_size)
    assert cache_of(out).get_seq_length() == seq

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.no_grad(), hybrid.propagation(mode) as twins:
        model = build_model(cfg, "image-text-to-text", torch.float32).eval()
        fake_inputs, _ = vision_inputs(cfg, TINY, torch.device("cpu"), torch.float32)
        fake_out = model(**fake_inputs, use_cache=True, logits_to_keep=1)
        assert cache_of(fake_out).get_seq_length() == seq
        deltas = twins.real(model.model.rope_deltas)
    assert deltas is not None and torch.equal(deltas, real_model.model.rope_deltas)


@pytest.mark.slow
def test_catalog_qwen2_vl_7b_prefill_and_decode_with_a_1344_image():
    w = Workload(1, 3000, 1000, ((1344, 1344),))
    prep, plan = _prepared("qwen2-vl-7b", "2x16GiB", w)
    assert plan.fits
    sim = simulate(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan)
    assert sim.mismatch is None and sim.stage == "done", sim.mismatch and sim.mismatch.message()
    assert sim.image_tokens == 2304  # 96x96 patches, 2x2 merged
    gpus = {d.device: d for d in sim.devices if d.device != "cpu"}
    assert set(gpus) == {"0", "1"}
    for d in gpus.values():
        assert d.weights_bytes < d.peak_bytes < 16 * 2**30
    assert sum(d.kv_bytes for d in gpus.values()) == 28 * 2 * 4 * 128 * 2 * (
        3000 + 2304 + 1000
    )  # the full context after the decode step
