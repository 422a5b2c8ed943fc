"""The Python API takes ``quantize`` as a transformers user writes it first: a
``transformers.BitsAndBytesConfig`` or a dict of its fields, as well as "nf4" / "int8"; anything
else is one line naming the type and the choices. A plan file's ``quantize`` is checked as well."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import fitmap
from fitmap.errors import BadInput

B = transformers.BitsAndBytesConfig
NF4 = B(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def _same(a: fitmap.Plan, b: fitmap.Plan) -> None:
    assert a.to_json() == b.to_json()


@pytest.mark.parametrize(
    "given,method",
    [
        (NF4, "nf4"),
        (B(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "nf4"),  # any compute dtype: fitmap computes in the plan's
        (B(load_in_8bit=True), "int8"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "nf4"),
        ({"load_in_8bit": True}, "int8"),
        (B(load_in_8bit=True).to_dict(), "int8"),  # every field, quant_method included
        (NF4.to_dict(), "nf4"),
    ],
)
def test_a_bitsandbytes_config_plans_as_its_method(checkpoints, given, method):
    d = str(checkpoints("llama"))
    got = fitmap.plan(d, gpus="1x1GiB", cpu="4GiB", quantize=given)
    assert got.quantize == method
    _same(got, fitmap.plan(d, gpus="1x1GiB", cpu="4GiB", quantize=method))


BAD = [
    (B(load_in_4bit=True), "bnb_4bit_quant_type 'fp4'"),  # transformers' default 4-bit type
    (B(), "must set one of load_in_4bit=True"),
    (B(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True), "bnb_4bit_use_double_quant=True"),
    (B(load_in_8bit=True, llm_int8_skip_modules=["lm_head"]), "llm_int8_skip_modules=['lm_head']"),
    ({"load_in_8bit": True, "load_in_9bit": True}, "field(s) load_in_9bit that BitsAndBytesConfig does not have"),
    ({"load_in_8bit": "yes"}, "load_in_8bit must be a boolean"),
    ({"quant_method": "gptq", "bits": 4}, "field(s) bits"),
    ({"quant_method": "awq"}, "bitsandbytes only, not quant_method 'awq'"),
    (["nf4"], "not ['nf4'] of type list"),
    ({"nf4"}, "of type set"),
    (4, "not 4 of type int"),
    (transformers.GPTQConfig(bits=4), "of type GPTQConfig"),
    ("fp8", "quantize must be one of nf4, int8, not 'fp8'"),
]


@pytest.mark.parametrize("given,needle", BAD, ids=[repr(g)[:30] for g, _ in BAD])
def test_anything_else_is_one_line(checkpoints, given, needle):
    with pytest.raises(BadInput) as e:
        fitmap.plan(str(checkpoints("llama")), gpus="1x1GiB", cpu="4GiB", quantize=given)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    assert "nf4" in msg or "drop it" in msg  # the choices (or the fix) are named


def test_plan_request_refuses_an_unhashable_quantize():
    """PlanRequest keeps ``quantize`` a string: a list given past fitmap.plan is BadInput, not TypeError."""
    from fitmap import pipeline
    from fitmap.planning.devices import make_machine

    with pytest.raises(BadInput, match="quantize must be one of nf4, int8"):
        pipeline.PlanRequest("m", make_machine("1x1GiB", None, None, None), quantize=["nf4"])  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [["nf4"], "foo", 3, {"method": "nf4"}])
def test_a_plan_file_with_a_wrong_quantize_is_not_a_plan(checkpoints, tmp_path, value):
    d = fitmap.plan(str(checkpoints("llama")), gpus="1x1GiB").to_json() | {"quantize": value}
    with pytest.raises(BadInput, match=r"^not a fitmap plan \(quantize must be 'nf4' or 'int8' or absent") as e:
        fitmap.Plan.from_json(d)
    assert "\n" not in str(e.value)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(BadInput, match="not a fitmap plan"):
        fitmap.Plan.load(path)


def test_a_plan_file_keeps_a_good_quantize(checkpoints):
    plan = fitmap.plan(str(checkpoints("llama")), gpus="1x1GiB", quantize="int8")
    assert fitmap.Plan.from_json(plan.to_json()).quantize == "int8"
    assert fitmap.Plan.from_json(plan.to_json() | {"quantize": None}).quantize is None
