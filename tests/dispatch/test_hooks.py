"""Boundary hooks: real CPU runs are unchanged; fake two-device runs go from a device
mismatch to a clean forward and decode."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM, DynamicCache

from fitmap.dispatch import hooks
from fitmap.model.build import build_model
from fitmap.model.compat import cache_kwarg, cache_of
from tests.tiny import config

D0, D1 = torch.device("meta:0"), torch.device("meta:1")
UNITS = [
    "model.embed_tokens",
    "model.rotary_emb",
    "model.layers.0",
    "model.layers.1",
    "model.layers.2",
    "model.layers.3",
    "model.norm",
    "lm_head",
]


def split(first_on_d1: int) -> dict[str, torch.device]:
    """Unit -> device: embeddings and blocks before ``first_on_d1`` on meta:0, the rest on meta:1."""
    return {u: D1 if i >= UNITS.index(f"model.layers.{first_on_d1}") else D0 for i, u in enumerate(UNITS)}


def place(model: nn.Module, placement: dict[str, torch.device]) -> None:
    """Move each unit's fake tensors to its fake device (see DESIGN.md: no .to() on parameters)."""
    for path, device in placement.items():
        for m in model.get_submodule(path).modules():
            for k, p in [(k, p) for k, p in m._parameters.items() if p is not None]:
                m._parameters[k] = nn.Parameter(p.detach().to(device), requires_grad=False)
            for k, b in [(k, b) for k, b in m._buffers.items() if b is not None]:
                m._buffers[k] = b.to(device)


@pytest.fixture
def fake_llama():
    """(mode, build): build(placement) -> tiny llama on fake meta:N devices."""
    mode = FakeTensorMode()

    def build(placement: dict[str, torch.device]) -> nn.Module:
        with mode:
            model = build_model(config("llama"), "causal-lm", torch.float32).eval()
            place(model, placement)
        return model

    return mode, build


def test_fake_split_fails_without_hooks(fake_llama):
    mode, build = fake_llama
    model = build(split(2))
    with mode, torch.no_grad():
        ids = torch.randint(0, 512, (2, 7)).to(D0)
        with pytest.raises(Exception, match="Expected all tensors to be on the same device"):
            model(input_ids=ids)


def test_fake_split_prefill_and_decode_with_hooks(fake_llama):
    mode, build = fake_llama
    model = build(split(2))
    h = hooks.attach(model, split(2), D0)
    assert h.hooked == ("model.layers.2", "model.layers.3", "model.norm", "lm_head")
    with mode, torch.no_grad():
        ids = torch.randint(0, 512, (2, 7)).to(D0)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, **{cache_kwarg(model): cache}, use_cache=True, output_hidden_states=True)
        assert out.logits.device == D0 and out.logits.shape == (2, 7, 512)
        assert {t.device for t in out.hidden_states} == {D0}
        assert [layer.keys.device for layer in cache.layers] == [D0, D0, D1, D1]  # KV stays per layer
        step = model(input_ids=out.logits[:, -1:].argmax(-1), **{cache_kwarg(model): cache_of(out)}, use_cache=True)
        assert step.logits.device == D0 and step.logits.shape == (2, 1, 512)
        assert cache.get_seq_length() == 8
    h.remove()
    with mode, torch.no_grad(), pytest.raises(Exception, match="same device"):
        model(input_ids=torch.randint(0, 512, (2, 7)).to(D0))


def test_broadcast_tensors_are_copied_once_per_device(fake_llama):
    """position_embeddings & co. cross to meta:1 once, however many layers run there."""
    mode, build = fake_llama
    copies = []
    for first in (1, 3):
        model = build(split(first))
        h = hooks.attach(model, split(first), D0)
        with mode, torch.no_grad():
            model(input_ids=torch.randint(0, 512, (1, 5)).to(D0))
        copies.append(h.mover.copies)
    assert copies[0] == copies[1]  # 3 layers on meta:1 cost what 1 layer costs
    assert copies[0] <= 6  # hidden state, cos, sin, position ids; logits back


def test_units_after_a_foreign_device_are_hooked():
    """A unit on the input device that runs after another device's unit receives foreign tensors."""
    placement = {"a": D0, "b": D1, "c": D0}
    assert [p for p, _ in hooks.boundary_units(placement, D0)] == ["b", "c"]
    assert hooks.boundary_units({"a": D0, "b": D0}, D0) == []


def test_mover_recurses_and_leaves_other_objects():
    mover = hooks.Mover()
    cache = DynamicCache()
    with FakeTensorMode():
        t = torch.zeros(3).to(D1)
        moved = mover.to({"x": (t, [t]), "cache": cache, "n": 3}, D0)
        assert moved["x"][0].device == D0 and moved["x"][1][0] is moved["x"][0]  # one copy, reused
        assert moved["cache"] is cache and moved["n"] == 3
        assert mover.copies == 1


def test_real_cpu_generate_unchanged_by_hooks():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config("llama")).eval()
    ids = torch.randint(3, 500, (2, 6))
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    cpu = torch.device("cpu")
    # every unit hooked through ``align``: the fast path runs on each call
    h = hooks.attach(model, {u: cpu for u in UNITS}, cpu, align=[(u, cpu) for u in UNITS])
    assert h.hooked == tuple(UNITS)
    got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(want, got)
    assert h.mover.copies == 0
    h.remove()
    assert not model._forward_pre_hooks and not model.lm_head._forward_pre_hooks


def test_mover_copies_again_after_an_in_place_change():
    mover = hooks.Mover()
    with FakeTensorMode():
        t = torch.zeros(3).to(D1)
        first = mover.to(t, D0)
        assert mover.to(t, D0) is first
        t.add_(1)
        assert mover.to(t, D0) is not first and mover.copies == 2


def test_boundary_copies_work_under_inference_mode():
    """``fitmap run`` generates under inference_mode, whose tensors have no version counter."""
    import transformers

    from fitmap.dispatch import hooks
    from tests.tiny import config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config("llama")).eval()
    units = [
        "model.embed_tokens",
        "model.rotary_emb",
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
        "model.layers.3",
        "model.norm",
        "lm_head",
    ]
    cpu, other = torch.device("cpu"), torch.device("cpu", 1)  # two labels, as cuda:0 / cuda:1 would be
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    h = hooks.attach(model, {u: other if i >= 4 else cpu for i, u in enumerate(units)}, cpu)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    h.remove()
    assert torch.equal(out, ref)


class _Parent(torch.nn.Module):
    """Top-level code of the kind HF models have: one broadcast tensor for every layer, and (when
    asked) a per-layer temporary, or the broadcast tensor changed in place between layers."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(n))
        self.held_past_unit: list[bool] = []

    def forward(self, x, bias, temporary=False, bump=False):
        for layer in self.layers:
            extra = torch.ones(4) if temporary else None
            ref = weakref.ref(extra) if temporary else None
            x = layer(x, bias=bias, extra=extra)
            del extra
            if temporary:
                self.held_past_unit.append(ref() is not None)
            if bump:
                bias.add_(1)
        return x


def _hooked_parent(device):
    model = _Parent()
    seen = []
    for layer in model.layers:
        layer.forward = (lambda f: lambda x, bias, extra: seen.append((bias.device, float(bias.sum()))) or f(x))(
            layer.forward
        )
    h = hooks.attach(
        model, {f"layers.{i}": device for i in range(4)}, torch.device("cpu"), every_unit=device.index is None
    )
    return model, h, seen


def test_broadcast_keywords_are_copied_once_and_again_after_an_in_place_change():
    model, h, seen = _hooked_parent(torch.device("cpu", 1))  # a second label: moving is a real copy
    x, bias = torch.zeros(1, 4), torch.zeros(4)
    with torch.no_grad():
        model(x, bias)
        # the hidden state is copied at each unit (a copy to ``cpu:1`` comes back labelled ``cpu``), the bias once
        assert h.mover.copies == 4 + 1 and [s for _, s in seen] == [0.0] * 4
        seen.clear()
        model(x, bias, bump=True)  # changed in place after each layer: each layer sees the new values
    assert [s for _, s in seen] == [0.0, 4.0, 8.0, 12.0] and h.mover.copies == 5 + 4 + 4
    assert all(s[0] == torch.device("cpu") for s in seen)  # a copy to ``cpu:1`` comes back labelled ``cpu``


def test_a_per_unit_temporary_is_not_held_past_its_unit():
    model, h, _ = _hooked_parent(torch.device("cpu"))
    with torch.no_grad():
        model(torch.zeros(1, 4), torch.zeros(4), temporary=True)
    assert model.held_past_unit == [False] * 4
