"""Quantized weights on the CPU: checkpoints saved quantized by transformers with bitsandbytes
(4-bit NF4 and LLM.int8()) and quantization while loading (--quantize), compared with
``from_pretrained`` using the same quantizer on the same files: every tensor, the greedy
tokens, and the plan's bytes against the bytes actually placed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from fitmap.cli import main
from fitmap.runtime import loader
from tests.runtime.test_loader import plan_for

pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[1, 17, 33, 41, 99, 250, 7, 300]])
METHODS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}


def _bnb(method: str):
    return transformers.BitsAndBytesConfig(**METHODS[method])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A bf16 Llama with a tokenizer, and the same weights saved quantized by transformers."""
    from fitmap.cli.demo import _tokenizer

    root = tmp_path_factory.mktemp("quant")
    tok = _tokenizer()
    cfg = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    out = {"base": root / "base"}
    model.save_pretrained(out["base"])
    tok.save_pretrained(out["base"])
    for method in METHODS:
        q = transformers.AutoModelForCausalLM.from_pretrained(
            out["base"], quantization_config=_bnb(method), device_map="cpu"
        )
        out[method] = root / method
        q.save_pretrained(out[method])
        tok.save_pretrained(out[method])
    return out


def _reference(path: Path, method: str | None = None):
    extra = {"quantization_config": _bnb(method)} if method else {}
    return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **extra).eval()


def _same_state(got: torch.nn.Module, want: torch.nn.Module) -> None:
    """Every tensor of the state dict (quantization state included), before any forward."""
    a, b = got.state_dict(), want.state_dict()
    assert sorted(a) == sorted(b)
    different = [k for k in b if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert different == []


def _placed_bytes(model: torch.nn.Module) -> int:
    """Bytes a loaded model holds: parameters, persistent buffers (the plan leaves out the tiny
    computed ones, rotary ``inv_freq``), and the state quantized weights carry."""
    total = 0
    persistent = [
        b
        for m in model.modules()
        for n, b in m._buffers.items()
        if b is not None and n not in m._non_persistent_buffers_set
    ]
    for t in list(model.parameters()) + persistent:
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            total += sum(x.numel() * x.element_size() for x in (qs.absmax, qs.code))
        scb = getattr(t, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


@pytest.mark.parametrize("method", list(METHODS))
def test_saved_quantized_checkpoint_loads_as_from_pretrained(tiny, method):
    d = tiny[method]
    want = _reference(d)
    with loader.load(d, plan_for(d, dtype="bfloat16"), progress=False) as lm:
        _same_state(lm.model, want)
        got = lm.model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want.generate(input_ids=IDS, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("method", list(METHODS))
def test_quantized_while_loading_as_from_pretrained(tiny, method):
    d = tiny["base"]
    want = _reference(d, method)
    with loader.load(d, plan_for(d, dtype="bfloat16", quantize=method), progress=False) as lm:
        _same_state(lm.model, want)
        got = lm.model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want.generate(input_ids=IDS, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("saved", [True, False])
def test_plan_bytes_are_the_bytes_placed(tiny, method, saved):
    import fitmap

    d = tiny[method] if saved else tiny["base"]
    plan = fitmap.plan(
        str(d), cpu="1GiB", prompt=16, new=4, estimate="analytic", **({} if saved else {"quantize": method})
    )
    assert plan.fits and plan.quantize == (None if saved else method)
    with loader.load(d, plan, progress=False) as lm:
        placed = _placed_bytes(lm.model)
    planned = next(x.weights_bytes for x in plan.devices if x.device == "cpu")
    if saved:  # header bytes: the 4-bit checkpoint also stores its quant_state as a small uint8 tensor
        assert planned - placed == sum(
            t.nbytes for t in _header_tensors(d) if ".quant_state." in t.name or t.name.endswith("weight_format")
        )
    else:
        assert planned == placed


def _header_tensors(d: Path):
    from fitmap.model.inventory import inventory

    return list(inventory(d).tensors.values())


def test_quantized_units_are_never_streamed(tiny, tmp_path):
    import fitmap
    from fitmap.errors import BadInput

    d = tiny["nf4"]
    plan = fitmap.plan(str(d), cpu="10KiB", disk=str(tmp_path), prompt=16, new=4, estimate="analytic")
    assert not plan.fits and "disk" not in plan.device_map.values()
    plan = plan_for(d, {"model.layers.1": "disk"}, dtype="bfloat16")
    with pytest.raises(BadInput, match="quantized weights resident"):
        loader.load(d, plan, progress=False)


def test_run_quantized_and_bad_requests_one_line(tiny, tmp_path, capsys):
    assert main(["run", str(tiny["base"]), "--prompt", "hello there", "--new", "3", "--quantize", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "quantized to nf4" in out
    assert main(["run", str(tiny["int8"]), "--prompt", "hello there", "--new", "3"]) == 0
    capsys.readouterr()
    assert main(["run", str(tiny["nf4"]), "--prompt", "hi", "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already quantized" in err[0]
    plan = tmp_path / "p.json"
    assert main(["plan", str(tiny["base"]), "--cpu", "1GiB", "--quantize", "int8", "--out", str(plan)]) == 0
    assert json.loads(plan.read_text())["quantize"] == "int8"
    capsys.readouterr()
    assert main(["run", str(tiny["base"]), "--plan", str(plan), "--prompt", "hi", "--quantize", "nf4"]) == 2
    assert "differs from the plan" in capsys.readouterr().err


def test_advice_names_the_quantization_that_fits():
    """The issue's case: a 70B model on 2 x 24 GiB does not fit; 4-bit does, and the plan agrees."""
    import fitmap

    plan = fitmap.plan("llama-3.1-70b", gpus="2x24GiB", prompt=4096, new=512, estimate="analytic")
    assert not plan.fits and "--quantize nf4" in plan.advice
    plan = fitmap.plan("llama-3.1-70b", gpus="2x24GiB", prompt=4096, new=512, estimate="analytic", quantize="nf4")
    assert plan.fits and plan.quantize == "nf4" and set(plan.device_map.values()) == {0, 1}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("saved", [True, False])
def test_quantized_on_a_gpu_as_from_pretrained(tiny, method, saved):
    """Saved quantized: the parts moved to the GPU with their state; --quantize: each weight moved
    at full precision, then quantized there. Same tensors and tokens as from_pretrained on GPU 0."""
    d = tiny[method] if saved else tiny["base"]
    extra = {} if saved else {"quantization_config": _bnb(method)}
    want = transformers.AutoModelForCausalLM.from_pretrained(d, device_map={"": 0}, **extra).eval()
    plan = plan_for(
        d,
        {
            u: 0
            for u in (
                "model.embed_tokens",
                "model.rotary_emb",
                "model.layers.0",
                "model.layers.1",
                "model.norm",
                "lm_head",
            )
        },
        dtype="bfloat16",
        execution_device="0",
        **({} if saved else {"quantize": method}),
    )
    with loader.load(d, plan, progress=False) as lm:
        _same_state(lm.model, want)
        ids = IDS.to(lm.input_device)
        got = lm.model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want.generate(input_ids=ids, max_new_tokens=6, do_sample=False))


def test_check_of_a_quantized_plan_counts_its_quantized_weights(tiny, tmp_path, capsys):
    """The simulation runs the full-precision model; the check's weights are the plan's (quantized)."""
    plan_file = tmp_path / "p.json"
    assert (
        main(
            [
                "plan",
                str(tiny["base"]),
                "--gpus",
                "1x1GiB",
                "--quantize",
                "nf4",
                "--estimate",
                "analytic",
                "--out",
                str(plan_file),
            ]
        )
        == 0
    )
    planned = json.loads(plan_file.read_text())["devices"][0]["weights_bytes"]
    capsys.readouterr()
    assert main(["check", str(tiny["base"]), "--plan", str(plan_file)]) == 0
    assert "no device mismatch" in capsys.readouterr().out
    assert json.loads(plan_file.read_text())["devices"][0]["weights_bytes"] == planned


def test_chat_quantized_on_a_model_with_a_short_window(tiny, monkeypatch, capsys):
    """chat makes room for min(4096, window - new) tokens: this model reads 2048 (was refused with
    advice naming --prompt, which chat does not take)."""
    import io

    from fitmap.cli.chat import chat
    from fitmap.planning.devices import make_machine

    out = io.StringIO()
    assert (
        chat(
            str(tiny["base"]),
            [],
            3,
            make_machine(None, "4GiB"),
            None,
            False,
            io.StringIO("hello there\n/exit\n"),
            out,
            quantize="nf4",
        )
        == 0
    )
    assert out.getvalue().count("assistant: ") == 1
    assert main(["chat", str(tiny["base"]), "--new", "5000"]) == 2
    assert "reads at most 2048 tokens" in capsys.readouterr().err
