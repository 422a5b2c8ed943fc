"""A config.json whose ``quantization_config`` transformers cannot read, or whose ``quant_method``
it has no quantizer for: one line naming the field and what it should be (a dict with
``quant_method``, a method transformers knows), never a traceback, never planned as plain weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import fitmap
from fitmap.cli import main
from fitmap.errors import BadInput
from fitmap.model import quant


def _edited(src: Path, dst: Path, quantization_config, where: str = "top") -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if where == "text":
        cfg["text_config"] = {"quantization_config": quantization_config}
    else:
        cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


BAD = [
    ("bitsandbytes", "top", "quantization_config is a string ('bitsandbytes'), not an object"),
    (["nf4"], "top", "quantization_config is an array (['nf4']), not an object"),
    (4, "top", "quantization_config is a number (4), not an object"),
    ("nf4", "text", "text_config.quantization_config is a string ('nf4'), not an object"),
    ({"quant_method": "foo", "bits": 4}, "top", "fitmap does not load quant_method 'foo' (it loads: "),
    ({"quant_method": 3}, "top", "fitmap does not load quant_method 3 (it loads: "),
    ({"bits": 4, "group_size": 128}, "top", "quantization_config has no quant_method"),
]


@pytest.mark.parametrize("qc,where,needle", BAD, ids=[f"{w}-{qc!r}"[:40] for qc, w, _ in BAD])
def test_unreadable_quantization_config_is_one_line(checkpoints, tmp_path, capsys, qc, where, needle):
    d = _edited(checkpoints("llama"), tmp_path / "m", qc, where)
    with pytest.raises(BadInput) as e:
        fitmap.plan(str(d), gpus="1x1GiB")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert "quant_method" in msg  # what it should be
    capsys.readouterr()
    assert main(["plan", str(d), "--gpus", "1x1GiB"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


def test_unknown_method_lists_transformers_own_methods(checkpoints, tmp_path):
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    d = _edited(checkpoints("llama"), tmp_path / "m", {"quant_method": "foo"})
    with pytest.raises(BadInput) as e:
        fitmap.plan(str(d), gpus="1x1GiB")
    listed = str(e.value).split("(it loads: ", 1)[1].split(")", 1)[0].split(", ")
    assert "bitsandbytes" in listed and "gptq" in listed and "mxfp4" in listed
    assert set(listed) == {
        "bitsandbytes" if k.startswith("bitsandbytes_") else k for k in AUTO_QUANTIZATION_CONFIG_MAPPING
    }


@pytest.mark.parametrize(
    "qc",
    [
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        {"load_in_8bit": True},  # transformers' own rule: load_in_* means bitsandbytes, quant_method or not
        {"quant_method": "gptq", "bits": 4, "group_size": 32},
    ],
)
def test_known_methods_still_plan(checkpoints, tmp_path, qc):
    """A method transformers knows is planned (from the checkpoint's header bytes where its library
    or packed tensors are missing here), as before."""
    d = _edited(checkpoints("llama"), tmp_path / "m", qc)
    assert fitmap.plan(str(d), gpus="1x1GiB").fits


def test_a_quantizer_whose_library_is_missing_is_one_line(checkpoints, tmp_path):
    """transformers' GPTQ quantizer raises ImportError as it is built (optimum missing): loading says
    what to install instead of a traceback."""
    try:
        import optimum  # noqa: F401

        pytest.skip("optimum is installed")
    except ImportError:
        pass
    import torch

    from fitmap.model.build import load_config
    from fitmap.model.inventory import inventory

    d = _edited(checkpoints("llama"), tmp_path / "m", {"quant_method": "gptq", "bits": 4, "group_size": 32})
    with pytest.raises(BadInput, match="gptq weights need a library this Python lacks: .*optimum") as e:
        quant.quantizer(load_config(inventory(str(d))), None, torch.bfloat16)
    assert "\n" not in str(e.value)


def test_declared_reads_a_good_config_as_a_dict():
    class Config:
        quantization_config = {"quant_method": "mxfp4"}

    assert quant.declared(Config()) == {"quant_method": "mxfp4"}

    class Text:
        text_config = Config()

    assert quant.declared(Text()) == {"quant_method": "mxfp4"}
    Config.quantization_config = "mxfp4"  # type: ignore[assignment]
    with pytest.raises(BadInput, match="text_config.quantization_config is a string"):
        quant.declared(Text())
