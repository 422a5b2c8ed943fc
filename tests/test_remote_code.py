"""Remote-code models with their real interfaces (tests/remote), on the transformers their
code was written for (``make test`` runs this file on transformers 5 and on 4.40, in .venv-tf4).

ChatGLM3's code reads ``config.max_length`` (gone in transformers 5) and has no
``GenerationMixin``: on 5.x fitmap must say so in one line; on 4.40 every step works
— inspect, a simulated plan on two GPUs, its check, the check of a naive
``infer_auto_device_map`` map that splits a block, and a cpu+disk run that answers
through the model's own ``chat()`` with the unsplit model's text.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

from fitmap import pipeline
from fitmap.model import compat
from fitmap.planning import profile
from fitmap.planning.devices import make_machine
from fitmap.planning.workload import Workload
from tests.remote import CHATGLM, make_remote

# The models' own code keeps its own keywords: InternVL's forward calls its language model with
# ``past_key_values=``, which transformers 5.25 answers with a FutureWarning. That is the model's
# call, not fitmap's (fitmap's own calls use compat.cache_kwarg).
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

TF4 = compat.major() < 5
only_tf4 = pytest.mark.skipif(not TF4, reason="ChatGLM3's code runs on the transformers 4.x its card pins")
only_tf5 = pytest.mark.skipif(TF4, reason="what users of transformers 5 see")


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    if not TF4:  # the code cannot be built on 5.x: the files alone, with random weights from 4.x absent
        root = tmp_path_factory.mktemp("remote")
        return _files_only(root)
    return make_remote("chatglm", tmp_path_factory.mktemp("remote"))


def _files_only(root):
    """The model's files with weights of the right names and shapes, written without its code."""
    import shutil

    from safetensors.torch import save_file

    from tests.remote import HERE

    d = root / "chatglm"
    d.mkdir()
    for src in (HERE / "chatglm").glob("*.py"):
        shutil.copy(src, d / src.name)
    (d / "config.json").write_text(json.dumps(CHATGLM))
    c = CHATGLM
    h, v, f = c["hidden_size"], c["padded_vocab_size"], c["ffn_hidden_size"]
    qkv = c["num_attention_heads"] * c["kv_channels"] + 2 * c["multi_query_group_num"] * c["kv_channels"]
    shapes = {
        "transformer.embedding.word_embeddings.weight": (v, h),
        "transformer.rotary_pos_emb.inv_freq": (c["kv_channels"] // 4,),
        "transformer.encoder.final_layernorm.weight": (h,),
        "transformer.output_layer.weight": (v, h),
    }
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attention.query_key_value.weight": (qkv, h),
            p + "self_attention.query_key_value.bias": (qkv,),
            p + "self_attention.dense.weight": (h, h),
            p + "mlp.dense_h_to_4h.weight": (2 * f, h),
            p + "mlp.dense_4h_to_h.weight": (h, f),
        }
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(d / "model.safetensors"))
    return d


def fitmap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fitmap.cli", *args], capture_output=True, text=True, timeout=300)


def request(model, workload=Workload(1, 64, 32), **machine) -> pipeline.PlanRequest:
    return pipeline.PlanRequest(str(model), make_machine(**machine), workload, trust_remote_code=True)


# --------------------------------------------------------------------------- transformers 5
@only_tf5
def test_code_written_for_4x_fails_in_one_line_on_5x(glm):
    r = fitmap("inspect", str(glm), "--trust-remote-code")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "modeling_chatglm.py:" in line and "max_length" in line and "4.40" in line


# --------------------------------------------------------------------------- transformers 4.40
@only_tf4
def test_skeleton_finds_units_and_sides(glm):
    prep = pipeline.prepare(request(glm))
    sk = prep.skeleton
    assert sk.no_split == ("GLMBlock",) and [u.layer for u in sk.units if u.kind == "block"] == [0, 1, 2, 3]
    groups = {g.name: set(g.units) for g in sk.groups}
    assert groups["input"] == {"transformer.embedding", "transformer.rotary_pos_emb"}
    assert groups["output"] == {"transformer.encoder.final_layernorm", "transformer.output_layer"}


@only_tf4
def test_analytic_estimate_reads_chatglm_names(glm):
    """KV per layer from multi_query_group_num and kv_channels, not num_attention_heads."""
    sk = pipeline.prepare(request(glm)).skeleton
    w = Workload(1, 64, 32)
    est = profile.estimate(sk, w)
    per_layer = 2 * CHATGLM["multi_query_group_num"] * CHATGLM["kv_channels"] * 4 * (64 + 32)
    assert {c.kv_bytes for c in est.costs if c.name.startswith("transformer.encoder.layers.")} == {per_layer}
    tc = profile.text_config(sk.config)
    assert (tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim, tc.vocab_size) == (4, 2, 16, 320)


@only_tf4
def test_plan_on_two_gpus_is_simulated_and_each_gpu_holds_its_layers_kv(glm):
    req = request(glm, gpus="2x1GiB")
    plan = pipeline.plan(req)
    assert plan.fits and plan.estimate == "simulate", plan.estimate
    assert {plan.device_map[u] for u in ("transformer.embedding", "transformer.rotary_pos_emb")} == {0}
    kv = {d.device: d.kv_bytes for d in plan.devices if d.device.isdigit()}
    per_layer = 2 * 2 * 16 * 4 * (64 + 32)
    layers = {d: sum(1 for u, dev in plan.device_map.items() if str(dev) == d and ".layers." in u) for d in kv}
    for d in kv:  # within one token of the full context per layer
        assert abs(kv[d] - layers[d] * per_layer) <= layers[d] * 2 * 2 * 16 * 4, (d, kv, layers)


@only_tf4
def test_check_of_the_plan_is_clean(glm, tmp_path):
    out = tmp_path / "plan.json"
    r = fitmap("plan", str(glm), "--gpus", "2x1GiB", "--trust-remote-code", "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = fitmap("check", str(glm), "--plan", str(out), "--trust-remote-code")
    assert r.returncode == 0, r.stderr
    assert "no device mismatch" in r.stdout and "mismatch:" not in r.stdout


@only_tf4
def test_check_of_a_naive_auto_map_reports_the_error_and_repairs_it(glm, tmp_path):
    """accelerate's infer_auto_device_map with no no-split classes cuts a GLMBlock in two;
    the residual add meets cuda:0 and cuda:1 at a line of the model's file."""
    from accelerate import infer_auto_device_map, init_empty_weights

    config = transformers.AutoConfig.from_pretrained(glm, trust_remote_code=True)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    total = sum(p.numel() * 4 for p in model.parameters())
    dm = infer_auto_device_map(
        model, max_memory={0: int(total * 0.45), 1: int(total * 0.8)}, no_split_module_classes=[]
    )
    assert any(k.count(".") > 3 for k in dm), dm  # a block is split
    user_map = tmp_path / "map.json"
    user_map.write_text(json.dumps({k: f"cuda:{v}" if isinstance(v, int) else v for k, v in dm.items()}))
    r = fitmap("check", str(glm), "--plan", str(user_map), "--gpus", "2x1GiB", "--trust-remote-code")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "mismatch: aten.add in transformer.encoder.layers." in text and "modeling_chatglm.py:" in text
    assert "repair:" in text and "no device mismatch after repairs" in text
    written = json.loads((tmp_path / "map.fitmap.json").read_text())
    units = {u.name for u in pipeline.prepare(request(glm)).skeleton.units}
    assert set(written["device_map"]) == units and written["repairs"] == []


@only_tf4
def test_run_on_cpu_and_disk_answers_through_its_own_chat_like_the_unsplit_model(glm, tmp_path):
    from fitmap.runtime.run import answer

    tok = transformers.AutoTokenizer.from_pretrained(glm, trust_remote_code=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(glm, trust_remote_code=True).eval()
    expected, _ = ref.chat(tok, "hello world", max_new_tokens=12, do_sample=False, num_beams=1)
    del ref
    plan_file = tmp_path / "cpu_disk.json"
    machine = dict(cpu="800KiB", disk=str(tmp_path / "disk"))
    (tmp_path / "disk").mkdir()
    req = request(glm, Workload(1, 64, 12), **machine)
    plan = pipeline.plan(req)
    assert plan.fits and {str(d) for d in plan.device_map.values()} == {"cpu", "disk"}, plan.device_map
    plan.save(plan_file)
    got = answer(str(glm), "hello world", [], 12, make_machine(**machine), str(plan_file), True, out=None)
    assert got.text == expected and expected


@only_tf4
def test_split_across_two_processes_answers_through_its_own_chat_like_the_unsplit_model(glm, tmp_path):
    """ChatGLM3's blocks take and return their own layer's ``kv_cache`` tuple: rank 1 keeps its layers'
    and sends a marker back, which the model carries in its ``past_key_values`` as it would the tuple."""
    tok = transformers.AutoTokenizer.from_pretrained(glm, trust_remote_code=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(glm, trust_remote_code=True).eval()
    expected, _ = ref.chat(tok, "hello world", max_new_tokens=12, do_sample=False, num_beams=1)
    whole = sum(p.nbytes for p in ref.parameters())
    del ref
    pipeline.plan(request(glm, Workload(1, 64, 12), cpu="4GiB")).save(tmp_path / "p.json")
    text, held = _torchrun_answer(glm, tmp_path / "p.json", "hello world", 12)
    assert text.startswith(expected + "\n") and expected  # the answer may hold newlines
    assert 0 < min(held) and sum(held) <= 1.01 * whole


@only_tf4
def test_generate_is_there_however_often_the_class_is_built(glm):
    from fitmap.model.build import build_model, empty_weights, load_config
    from fitmap.model.inventory import inventory

    config = load_config(inventory(str(glm)), True)
    for _ in range(2):
        with empty_weights():
            model = build_model(config, "causal-lm", torch.float32, True)
        assert callable(getattr(model, "generate", None))


@only_tf4
def test_check_of_a_plan_whose_map_splits_a_block(glm, tmp_path):
    """The seed's recipe: layer 1's attention on GPU 0, its MLP on GPU 1, in a fitmap plan."""
    out = tmp_path / "plan.json"
    assert fitmap("plan", str(glm), "--gpus", "2x1GiB", "--trust-remote-code", "--out", str(out)).returncode == 0
    plan = json.loads(out.read_text())
    dm = {}
    for k, v in plan["device_map"].items():
        if k == "transformer.encoder.layers.1":
            dm |= {
                f"{k}.{sub}": d
                for sub, d in (
                    ("input_layernorm", 0),
                    ("self_attention", 0),
                    ("post_attention_layernorm", 1),
                    ("mlp", 1),
                )
            }
        else:
            dm[k] = v
    out.write_text(json.dumps(plan | {"device_map": dm}))
    r = fitmap("check", str(glm), "--plan", str(out), "--trust-remote-code")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "modeling_chatglm.py:" in text and "repair: align-outputs transformer.encoder.layers.1.mlp" in text
    assert "transformer.encoder.layers.1" in json.loads(out.read_text())["device_map"]


# --------------------------------------------------------------------------- InternVL (both lines)
def _unsplit(directory):
    """The whole model on the CPU, its weights read with safetensors: the reference. (On
    transformers 5 ``from_pretrained`` itself fails on this 4.x-style code: no ``post_init``.)"""
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=True)
    model = transformers.AutoModel.from_config(config, trust_remote_code=True)
    missing, unexpected = model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    assert not unexpected and all("rotary" in k or "inv_freq" in k for k in missing), (missing, unexpected)
    return model.eval()


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    return make_remote("internvl", tmp_path_factory.mktemp("remote_internvl"))


def test_internvl_plan_with_an_image_is_simulated_with_the_vision_side_together(internvl):
    """llm_config, InternViT's linspace().item() in __init__, forward(pixel_values, ..., image_flags) with
    no **kwargs, its own generate() handing inputs_embeds to the language model."""
    req = request(internvl, Workload(1, 64, 16, ((112, 56),)), gpus="2x1GiB")
    prep = pipeline.prepare(req)
    plan = pipeline.plan(req, prep)
    assert plan.fits and plan.estimate == "simulate", plan.estimate
    side = {plan.device_map[u] for u in ("vision_model", "mlp1", "language_model.model.embed_tokens")}
    assert len(side) == 1
    # 112x56 -> a 2x1 grid plus a thumbnail: 3 tiles of (56/14)^2 * 0.5^2 = 4 tokens
    assert profile.estimate(prep.skeleton, req.workload).image_tokens == 12
    kv = sum(d.kv_bytes for d in plan.devices)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head_dim x fp32
    assert abs(kv - per_token * (64 + 12 + 16)) <= 2 * per_token, kv


def test_internvl_check_and_the_check_of_a_naive_map(internvl, tmp_path):
    out = tmp_path / "plan.json"
    args = ("--gpus", "2x1GiB", "--prompt", "64", "--new", "16", "--image", "112x56", "--trust-remote-code")
    assert fitmap("plan", str(internvl), *args, "--out", str(out)).returncode == 0
    r = fitmap("check", str(internvl), "--plan", str(out), "--trust-remote-code")
    assert r.returncode == 0 and "no device mismatch" in r.stdout, r.stdout + r.stderr
    split = {
        "vision_model": 0,
        "mlp1": 0,
        "language_model.model.embed_tokens": 0,
        "language_model.model.layers.0.input_layernorm": 0,
        "language_model.model.layers.0.self_attn": 0,
        "language_model.model.layers.0.post_attention_layernorm": 1,
        "language_model.model.layers.0.mlp": 1,
        "language_model.model.layers.1": 1,
        "language_model.model.norm": 1,
        "language_model.lm_head": "cuda:1",
    }
    if not TF4:
        split["language_model.model.rotary_emb"] = 0
    (tmp_path / "map.json").write_text(json.dumps(split))
    r = fitmap("check", str(internvl), "--plan", str(tmp_path / "map.json"), "--gpus", "2x1GiB", "--trust-remote-code")
    assert r.returncode == 0, r.stdout + r.stderr
    text = " ".join(r.stdout.split())
    assert "mismatch: aten.add in language_model.model.layers.0 got tensors on cuda:0 and cuda:1" in text, text
    assert "no device mismatch after repairs" in text
    assert "language_model.model.layers.0" in json.loads((tmp_path / "map.fitmap.json").read_text())["device_map"]


def test_internvl_generate_loop_on_two_gpus_appends_on_the_input_device(internvl, monkeypatch):
    """InternVL's own generate() decodes on its language model, whose lm_head the plan puts on the last GPU;
    transformers 4.x's greedy loop appends each token to ids on the input device, taking the logits where
    lm_head left them. fitmap gives the language model the top model's outputs hook, so the replay of that
    step is clean; without the hook the check names generate's line (on 5.x the loop moves the logits)."""
    from fitmap.dispatch import hooks
    from fitmap.simulation.simulate import simulate

    req = request(internvl, Workload(1, 64, 8, ((112, 56),)), gpus="2x1GiB")
    prep = pipeline.prepare(req)
    plan = pipeline.plan(req, prep)
    assert plan.device_map["language_model.lm_head"] != plan.device_map["language_model.model.embed_tokens"]
    sk = prep.skeleton
    sim = simulate(sk.config, prep.inventory.task, sk, plan, trust_remote_code=True)
    assert sim.mismatch is None and sim.stage == "done"
    if TF4:
        monkeypatch.setattr(hooks, "generation_owner", lambda model: model)
        sim = simulate(sk.config, prep.inventory.task, sk, plan, trust_remote_code=True)
        assert sim.mismatch is not None and sim.stage == "next token" and "generate()" in sim.mismatch.code


def _internvl_answer(internvl, tmp_path):
    """A 112x56 image (saved as img.png) and what the unsplit model's own chat() answers about it."""
    from PIL import Image

    from fitmap.runtime.prompting import internvl_tiles

    image = Image.new("RGB", (112, 56))
    image.putdata([((x * 7) % 256, (y * 11) % 256, ((x + y) * 5) % 256) for y in range(56) for x in range(112)])
    image.save(tmp_path / "img.png")
    tok = transformers.AutoTokenizer.from_pretrained(internvl, trust_remote_code=True)
    ref = _unsplit(internvl)
    pixels = internvl_tiles(ref.config, image)
    assert pixels.shape == (3, 3, 56, 56)
    whole = sum(t.nbytes for t in [*ref.parameters(), *ref.buffers()])  # one copy of every tensor
    return image, ref.chat(tok, pixels, "What is in the image?", dict(max_new_tokens=8, do_sample=False)), whole


def test_internvl_split_across_two_processes_answers_like_the_unsplit_model(internvl, tmp_path):
    """Remote code across ranks, as a user runs it: ``torchrun --nproc-per-node 2 -m fitmap run``. Rank 0
    answers through InternVL2's own chat() (vision side, embeddings, first block, head); rank 1 runs the
    last block with its own cache (on transformers 4.x a block returns the cache it updated, and the model
    rebuilds its cache object every step). Each rank holds only its own units."""
    _, expected, whole = _internvl_answer(internvl, tmp_path)
    pipeline.plan(request(internvl, Workload(1, 64, 8, ((112, 56),)), cpu="4GiB")).save(tmp_path / "p.json")
    image = ["--image", str(tmp_path / "img.png")]
    text, held = _torchrun_answer(internvl, tmp_path / "p.json", "What is in the image?", 8, image)
    assert text.startswith(expected + "\n") and expected  # the answer may hold newlines
    assert sum(held) <= 1.01 * whole  # one copy of the model across the ranks, not one per rank


def _torchrun_answer(model, plan, prompt: str, new: int, extra: tuple = ()) -> tuple[str, list[float]]:
    """``fitmap run`` under ``torchrun --nproc-per-node 2``: what it prints (the answer first, then the memory
    table), and what each rank says it holds."""
    import os
    import re
    from pathlib import Path

    from tests.runtime.test_distributed import _size
    from tests.serve.server import free_port

    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node=2", f"--master-port={free_port()}"]
    cmd += ["-m", "fitmap.cli", "run", str(model), "--plan", str(plan), "--prompt", prompt, "--new", str(new)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "FITMAP_DIST_TIMEOUT": "20"}
    done = subprocess.run(cmd + [*extra, "--trust-remote-code"], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    held = dict(re.findall(r"fitmap rank (\d+): holds ([\d.]+ \w+) on cpu", done.stderr))
    assert sorted(held) == ["0", "1"], done.stderr[-2000:]
    return done.stdout, [_size(v) for v in held.values()]


def test_internvl_run_on_cpu_and_disk_with_an_image_answers_like_the_unsplit_model(internvl, tmp_path):
    from fitmap.runtime.run import answer

    image, expected, _ = _internvl_answer(internvl, tmp_path)
    (tmp_path / "disk").mkdir()
    tight = pipeline.plan(request(internvl, Workload(1, 64, 8, ((112, 56),)), cpu="1MiB"))
    # the advice path sizes --quantize with transformers' quantizer, which reads a tied-weights table
    # that 4.x code never sets up on 5.x (AttributeError before); the image's pixels count (102 KiB)
    assert not tight.fits and "--cpu" in tight.advice, tight.advice
    machine = dict(cpu="2MiB", disk=str(tmp_path / "disk"))
    req = request(internvl, Workload(1, 64, 8, ((112, 56),)), **machine)
    req.pins.update({"language_model.model.layers.0": "disk", "language_model.model.layers.1": "disk"})
    plan = pipeline.plan(req)
    assert plan.fits and "disk" in {str(d) for d in plan.device_map.values()}, plan.advice
    plan.save(tmp_path / "cd.json")
    got = answer(
        str(internvl),
        "What is in the image?",
        [image],
        8,
        make_machine(**machine),
        str(tmp_path / "cd.json"),
        True,
        out=None,
    )
    assert got.text == expected and expected


# --------------------------------------------------------------------------- CogVLM (both lines; run on 4.x)
@pytest.fixture(scope="module")
def cogvlm(tmp_path_factory):
    return make_remote("cogvlm", tmp_path_factory.mktemp("remote_cogvlm"))


def test_cogvlm_vision_registered_after_the_layers_is_on_the_input_side(cogvlm):
    """No model_type in its config; model.vision after model.layers; token_type_ids required by
    prepare_inputs_for_generation; experts picked per token by boolean masks; a float mask read
    with .all(): planned and simulated with an image."""
    req = request(cogvlm, Workload(1, 64, 16, ((80, 60),)), gpus="2x1GiB")
    prep = pipeline.prepare(req)
    groups = {g.name: set(g.units) for g in prep.skeleton.groups}
    assert "model.vision.transformer.layers.0" in groups["input"] and "model.embed_tokens" in groups["input"]
    assert groups["output"] == {"model.norm", "lm_head"}
    assert [u.kind for u in prep.skeleton.units][:2] == ["vision", "vision"]
    plan = pipeline.plan(req, prep)
    assert plan.fits and plan.estimate == "simulate", plan.estimate
    assert len({plan.device_map[u] for u in groups["input"]}) == 1
    kv = sum(d.kv_bytes for d in plan.devices)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x num_multi_query_heads x head_dim x fp32
    image = (56 // 14 // 2) ** 2 + 2
    assert abs(kv - per_token * (64 + image + 16)) <= 2 * per_token, kv


def test_cogvlm_naive_map_errors_are_found_and_repaired(cogvlm, tmp_path):
    split = {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1.input_layernorm": 0,
        "model.layers.1.self_attn": 1,
        "model.layers.1.post_attention_layernorm": 1,
        "model.layers.1.mlp": 1,
        "model.norm": 1,
        "model.vision": 1,
        "lm_head": 1,
    }
    (tmp_path / "map.json").write_text(json.dumps(split))
    r = fitmap("check", str(cogvlm), "--plan", str(tmp_path / "map.json"), "--gpus", "2x1GiB", "--trust-remote-code")
    assert r.returncode == 0, r.stdout + r.stderr
    text = " ".join(r.stdout.split())
    assert "mismatch: aten." in text and "modeling_cogvlm.py:" in text and "no device mismatch after repairs" in text


@pytest.fixture(params=["cogvlm", "cogvlm2"])
def either_cogvlm(request):
    return request.getfixturevalue(request.param)


@only_tf4
def test_cogvlm_run_with_an_image_through_its_own_conversation_inputs(either_cogvlm, tmp_path):
    """Also with ``"model_type": "cogvlm2"`` added by hand (``cogvlm2``): run asks for no processor file the
    model never had and answers through its own conversation inputs, as from_pretrained does."""
    from PIL import Image

    from fitmap.runtime.run import answer

    cogvlm = either_cogvlm

    image = Image.new("RGB", (80, 60), (120, 30, 200))
    tok = transformers.AutoTokenizer.from_pretrained(cogvlm, trust_remote_code=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(cogvlm, trust_remote_code=True).eval()
    built = ref.build_conversation_input_ids(tok, query="what is it?", history=[], images=[image])
    inputs = {k: built[k][None] for k in ("input_ids", "token_type_ids", "attention_mask")}
    out = ref.generate(**inputs, images=[[built["images"][0]]], max_new_tokens=8, do_sample=False, pad_token_id=300)
    expected = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    del ref
    (tmp_path / "disk").mkdir()
    machine = dict(cpu="1.5MiB", disk=str(tmp_path / "disk"))
    req = request(cogvlm, Workload(1, 64, 8, ((80, 60),)), **machine)
    req.pins.update({"model.layers.1": "disk"})
    plan = pipeline.plan(req)
    assert plan.fits and "disk" in {str(d) for d in plan.device_map.values()}, plan.advice
    plan.save(tmp_path / "cd.json")
    got = answer(
        str(cogvlm), "what is it?", [image], 8, make_machine(**machine), str(tmp_path / "cd.json"), True, out=None
    )
    assert got.text == expected and expected


@pytest.fixture(scope="module")
def cogvlm2(tmp_path_factory):
    """CogVLM2 as deployment guides leave it: ``"model_type": "cogvlm2"`` added to its config by hand."""
    renamed = make_remote("cogvlm", tmp_path_factory.mktemp("remote_cogvlm2"), model_type="cogvlm2")
    assert json.loads((renamed / "config.json").read_text())["model_type"] == "cogvlm2"
    return renamed


def test_cogvlm2_with_a_model_type_added_by_hand_is_known_by_its_class(cogvlm, cogvlm2):
    """fitmap knows the model by its class (architectures / auto_map), not by the unknown model_type: the
    image path, the simulated plan with an image and its map are the same as without the key."""
    work = Workload(1, 64, 8, ((80, 60),))
    plan = pipeline.plan(request(cogvlm2, work, gpus="2x1GiB"))
    original = pipeline.plan(request(cogvlm, work, gpus="2x1GiB"))
    assert plan.estimate == original.estimate == "simulate" and plan.device_map == original.device_map
    gpus = lambda p: [d for d in p.devices if d.device != "cpu"]  # free RAM moves between the two plans
    assert gpus(plan) == gpus(original)


def test_a_users_internvl_map_is_checked_as_accelerate_dispatches_it(internvl, tmp_path):
    """The map a user writes for InternVL2 — the vision tower on GPU 0, the language model and the
    projector on GPU 1 — replayed as accelerate runs it (inputs on ``model.device``, every module under a
    key moving its inputs, so the embedding the model calls directly gets its ids): the two errors a
    user meets in the model's own forward, then repaired by moving the image features and the
    embeddings to where the inputs are."""
    user_map = tmp_path / "map.json"
    user_map.write_text(json.dumps({"vision_model": "cuda:0", "language_model": "cuda:1", "mlp1": "cuda:1"}))
    r = fitmap(
        "check",
        str(internvl),
        "--plan",
        str(user_map),
        "--gpus",
        "2x1GiB",
        "--image",
        "112x56",
        "--prompt",
        "64",
        "--new",
        "16",
        "--trust-remote-code",
    )
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert text.count("mismatch: aten.index in the top-level model") == 2 and "modeling_internvl_chat.py:" in text
    assert "vit_embeds[image_flags == 1]" in text  # the model's own line, printed as written
    assert "repair: align-outputs mlp1 -> cuda:0" in text and "no device mismatch after repairs" in text
