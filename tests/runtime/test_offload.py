"""Offload equivalence: a model split into cpu + disk (read per forward, one unit
ahead) generates exactly what the unsplit model generates."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from fitmap.runtime import loader, offload
from tests.runtime.test_loader import plan_for, reference

TEXT_IDS = torch.tensor([[1, 17, 33, 41, 99, 250, 7, 300], [1, 400, 5, 6, 8, 13, 21, 34]])


def vl_inputs() -> dict[str, torch.Tensor]:
    """A processor-like Qwen2-VL input: one 56x56 image (4x4 patches -> 4 merged tokens) and text."""
    ids = torch.tensor([[1, 502, 500, 500, 500, 500, 503, 17, 33, 41, 99]])
    gen = torch.Generator().manual_seed(0)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == 500).int(),
        pixel_values=torch.randn(16, 3 * 2 * 14 * 14, generator=gen),
        image_grid_thw=torch.tensor([[1, 4, 4]]),
    )


CASES = {
    "llama": (lambda: dict(input_ids=TEXT_IDS), ["model.layers.2", "model.layers.3"]),
    "qwen2_vl": (
        vl_inputs,
        ["model.visual.blocks.1", "model.language_model.layers.2", "model.language_model.layers.3"],
    ),
}


@pytest.fixture(scope="module")
def references(checkpoints):
    """family -> (greedy tokens, logits) of the unsplit transformers model."""
    out = {}
    for family, (inputs, _) in CASES.items():
        model = reference(checkpoints(family))
        with torch.no_grad():
            out[family] = (model.generate(**inputs(), max_new_tokens=8, do_sample=False), model(**inputs()).logits)
    return out


@pytest.mark.parametrize("readahead", [True, False], ids=["readahead", "sync"])
@pytest.mark.parametrize("family", list(CASES))
def test_cpu_plus_disk_equals_unsplit(checkpoints, references, family, readahead):
    inputs, on_disk = CASES[family]
    d = checkpoints(family)
    tokens, logits = references[family]
    with loader.load(d, plan_for(d, {u: "disk" for u in on_disk}), readahead=readahead, progress=False) as lm:
        assert all(p.is_meta for u in on_disk for p in lm.model.get_submodule(u).parameters())
        with torch.inference_mode():  # as fitmap run generates
            got = lm.model.generate(**inputs(), max_new_tokens=8, do_sample=False)
        with torch.no_grad():
            got_logits = lm.model(**inputs()).logits
        stats = lm.offload_stats
    assert torch.equal(got, tokens)
    torch.testing.assert_close(got_logits, logits, rtol=0, atol=1e-5)
    assert stats.fetched >= 9 * len(on_disk) - 8  # vision units do not run in decode steps
    assert (stats.prefetched > 0) == readahead


def test_disk_weights_are_dropped_after_each_unit(checkpoints):
    """While a disk unit runs it is the only disk unit holding weights (the next one may be
    in flight on the read-ahead thread); after its forward its weights are gone."""
    _, on_disk = CASES["llama"]
    d = checkpoints("llama")
    seen = []
    with loader.load(d, plan_for(d, {u: "disk" for u in on_disk}), progress=False) as lm:
        units = [lm.model.get_submodule(u) for u in on_disk]

        def count(module, args):
            seen.append(sum(not u.self_attn.q_proj.weight.is_meta for u in units))

        for u in units:
            u.register_forward_pre_hook(count)  # runs after the offload pre-hook
        lm.model.generate(input_ids=TEXT_IDS, max_new_tokens=3, do_sample=False)
        after = [u.self_attn.q_proj.weight.is_meta for u in units]
    assert seen and set(seen) == {1}
    assert all(after)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor, skip_first: bool = False) -> torch.Tensor:
        for i, b in enumerate(self.blocks):
            if not (skip_first and i == 0):
                x = b(x)
        return x


def test_reads_happen_ahead_on_the_readahead_thread():
    torch.manual_seed(0)
    model = Tiny()
    weights = {f"blocks.{i}": {k: v.clone() for k, v in b.state_dict().items()} for i, b in enumerate(model.blocks)}
    x = torch.randn(2, 4)
    want = model(x)
    threads: list[str] = []

    def reader(path):
        def read():
            threads.append(threading.current_thread().name)
            return weights[path]

        return read

    for b in model.blocks:
        b.to("meta")
    units = [offload.Offloaded(p, tuple(weights[p]), reader(p)) for p in weights]
    off = offload.attach(model, units, torch.device("cpu"), readahead=True)
    torch.testing.assert_close(model(x), want)
    assert threads and all(t.startswith("fitmap-readahead") for t in threads)
    model(x, skip_first=True)  # the order changes: one prefetch is wasted, then learned
    model(x, skip_first=True)
    s = off.streamer.stats
    assert s.wasted == 1 and off.streamer.next[offload.ENTRY] == "blocks.1"
    off.close()
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_tier_streams_to_gpu(checkpoints):
    d = checkpoints("llama")
    plan = plan_for(
        d,
        {
            "model.embed_tokens": 0,
            "model.rotary_emb": 0,
            "model.layers.0": 0,
            "model.layers.1": "cpu",
            "model.layers.2": "cpu",
            "model.layers.3": "disk",
            "model.norm": 0,
            "lm_head": 0,
        },
        execution_device="0",
    )
    tokens = reference(d).generate(input_ids=TEXT_IDS, max_new_tokens=8, do_sample=False)
    with loader.load(d, plan, progress=False) as lm:
        assert lm.model.model.layers[1].self_attn.q_proj.weight.is_pinned()
        got = lm.model.generate(input_ids=TEXT_IDS.to(lm.input_device), max_new_tokens=8, do_sample=False)
    assert torch.equal(got.cpu(), tokens)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_per_expert_moe_on_gpu_cpu_and_disk_tiers(checkpoints):
    """A checkpoint with one tensor per expert: fused by transformers' converter straight onto the GPU,
    into pinned host memory for the cpu tier, and at each forward for the disk tier; same tokens."""
    d = checkpoints("qwen3_moe")
    plan = plan_for(
        d,
        {
            "model.embed_tokens": 0,
            "model.rotary_emb": 0,
            "model.layers.0": 0,
            "model.layers.1": "cpu",
            "model.layers.2": "disk",
            "model.layers.3": 0,
            "model.norm": 0,
            "lm_head": 0,
        },
        execution_device="0",
    )
    tokens = reference(d).generate(input_ids=TEXT_IDS, max_new_tokens=8, do_sample=False)
    with loader.load(d, plan, progress=False) as lm:
        layers = lm.model.model.layers
        assert layers[0].mlp.experts.gate_up_proj.device.type == "cuda"
        assert layers[1].mlp.experts.gate_up_proj.is_pinned()
        assert layers[2].mlp.experts.gate_up_proj.is_meta
        got = lm.model.generate(input_ids=TEXT_IDS.to(lm.input_device), max_new_tokens=8, do_sample=False)
    assert torch.equal(got.cpu(), tokens)


def test_planned_by_fitmap_then_loaded(checkpoints, references, tmp_path):
    """The whole path: fitmap.plan with a small RAM budget spills blocks to disk; the load runs them."""
    import fitmap

    d = checkpoints("llama")
    plan = fitmap.plan(str(d), gpus=None, cpu="800KiB", disk=str(tmp_path), prompt=16, new=8)
    assert plan.fits and "disk" in plan.device_map.values()
    with loader.load(d, plan, progress=False) as lm:
        got = lm.model.generate(input_ids=TEXT_IDS, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, references["llama"][0])


class Chain(nn.Module):
    """Square Linear blocks, each with its own weights: a block run with another's weights shows."""

    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("buffers", [2, 4])
@pytest.mark.parametrize("slow", ["compute", "copy"])
def test_ring_orders_copies_and_compute(slow, buffers):
    """cpu-tier units through the reused device buffers give the all-GPU result exactly, whether
    the compute is slower than the copies (a copy must wait before overwriting a buffer still being
    read) or the copies are slower (a unit must wait for its copy), with one unit or several in flight;
    no memory is allocated per unit."""
    import copy

    torch.manual_seed(0)
    width = 4096 if slow == "copy" else 512
    model = Chain(6, width)
    x = torch.randn(8, width)
    dev = torch.device("cuda", 0)
    with torch.no_grad():
        want = copy.deepcopy(model).to(dev)(x.to(dev))
    units = [offload.Offloaded(f"blocks.{i}", ("weight", "bias")) for i in range(6)]
    off = offload.attach(model, units, dev, ring_buffers=buffers)
    if slow == "compute":
        for b in model.blocks:
            b.register_forward_pre_hook(lambda m, a: torch.cuda._sleep(2_000_000))  # ~1 ms on the compute stream
    assert len(off.streamer.ring.buffers) == buffers and model.blocks[0].weight.is_pinned()
    with torch.no_grad():
        model(x.to(dev))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(dev)
        for _ in range(4):
            got = model(x.to(dev))
            assert torch.equal(got, want)
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(dev) - before < 1 << 20
    assert model.blocks[3].weight.device.type == "cpu"  # host tensors back between forwards
    off.close()
