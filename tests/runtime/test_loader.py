"""Loading tiny checkpoints per a plan: same logits as transformers, nothing left on
meta, clear errors, nothing kept after a failed load."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fitmap.errors import BadInput, CheckpointError, MissingWeights
from fitmap.model.inventory import inventory
from fitmap.model.skeleton import skeleton
from fitmap.planning.plan import Plan, Repair
from fitmap.planning.workload import Workload
from fitmap.runtime import loader
from tests.tiny import VISION


def plan_for(model_dir: Path, devices: dict[str, int | str] | None = None, dtype: str = "float32", **fields) -> Plan:
    """A plan with every unit on "cpu" unless ``devices`` says otherwise (no solver needed)."""
    sk = skeleton(inventory(model_dir), getattr(torch, dtype))
    device_map = {u.name: (devices or {}).get(u.name, "cpu") for u in sk.units}
    return Plan(
        model=str(model_dir),
        fits=True,
        policy="balanced",
        dtype=dtype,
        estimate="analytic",
        workload=Workload(),
        device_map=device_map,
        devices=(),
        **fields,
    )


def reference(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    vision = type(config) in transformers.AutoModelForImageTextToText._model_mapping
    auto = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    return auto.from_pretrained(model_dir, dtype=dtype).eval()


def meta_tensors(model: torch.nn.Module) -> list[str]:
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return [n for n, t in named if t.is_meta]


IDS = torch.tensor([[1, 17, 33, 41, 99, 250, 7, 300], [1, 400, 5, 6, 8, 13, 21, 34]])


@pytest.mark.parametrize("family", ["llama", "gemma2", "glm", "qwen2_vl", "qwen3_moe", "mixtral"])
def test_cpu_plan_gives_transformers_logits(checkpoints, family):
    d = checkpoints(family)
    with torch.no_grad():
        want = reference(d)(input_ids=IDS).logits
        with loader.load(d, plan_for(d), progress=False) as lm:
            assert meta_tensors(lm.model) == []
            assert lm.input_device == torch.device("cpu")
            got = lm.model(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_tied_weights_share_one_tensor(checkpoints):
    d = checkpoints("gemma2")
    with loader.load(d, plan_for(d), progress=False) as lm:
        m = lm.model
        assert m.lm_head.weight is m.model.embed_tokens.weight
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_computed_buffers_match_transformers(checkpoints):
    """Rotary inv_freq and Gemma's embed_scale are not in checkpoints; the model's init computes them."""
    d = checkpoints("gemma2")
    want = dict(reference(d).named_buffers())
    with loader.load(d, plan_for(d), progress=False) as lm:
        got = dict(lm.model.named_buffers())
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_dtype_cast_matches_transformers(checkpoints):
    d = checkpoints("llama")
    with torch.no_grad():
        want = reference(d, torch.bfloat16)(input_ids=IDS).logits
        with loader.load(d, plan_for(d, dtype="bfloat16"), progress=False) as lm:
            assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
            got = lm.model(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_close_frees_every_weight(checkpoints):
    d = checkpoints("llama")
    lm = loader.load(d, plan_for(d), progress=False)
    lm.close()
    assert all(t.is_meta for t in lm.model.state_dict().values())
    assert not lm.model._forward_hooks and not lm.model._forward_pre_hooks


def test_missing_shard_is_named(checkpoints, tmp_path):
    d = shutil.copytree(checkpoints("llama"), tmp_path / "llama")
    shard = sorted(d.glob("*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*download"):
        loader.load(d, plan_for(checkpoints("llama")), progress=False)


def test_missing_tensor_is_named(checkpoints, tmp_path):
    d = shutil.copytree(checkpoints("llama"), tmp_path / "llama")
    key = "model.layers.1.mlp.up_proj.weight"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"][key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(MissingWeights, match=r"1 weight\(s\).*model\.layers\.1\.mlp\.up_proj\.weight"):
        loader.load(d, plan_for(checkpoints("llama")), progress=False)


def test_failed_load_releases_what_was_placed(checkpoints, monkeypatch):
    d = checkpoints("llama")
    placed: list[weakref.ref] = []
    calls = {"n": 0}
    real_read, real_set = loader.Checkpoint.read, loader.set_tensor

    def read(self, keys):
        calls["n"] += 1
        if calls["n"] == 3:
            raise CheckpointError("disk went away")
        yield from real_read(self, keys)

    def set_tensor(model, key, t):
        if not t.is_meta:
            placed.append(weakref.ref(t))
        real_set(model, key, t)

    monkeypatch.setattr(loader.Checkpoint, "read", read)
    monkeypatch.setattr(loader, "set_tensor", set_tensor)
    monkeypatch.setattr(loader, "MAX_READERS", 1)
    with pytest.raises(CheckpointError, match="disk went away"):
        loader.load(d, plan_for(d), progress=False)
    gc.collect()
    assert placed and all(r() is None for r in placed)


def test_pytorch_bin_fallback(checkpoints, tmp_path):
    src = checkpoints("llama")
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    torch.save({k: v.clone() for k, v in reference(src).state_dict().items()}, d / "pytorch_model.bin")
    with torch.no_grad():
        want = reference(src)(input_ids=IDS).logits
        with loader.load(d, plan_for(src), progress=False) as lm:
            got = lm.model(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_plan_for_another_model_is_refused(checkpoints):
    d = checkpoints("llama")
    plan = plan_for(d)
    partial = {k: v for k, v in plan.device_map.items() if k != "model.layers.3"}
    with pytest.raises(BadInput, match="does not place .*model.layers.3"):
        loader.load(d, Plan(**{**plan.__dict__, "device_map": partial}), progress=False)


def test_gpu_plan_without_gpu_is_refused(checkpoints):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    d = checkpoints("llama")
    with pytest.raises(BadInput, match="GPU 0.*0 usable GPU"):
        loader.load(d, plan_for(d, {"model.layers.0": 0}), progress=False)


def test_repairs_are_applied(checkpoints):
    d = checkpoints("llama")
    fixes = (
        Repair("align-inputs", "model.layers.1.self_attn", "cpu", "cat of two devices"),
        Repair("colocate", "model.layers.3", "cpu", "moved next to its neighbours"),
    )
    with loader.load(d, plan_for(d, {"model.layers.3": "disk"}, repairs=fixes), progress=False) as lm:
        assert lm.model.model.layers[1].self_attn._forward_pre_hooks
        assert not lm.model.model.layers[3].self_attn.q_proj.weight.is_meta  # not on disk any more
        assert lm.offload_stats is None
        lm.model(input_ids=IDS)
    assert not lm.model.model.layers[1].self_attn._forward_pre_hooks


def test_progress_bar_runs(checkpoints, monkeypatch, capsys):
    d = checkpoints("llama")
    monkeypatch.setattr(loader, "PROGRESS_MIN_BYTES", 0)
    with loader.load(d, plan_for(d), progress=True) as lm:
        assert lm.bytes_read == sum(t.nbytes for t in inventory(d).tensors.values())


def test_weights_the_config_does_not_describe_are_refused(checkpoints, tmp_path):
    """A checkpoint with 4 layers under a config that says 3 must not answer with a layer dropped."""
    import json
    import shutil

    from fitmap.errors import CheckpointError

    d = tmp_path / "m"
    shutil.copytree(checkpoints("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": cfg["num_hidden_layers"] - 1}))
    with pytest.raises(CheckpointError, match=r"belong to no part of LlamaForCausalLM .*model\.layers\.3\."):
        loader.load(d, plan_for(d, {}), progress=False)


def test_per_expert_checkpoints_are_fused_by_transformers_own_converter(checkpoints):
    """transformers 5 saves Qwen3-MoE one tensor per expert and fuses them on load; so does fitmap."""
    from safetensors import safe_open

    d = checkpoints("qwen3_moe")
    keys = [k for f in d.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert any(".experts.0.gate_proj.weight" in k for k in keys)
    with loader.load(d, plan_for(d), progress=False) as lm:
        fused = lm.model.model.layers[1].mlp.experts.gate_up_proj
        want = dict(reference(d).named_parameters())["model.layers.1.mlp.experts.gate_up_proj"]
        assert torch.equal(fused, want)


def test_per_expert_weights_on_the_disk_tier_are_built_per_forward(checkpoints):
    """A disk-tier MoE block is read from its per-expert parts and fused at each forward."""
    d = checkpoints("qwen3_moe")
    with torch.no_grad():
        want = reference(d)(input_ids=IDS).logits
        with loader.load(d, plan_for(d, {"model.layers.1": "disk"}), progress=False) as lm:
            assert lm.model.model.layers[1].mlp.experts.gate_up_proj.is_meta  # not resident
            got = lm.model(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_per_expert_checkpoints_split_across_cpu_and_disk(checkpoints, family):
    """Checkpoints with one tensor per expert, as on the Hub (transformers 5 writes them so): every
    tensor equals from_pretrained's, buffers included, and a cpu + disk split gives its greedy tokens."""
    d = checkpoints(family)
    want = reference(d)
    with loader.load(d, plan_for(d), progress=False) as lm:
        got, ref = lm.model.state_dict(), want.state_dict()
        assert sorted(got) == sorted(ref)
        assert [k for k in ref if not torch.equal(got[k], ref[k])] == []
        assert [n for n, b in want.named_buffers() if not torch.equal(lm.model.get_buffer(n), b)] == []
    layers = sorted(u for u in plan_for(d).device_map if u.startswith("model.layers."))
    plan = plan_for(d, {u: "disk" for u in layers[len(layers) // 2 :]})
    tokens = want.generate(input_ids=IDS, max_new_tokens=8, do_sample=False)
    with loader.load(d, plan, progress=False) as lm:
        assert lm.model.get_submodule(layers[-1]).mlp.experts.gate_up_proj.is_meta
        assert torch.equal(lm.model.generate(input_ids=IDS, max_new_tokens=8, do_sample=False), tokens)


def _gpt_oss_mxfp4(directory: Path) -> Path:
    """A tiny gpt-oss in the released layout: expert weights as MXFP4 (``*_blocks``: two 4-bit values
    a byte, 32 per block; ``*_scales``: one uint8 exponent a block), the rest bf16."""
    cfg = transformers.GptOssConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=512,
        max_position_embeddings=2048,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, n_in, n_out = tensors.pop(key).shape
        tensors[f"{key}_blocks"] = torch.randint(
            0, 256, (experts, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g
        )
        tensors[f"{key}_scales"] = torch.randint(122, 130, (experts, n_out, n_in // 32), dtype=torch.uint8, generator=g)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _deepseek_fp8(source: Path, directory: Path) -> Path:
    """A tiny DeepSeek-V3 in its released layout: every Linear weight of the decoder (attention, dense MLP,
    experts, shared expert) as float8_e4m3fn with a float32 ``weight_scale_inv`` per 128 x 128 block; the
    embeddings, norms, router and head as stored. ``source``: a tiny DeepSeek-V3 checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    for f in source.glob("*.safetensors"):
        tensors |= load_file(f)
    out = {}
    for key, t in tensors.items():
        if t.dim() != 2 or not key.endswith("_proj.weight") and ".experts." not in key:
            out[key] = t
            continue
        assert max(t.shape) <= 128, "the tiny model's matrices fit one 128 x 128 block"
        scale = t.float().abs().max().clamp(min=1e-12) / 448.0
        out[key] = (t.float() / scale).to(torch.float8_e4m3fn)
        out[key.removesuffix("weight") + "weight_scale_inv"] = scale.reshape(1, 1)
    directory.mkdir(parents=True)
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_an_fp8_checkpoint_loads_as_from_pretrained_with_its_block_scales(checkpoints, tmp_path):
    """DeepSeek-V3 as released (FP8 Linear weights with block scales): without FP8 kernels transformers unpacks
    each weight with its ``weight_scale_inv``; fitmap did not (it loaded the raw FP8 values) and now builds
    each weight from both, through the quantizer's own operation."""
    d = _deepseek_fp8(checkpoints("deepseek_v3"), tmp_path / "fp8")
    want = reference(d)
    with loader.load(d, plan_for(d), progress=False) as lm:
        got, ref = lm.model.state_dict(), want.state_dict()
        assert sorted(got) == sorted(ref) and [k for k in ref if not torch.equal(got[k], ref[k])] == []
        tokens = lm.model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, want.generate(input_ids=IDS, max_new_tokens=6, do_sample=False))


def test_gpt_oss_mxfp4_loads_as_from_pretrained_and_is_planned_at_what_it_holds(tmp_path, monkeypatch):
    """Without Triton and its kernels (this machine) transformers unpacks MXFP4 to bf16 while loading:
    fitmap does the same through the quantizer's own operation, and plans the bf16 bytes; where
    transformers keeps MXFP4 (a GPU with its kernels) the plan takes the checkpoint's packed bytes."""
    import fitmap
    from fitmap.model import quant

    d = _gpt_oss_mxfp4(tmp_path / "gpt-oss")
    want = reference(d, torch.bfloat16)
    plan = fitmap.plan(str(d), cpu="1GiB", prompt=16, new=4, estimate="analytic")
    with loader.load(d, plan, progress=False) as lm:
        got, ref = lm.model.state_dict(), want.state_dict()
        assert sorted(got) == sorted(ref) and [k for k in ref if not torch.equal(got[k], ref[k])] == []
        placed = sum(t.nbytes for k, t in got.items() if not k.endswith("inv_freq"))
        ids = IDS[:1]
        assert torch.equal(
            lm.model.generate(input_ids=ids, max_new_tokens=6, do_sample=False),
            want.generate(input_ids=ids, max_new_tokens=6, do_sample=False),
        )
    assert next(x.weights_bytes for x in plan.devices if x.device == "cpu") == placed
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(d / "config.json", config_only / "config.json")
    released = fitmap.plan(str(config_only), cpu="1GiB", prompt=16, new=4, estimate="analytic")
    monkeypatch.setattr(quant, "dequantizes", lambda model: False)
    packed = fitmap.plan(str(d), cpu="1GiB", prompt=16, new=4, estimate="analytic")
    expert_bf16 = sum(t.nbytes for k, t in ref.items() if k.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert (
        sum(x.weights_bytes for x in plan.devices) - sum(x.weights_bytes for x in packed.devices)
        == expert_bf16 - expert_bf16 * 17 // 64
    )  # 4.25 bits a value instead of 16
    # a config alone (and the catalog) is sized in the released layout: the checkpoint's own header bytes
    assert [x.weights_bytes for x in released.devices] == [x.weights_bytes for x in packed.devices]


def test_gpt_oss_120b_from_the_catalog_is_planned_at_its_released_size():
    """The issue's case: 60.8 GiB as released (MXFP4 experts), not 217.6 GiB as if bf16; fits 2 x 80 GiB."""
    import fitmap

    plan = fitmap.plan("gpt-oss-120b", gpus="2x80GiB", estimate="analytic")
    weights = sum(d.weights_bytes for d in plan.devices) / (1 << 30)
    assert plan.fits and 60.0 < weights < 61.5


@pytest.mark.parametrize("family", ["llama", "gemma2", "glm", "qwen3_moe", "mixtral", "deepseek_v3", *VISION])
def test_every_tensor_equals_from_pretrained(checkpoints, family):
    """Whole state dicts and every buffer (persistent or not) equal to from_pretrained's on the same files:
    no loaded parameter re-initialised while buffers the checkpoint lacks are computed (SigLIP's position
    embedding in Gemma 3, rotary inv_freq, Llama 4's complex rotary frequencies)."""
    d = checkpoints(family)
    want = reference(d)
    with loader.load(d, plan_for(d), progress=False) as lm:
        got, ref = lm.model.state_dict(), want.state_dict()
        assert sorted(got) == sorted(ref)
        assert [k for k in ref if got[k].dtype != ref[k].dtype or not torch.equal(got[k], ref[k])] == []
        assert [n for n, b in want.named_buffers() if not torch.equal(lm.model.get_buffer(n), b)] == []


@pytest.mark.parametrize("model_type", ["step3p7", "ernie4_5_vl_moe"])
def test_a_tensor_stored_for_several_loads_as_transformers_splits_it(tmp_path, model_type):
    """transformers saves some models with one tensor where the model has several (Step3's vision
    ``in_proj`` for q, k and v; ERNIE-4.5-VL's experts for its text and vision experts) and splits it on
    load by its converters; fitmap loads every tensor equal to from_pretrained's. Tiny configs as
    bench/zoo.py makes them."""
    from bench.zoo import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(tiny_config(model_type))
    model.save_pretrained(tmp_path)
    want = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path).eval().state_dict()
    with loader.load(tmp_path, plan_for(tmp_path), progress=False) as lm:
        got = lm.model.state_dict()
        assert sorted(got) == sorted(want)
        assert [k for k in want if not torch.equal(got[k], want[k])] == []
