"""MoE experts computed where they live: a block's routed experts placed ``cpu-compute`` stay in RAM and
run there while the rest of the block is streamed (here from disk); the tokens are from_pretrained's, and a
step reads only the experts its tokens are routed to."""

from __future__ import annotations

import pytest
import torch

from fitmap.planning.experts import CPU_COMPUTE, DISK_COMPUTE
from fitmap.runtime import loader
from tests.runtime.test_loader import IDS, plan_for, reference

MOE = ["qwen3_moe", "mixtral", "deepseek_v3", "llama4"]


def _experts_plan(d, where=CPU_COMPUTE):
    """Every block on disk, its experts computed on the CPU (``where``: from RAM or from disk)."""
    from fitmap.model.inventory import inventory
    from fitmap.model.skeleton import skeleton

    sk = skeleton(inventory(d), torch.float32)
    moe = [u for u in sk.units if u.experts]
    plan = plan_for(d, {u.name: "disk" for u in moe})
    device_map: dict[str, int | str] = {}
    for name, dev in plan.device_map.items():
        device_map[name] = dev
        experts = next((u.experts for u in moe if u.name == name), None)
        if experts:
            device_map[experts] = where
    from dataclasses import replace

    return replace(plan, device_map=device_map), moe


@pytest.mark.parametrize("family", MOE)
def test_experts_computed_on_the_cpu_give_from_pretraineds_tokens(checkpoints, family):
    d = checkpoints(family)
    plan, moe = _experts_plan(d)
    assert moe, "the tiny model has MoE blocks"
    want = reference(d).generate(input_ids=IDS, max_new_tokens=8, do_sample=False)
    with loader.load(d, plan, progress=False) as lm:
        block = lm.model.get_submodule(moe[-1].name)
        experts = lm.model.get_submodule(str(moe[-1].experts))
        resident = list(experts.parameters())
        assert resident and all(p.device.type == "cpu" and not p.is_meta for p in resident)  # in RAM, not streamed
        rest = [p for n, p in block.named_parameters() if ".experts." not in f".{n}"]
        assert all(p.is_meta for p in rest)  # the rest of the block comes from disk per forward
        got = lm.model.generate(input_ids=IDS, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_a_step_reads_only_the_experts_its_tokens_are_routed_to(checkpoints):
    """After a decode step, every expert no token was routed to is made NaN: the same step gives the same
    logits, so those experts' weights were never read (a dense expert computation would spread the NaN)."""
    d = checkpoints("qwen3_moe")
    plan, moe = _experts_plan(d)
    with loader.load(d, plan, progress=False) as lm, torch.no_grad():
        routed: dict[str, set[int]] = {}

        def record(name):
            def hook(module, args, kwargs):
                index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
                routed.setdefault(name, set()).update(int(i) for i in index.flatten())

            return hook

        handles = [
            lm.model.get_submodule(str(u.experts)).register_forward_pre_hook(record(u.name), with_kwargs=True)
            for u in moe
        ]
        step = IDS[:, :1]
        before = lm.model(input_ids=step).logits
        for h in handles:
            h.remove()
        untouched = 0
        for u in moe:
            experts = lm.model.get_submodule(str(u.experts))
            for p in experts.parameters():
                idle = [e for e in range(p.shape[0]) if e not in routed[u.name]]
                p.data[idle] = float("nan")
                untouched += len(idle)
        assert untouched > 0  # some experts were not routed to
        after = lm.model(input_ids=step).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_gpt_oss_mxfp4_experts_computed_on_the_cpu_stay_packed_and_give_from_pretraineds_tokens(tmp_path):
    """The released layout (MXFP4 experts): where transformers unpacks every expert to bf16 on load (no MXFP4
    kernels), experts computed on the CPU keep the checkpoint's packed bytes in RAM and unpack, per forward,
    only the experts its tokens are routed to; the tokens are from_pretrained's."""
    from tests.runtime.test_loader import _gpt_oss_mxfp4

    d = _gpt_oss_mxfp4(tmp_path / "gpt-oss")
    plan, moe = _experts_plan(d)
    assert moe
    want = reference(d).generate(input_ids=IDS, max_new_tokens=8, do_sample=False)
    with loader.load(d, plan, progress=False) as lm:
        experts = lm.model.get_submodule(str(moe[-1].experts))
        assert experts.gate_up_proj.is_meta and experts.down_proj.is_meta  # never unpacked whole
        assert experts.gate_up_proj_bias.device.type == "cpu" and not experts.gate_up_proj_bias.is_meta
        unpacked: list[int] = []
        experts.register_forward_pre_hook(lambda m, a, k: unpacked.append(m.num_experts), with_kwargs=True)
        got = lm.model.generate(input_ids=IDS[:1, :1], max_new_tokens=1, do_sample=False)
        assert got.shape[1] == 2 and unpacked == [2]  # one token, routed to 2 of the 4 experts
        got = lm.model.generate(input_ids=IDS, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    assert lm.bytes_read < sum(f.stat().st_size for f in d.glob("*.safetensors")) * 1.01  # packed, as stored


def test_a_vlm_moe_with_its_experts_on_the_cpu_gives_from_pretraineds_tokens_with_an_image(checkpoints):
    """Qwen3-VL-MoE: the vision tower and the rest of each block as planned, the routed experts in RAM."""
    from fitmap.planning.workload import Workload
    from fitmap.simulation.vision_inputs import vision_inputs

    d = checkpoints("qwen3_vl_moe")
    plan, moe = _experts_plan(d)
    assert moe
    want_model = reference(d)
    inputs, _ = vision_inputs(want_model.config, Workload(1, 12, 6, ((100, 80),)), torch.device("cpu"))
    inputs["pixel_values"] = torch.randn(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(0))
    want = want_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with loader.load(d, plan, progress=False) as lm:
        got = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "llama4", "gpt_oss_mxfp4", "deepseek_fp8"])
def test_experts_left_on_disk_read_only_the_routed_ones_and_give_from_pretraineds_tokens(checkpoints, tmp_path, family):
    """``disk-compute``: nothing of the experts is loaded; each forward reads the rows of the experts its tokens
    are routed to (per-expert tensors merged by transformers' converter, or a fused one's rows, MXFP4 included)."""
    from fitmap.runtime import routed
    from tests.runtime.test_loader import _deepseek_fp8, _gpt_oss_mxfp4

    if family == "gpt_oss_mxfp4":
        d = _gpt_oss_mxfp4(tmp_path / "gpt-oss")
    elif family == "deepseek_fp8":
        d = _deepseek_fp8(checkpoints("deepseek_v3"), tmp_path / "fp8")
    else:
        d = checkpoints(family)
    plan, moe = _experts_plan(d, DISK_COMPUTE)
    want = reference(d).generate(input_ids=IDS, max_new_tokens=8, do_sample=False)
    fetched: list[tuple[int, int, int, int]] = []  # (experts chosen, experts in the layer, bytes read, stored)
    original = routed.FromDisk.fetch

    def fetch(self, name, chosen):
        before = self.read_bytes
        t = original(self, name, chosen)
        layer = lm.model.get_submodule(self.keys[name].rpartition(".")[0]).num_experts
        fetched.append((len(chosen), layer, self.read_bytes - before, self.ckpt.nbytes[self.keys[name]]))
        return t

    with loader.load(d, plan, progress=False) as lm:
        experts = lm.model.get_submodule(str(moe[-1].experts))
        assert all(p.is_meta for p in experts.parameters())  # nothing of them in RAM
        routed.FromDisk.fetch = fetch
        try:
            got = lm.model.generate(input_ids=IDS, max_new_tokens=8, do_sample=False)
        finally:
            routed.FromDisk.fetch = original
    assert torch.equal(got, want)
    # each read is the chosen experts' share of what the checkpoint stores for the parameter, no more
    assert fetched and all(read * layer == stored * n for n, layer, read, stored in fetched)
    assert any(n < layer for n, layer, _, _ in fetched)  # decode steps chose fewer than all the experts


def test_llama4s_experts_in_ram_compute_only_the_routed_ones(checkpoints):
    """Llama 4's experts module is given one row block per expert and computes all of them; computed on the CPU,
    fitmap narrows it to the experts some token is routed to (the rest give zero rows, as they would)."""
    from fitmap.runtime import routed

    d = checkpoints("llama4")
    plan, moe = _experts_plan(d)
    with loader.load(d, plan, progress=False) as lm, torch.no_grad():
        experts = lm.model.get_submodule(str(moe[-1].experts))
        assert routed.dense(experts)
        seen: list[int] = []
        experts.register_forward_pre_hook(lambda m, a, k: seen.append(m.num_experts), with_kwargs=True)
        lm.model(input_ids=IDS[:1, :1])
    top = lm.model.config.get_text_config().num_experts_per_tok
    assert seen == [top] and top < experts.num_experts


def test_fp8_experts_computed_on_the_cpu_stay_as_stored_and_give_from_pretraineds_tokens(checkpoints, tmp_path):
    """DeepSeek-V3 as released: its experts' FP8 weights and block scales stay in RAM as stored (half the
    bytes of bf16); a forward builds its routed experts with transformers' own FP8 unpacking and merge."""
    from fitmap.runtime import routed
    from tests.runtime.test_loader import _deepseek_fp8

    d = _deepseek_fp8(checkpoints("deepseek_v3"), tmp_path / "fp8")
    plan, moe = _experts_plan(d)
    want = reference(d).generate(input_ids=IDS, max_new_tokens=8, do_sample=False)
    fetched: list[int] = []
    original = routed.Stored.fetch

    def fetch(self, name, chosen):
        fetched.append(len(chosen))
        return original(self, name, chosen)

    with loader.load(d, plan, progress=False) as lm:
        experts = lm.model.get_submodule(str(moe[-1].experts))
        assert experts.gate_up_proj.is_meta and experts.down_proj.is_meta  # never unpacked whole
        routed.Stored.fetch = fetch
        try:
            got = lm.model.generate(input_ids=IDS, max_new_tokens=8, do_sample=False)
        finally:
            routed.Stored.fetch = original
    assert torch.equal(got, want)
    assert fetched and min(fetched) < experts.num_experts  # decode steps built fewer than all the experts


def test_disk_compute_on_a_unit_that_is_not_an_experts_module_is_refused_in_one_line(checkpoints):
    from dataclasses import replace

    from fitmap.errors import BadInput
    from tests.runtime.test_loader import plan_for

    d = checkpoints("qwen3_moe")
    plan = plan_for(d)
    block = next(u for u in plan.device_map if u.endswith(".1"))
    with pytest.raises(BadInput, match=f"puts {block} on disk-compute, which is for a MoE experts module"):
        loader.load(d, replace(plan, device_map={**plan.device_map, block: DISK_COMPUTE}), progress=False)
