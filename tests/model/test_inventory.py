import json
import struct

import pytest
import torch

from fitmap.errors import BadInput, CheckpointError
from fitmap.model.build import planned_dtype
from fitmap.model.inventory import inventory, read_safetensors_header
from fitmap.model.skeleton import skeleton


def test_sharded_checkpoint_headers(checkpoints):
    path = checkpoints("llama")
    inv = inventory(path)
    assert inv.source == "directory" and inv.weight_format == "safetensors"
    assert len(inv.files) > 1
    # header bytes equal the real tensors' bytes
    from safetensors.torch import load_file

    real = {}
    for f in inv.files:
        real.update(load_file(path / f))
    assert set(real) == set(inv.tensors)
    assert inv.total_bytes == sum(t.numel() * t.element_size() for t in real.values())
    assert inv.bytes_by_dtype() == {"F32": inv.total_bytes}
    assert inv.checkpoint_float_dtype() == "float32"


def test_bin_fallback(tmp_path, checkpoints):
    from safetensors.torch import load_file

    src = inventory(checkpoints("llama"))
    sd = {}
    for f in src.files:
        sd.update(load_file(src.path / f))
    (tmp_path / "config.json").write_text(json.dumps(src.config))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    inv = inventory(tmp_path)
    assert inv.weight_format == "bin" and inv.total_bytes == src.total_bytes


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_shard(tmp_path, checkpoints):
    d = _copy(checkpoints("llama"), tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"names 1 shard.*{victim.name}"):
        inventory(d)


def test_truncated_shard(tmp_path, checkpoints):
    d = _copy(checkpoints("llama"), tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{victim.name} is truncated"):
        inventory(d)


def _file(header: dict, data_bytes: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes


@pytest.mark.parametrize(
    "payload,needle",
    [
        (b"abc", "truncated"),
        (struct.pack("<Q", 10**12) + b"{}", "corrupt or truncated"),
        (struct.pack("<Q", 4) + b"nope", "unreadable header"),
        (
            _file({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, 8),
            "shape \\[4\\] F32 \\(16 bytes\\) but 8 bytes",
        ),
        (_file({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, 8), "unknown dtype"),
        (
            _file({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8),
            "truncated: tensor 'w' ends at byte 16",
        ),
        (_file({"w": {"dtype": "F32"}}, 8), "malformed header entry"),
        (struct.pack("<Q", 6) + b"[1, 2]", "a header that is an array, not a JSON object"),
        (struct.pack("<Q", 4) + b'"ab"', "a header that is a string, not a JSON object"),
    ],
)
def test_corrupt_headers(tmp_path, payload, needle):
    f = tmp_path / "x.safetensors"
    f.write_bytes(payload)
    with pytest.raises(CheckpointError, match=needle):
        read_safetensors_header(f)


def test_config_that_does_not_match_tensors(tmp_path, checkpoints):
    d = _copy(checkpoints("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    inv = inventory(d)
    with pytest.raises(CheckpointError, match="does not match the weights.*mlp"):
        skeleton(inv, planned_dtype(inv, None))


def test_bad_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        inventory(tmp_path)


def test_a_config_alone_is_planned_from_its_shapes_like_the_catalog(checkpoints, tmp_path, capsys):
    """What a user has before downloading: config.json alone plans with the weights' exact bytes
    (same units and bytes as the checkpoint's own headers give); run says the weights are missing."""
    import shutil

    from fitmap.cli import main

    full = checkpoints("llama")
    d = tmp_path / "config-only"
    d.mkdir()
    shutil.copy(full / "config.json", d / "config.json")
    inv = inventory(d)
    assert inv.source == "config" and not inv.tensors
    dtype = planned_dtype(inventory(full), None)
    assert [(u.name, u.weight_bytes) for u in skeleton(inv, dtype).units] == [
        (u.name, u.weight_bytes) for u in skeleton(inventory(full), dtype).units
    ]
    assert main(["plan", str(d), "--gpus", "2x1GiB", "--dtype", "fp32"]) == 0
    assert "shapes at float32, as for a catalog model" in capsys.readouterr().out.replace("\n", " ")
    assert main(["run", str(d), "--prompt", "hi"]) == 2
    assert "no weights" in capsys.readouterr().err


def test_unknown_name_suggests_catalog():
    with pytest.raises(BadInput, match="llama-3.1-70b"):
        inventory("llama-3.1-70")


def test_hf_cache_resolution(tmp_path, monkeypatch, checkpoints):
    """An id in the HF_HOME cache layout resolves offline to its snapshot."""
    import shutil

    hub = tmp_path / "hub"
    repo = hub / "models--acme--tiny-llama"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(checkpoints("llama"), snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    inv = inventory("acme/tiny-llama")
    assert inv.source == "hf-cache" and inv.path == snap and inv.tensors


def _awq_layout(checkpoints, directory):
    """A tiny Llama stored as AutoAWQ's GEMM layout stores each quantized Linear (the values are not a
    real quantization: only the layout and bytes matter to the plan)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoints("llama"), directory)
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    group = 32
    for key in [k for k in tensors if k.endswith("proj.weight")]:
        w = tensors.pop(key)
        n_out, n_in = w.shape
        path = key.removesuffix(".weight")
        tensors[f"{path}.qweight"] = torch.zeros(n_in, n_out // 8, dtype=torch.int32)
        tensors[f"{path}.qzeros"] = torch.zeros(n_in // group, n_out // 8, dtype=torch.int32)
        tensors[f"{path}.scales"] = torch.ones(n_in // group, n_out, dtype=torch.float16)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = {
        "bits": 4,
        "group_size": group,
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    }
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def test_awq_checkpoint_and_its_config_alone_are_planned_at_the_stored_bytes(checkpoints, tmp_path):
    """AWQ cannot be loaded here (no AutoAWQ kernels), but it is planned exactly: a checkpoint by its headers
    (each Linear's qweight + qzeros + scales counted to it), its config alone by the layout's rule."""
    import shutil

    import fitmap

    d = _awq_layout(checkpoints, tmp_path / "awq")
    stored = inventory(d).total_bytes
    plan = fitmap.plan(str(d), cpu="1GiB", prompt=16, new=4, estimate="analytic", dtype="fp32")
    assert sum(x.weights_bytes for x in plan.devices) == stored
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(d / "config.json", alone / "config.json")
    plan = fitmap.plan(str(alone), cpu="1GiB", prompt=16, new=4, estimate="analytic", dtype="fp32")
    assert sum(x.weights_bytes for x in plan.devices) == stored


def test_awq_70b_from_the_catalog_fits_two_24gib_cards():
    import fitmap

    plan = fitmap.plan("llama-3.1-70b-awq", gpus="2x24GiB", prompt=4096, new=512, estimate="analytic")
    assert plan.fits and 39.5e9 < sum(d.weights_bytes for d in plan.devices) < 40.0e9  # 39.8 GB as published


def test_a_config_naming_an_image_text_architecture_is_a_vlm_without_vision_config() -> None:
    """Emu3 keeps its image tokenizer under vq_config; transformers files its class as image-text-to-text."""
    from fitmap.model.inventory import guess_task

    assert guess_task({"model_type": "emu3", "architectures": ["Emu3ForConditionalGeneration"]}) == "image-text-to-text"
    assert guess_task({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) == "causal-lm"
    assert guess_task({"model_type": "x", "vision_config": {}}) == "image-text-to-text"
