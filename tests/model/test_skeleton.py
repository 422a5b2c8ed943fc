import pytest
import torch

from fitmap.model.build import planned_dtype
from fitmap.model.inventory import inventory
from fitmap.model.skeleton import skeleton


def _sk(path, dtype=None):
    inv = inventory(path)
    return skeleton(inv, planned_dtype(inv, dtype))


@pytest.mark.parametrize("family", ["llama", "mixtral", "gemma2", "qwen2_vl"])
def test_units_cover_every_weight_once(checkpoints, family):
    inv = inventory(checkpoints(family))
    sk = skeleton(inv, planned_dtype(inv, None))
    owned = [p for u in sk.units for p in u.params]
    assert len(owned) == len(set(owned))
    # every checkpoint tensor, under the model's name for it, belongs to exactly one unit

    from fitmap.model.build import build_model, load_config
    from fitmap.model.keys import key_mapper

    with torch.device("meta"):
        model = build_model(load_config(inv), inv.task, torch.float32)
    mapper = key_mapper(model)
    for key in inv.tensors:
        name, _ = mapper(key)
        assert sum(1 for u in sk.units if name == u.name or name.startswith(u.name + ".")) == 1, name
    # exact bytes: the planned weights equal the checkpoint (same dtype, tied stored once)
    assert sk.weight_bytes == inv.total_bytes


def test_llama_units_and_groups(checkpoints):
    sk = _sk(checkpoints("llama"))
    blocks = [u for u in sk.units if u.kind == "block"]
    assert [u.layer for u in blocks] == [0, 1, 2, 3]
    groups = {g.name: set(g.units) for g in sk.groups}
    assert groups["input"] == {"model.embed_tokens", "model.rotary_emb"}
    assert groups["output"] == {"model.norm", "lm_head"}
    assert "tied" not in groups


def test_tied_embeddings_form_a_group(checkpoints):
    sk = _sk(checkpoints("gemma2"))
    groups = {g.name: set(g.units) for g in sk.groups}
    assert groups["tied"] == {"model.embed_tokens", "lm_head"}
    assert sk.tied == (("model.embed_tokens.weight", "lm_head.weight"),)


def test_vlm_vision_tower_joins_input_side(checkpoints):
    sk = _sk(checkpoints("qwen2_vl"))
    inputs = next(g for g in sk.groups if g.name == "input").units
    assert "model.language_model.embed_tokens" in inputs
    assert any(u.startswith("model.visual.blocks.") for u in inputs)
    assert "model.visual.merger" in inputs
    assert all(sk.unit(n).kind in ("vision", "input") for n in inputs)
    assert sk.text_layers == "model.language_model.layers"


def test_dtype_override_scales_weights(checkpoints):
    fp32 = _sk(checkpoints("llama"))
    bf16 = _sk(checkpoints("llama"), "bfloat16")
    assert bf16.weight_bytes * 2 == fp32.weight_bytes and bf16.dtype == "bfloat16"


def test_model_without_no_split_modules_still_plans(checkpoints, monkeypatch):
    """Repeated ModuleList children become units when the model declares none."""
    from transformers import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

    for cls in (LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel):
        monkeypatch.setattr(cls, "_no_split_modules", None, raising=False)
    sk = _sk(checkpoints("llama"))
    assert sk.no_split == ("LlamaDecoderLayer",)
    assert len([u for u in sk.units if u.kind == "block"]) == 4


def test_remote_code_needs_consent(tmp_path, checkpoints):
    import json
    import shutil

    from fitmap.errors import BadInput

    d = tmp_path / "m"
    shutil.copytree(checkpoints("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="--trust-remote-code"):
        _sk(d)


def test_a_skeleton_is_built_once_and_read_back_the_same(tmp_path, monkeypatch):
    """Planning a model again reads its skeleton from fitmap's cache: no model class is built."""
    from fitmap.model import skeleton as skeleton_module
    from fitmap.model.build import planned_dtype
    from fitmap.model.inventory import inventory
    from fitmap.model.skeleton import skeleton

    monkeypatch.setenv("FITMAP_CACHE", str(tmp_path))
    inv = inventory("mixtral-8x7b")
    built = skeleton(inv, planned_dtype(inv, None))

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built again")

    monkeypatch.setattr(skeleton_module, "build_model", no_build)
    again = skeleton(inv, planned_dtype(inv, None))
    assert (again.units, again.groups, again.tied, again.no_split, again.text_layers, again.model_class) == (
        built.units,
        built.groups,
        built.tied,
        built.no_split,
        built.text_layers,
        built.model_class,
    )
    assert again.config.model_type == "mixtral"


def test_large_computed_buffers_count_in_their_units_bytes():
    """A per-layer rotary cache (non-persistent, computed in __init__) is resident memory on the layer's
    device: counted from 1 MiB up; an inv_freq-sized one is not."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from fitmap.model.skeleton import LARGE_COMPUTED_BUFFER, _make_units

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8, bias=False)
            self.register_buffer("inv_freq", torch.ones(4), persistent=False)
            self.register_buffer("cos_cached", torch.ones(LARGE_COMPUTED_BUFFER // 4), persistent=False)

    model = nn.Module()
    model.layers = nn.ModuleList([Layer(), Layer()])
    inv = SimpleNamespace(tensors={}, fp8_linear=False)
    units = _make_units(model, ["layers.0", "layers.1"], "layers", inv, torch.float32, {})
    assert [u.weight_bytes for u in units] == [8 * 8 * 4 + LARGE_COMPUTED_BUFFER] * 2
    assert all(u.layer == i for i, u in enumerate(units))


def test_model_code_copied_from_torch_2_0_finds_its_typing_names():
    """MiniCPM-V's resampler does ``from torch.nn.functional import *`` and annotates ``-> List[Tensor]``;
    torch 2.1+ no longer exports ``List`` there. Building remote code gives the name back."""
    from fitmap.model import compat

    compat.legacy_torch_names()
    namespace: dict = {}
    exec("from torch.nn.functional import *\ndef f(x) -> List[Tensor]: return [x]", namespace)
    assert namespace["f"].__annotations__["return"] is not None
