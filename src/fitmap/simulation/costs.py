"""Per-unit costs measured on fake devices, for the planner: the whole model simulated on one
fake device at two prompt lengths (with one block of each kind where the model repeats them), each
unit's activation and cache read off, and interpolated to any workload's prompt. A block's cache is
split by the two points into what grows with each cached token (KV) and what does not (the conv and
recurrent states of a state-space or linear-attention layer)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from fitmap.model.skeleton import Skeleton, Unit
from fitmap.planning.profile import Profile, UnitCost, text_config
from fitmap.planning.workload import Workload
from fitmap.simulation.simulate import simulate


# --------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class _Point:
    tokens: int  # prefill tokens (batch x (prompt + image tokens))
    act: Mapping[str, int]  # unit -> activation bytes
    cache: Mapping[str, float]  # block -> cache bytes per sequence (KV and states) at full context
    cached: Mapping[str, int]  # block -> tokens its KV holds at full context


def measure_units(prep, workload: Workload, trust_remote_code: bool = False) -> tuple[_Point, int]:
    """Simulate everything on one fake device; per-unit activation and cache at ``workload``."""
    from fitmap.planning.devices import GpuSpec, Machine
    from fitmap.planning.plan import make_plan

    sk = prep.skeleton
    small, rep = fewer_layers(sk, trust_remote_code)
    run = small or sk
    big = Machine((GpuSpec(0, 1 << 60, 0, "simulated"),), 0, None, None)
    one = make_plan(prep.inventory.name, run, _any_costs(run, workload), big)
    sim = simulate(run.config, prep.inventory.task, run, one, workload, trust_remote_code=trust_remote_code)
    if sim.mismatch is not None:  # on one device this is a bug in the model code or in fitmap
        raise RuntimeError(sim.mismatch.message())
    tc = text_config(sk.config)
    seq = workload.prompt + sim.image_tokens + workload.new
    carried = workload.batch * (workload.prompt + sim.image_tokens) * tc.hidden_size * getattr(torch, sk.dtype).itemsize
    from fitmap.planning.profile import cached_tokens

    def source(u: Unit) -> tuple[str, int | None]:
        """The measured unit that stands for ``u``: itself, or the first block of its kind."""
        if small is None or u.layer is None:
            return u.name, u.layer
        return f"{sk.text_layers}.{rep[u.layer]}", rep[u.layer]

    act, held_cache, cached = {}, {}, {}
    first_block = next((i for i, u in enumerate(sk.units) if u.layer is not None), len(sk.units))
    at_blocks = (
        max(carried, sim.unit_entry.get(source(sk.units[first_block])[0], 0))
        if first_block < len(sk.units)
        else carried
    )
    for i, u in enumerate(sk.units):
        name, layer = source(u)
        # What is live when a unit starts, besides weights: before the first block (vision tower,
        # projector, embeddings) all of it is activation (the tower's attention mask, image features);
        # from the first block on, what was live there (the hidden state, masks and position tables made
        # above the blocks, Qwen3-VL's DeepStack features) while the KV cache grows beside it
        held = sim.unit_entry.get(name, 0) if i < first_block else at_blocks
        act[u.name] = sim.unit_activation.get(name, 0) + held
        if u.layer is not None:
            assert layer is not None  # source() stands a block for a block
            held_cache[u.name] = sim.unit_kv.get(name, 0) / max(1, workload.batch)
            cached[u.name] = cached_tokens(tc, layer, seq)
    return _Point(workload.batch * (workload.prompt + sim.image_tokens), act, held_cache, cached), sim.image_tokens


def _any_costs(sk: Skeleton, workload: Workload) -> Profile:
    """Costs to place everything on one unbounded fake device: the analytic ones, or none where the
    config does not give what they need (the simulation measures them)."""
    from fitmap.model.configs import MissingConfigValue
    from fitmap.planning.profile import estimate

    try:
        return estimate(sk, workload)
    except MissingConfigValue:
        costs = tuple(UnitCost(u.name, u.weight_bytes, 0, 0) for u in sk.units)
        return Profile("analytic", workload, costs, 0, workload.prompt + workload.new, 0)


def fewer_layers(sk: Skeleton, trust_remote_code: bool = False) -> tuple[Skeleton | None, dict[int, int]]:
    """The skeleton of the same model with only as many text blocks as it takes to hold one block
    of each kind (same parameters and bytes, same entry in every per-layer list of the config:
    ``layer_types``, ``mlp_only_layers`` ...), and each layer's representative. DeepSeek-V3's 61
    layers are 3 dense and 58 MoE: 4 blocks are simulated. None when nothing would be saved, or
    for remote code (its layers may differ by index in ways its config does not say)."""
    import copy

    from fitmap.model.configs import ALIASES

    blocks = [u for u in sk.units if u.layer is not None]
    if trust_remote_code or not blocks or any(u.name != f"{sk.text_layers}.{u.layer}" for u in blocks):
        return None, {}
    view = text_config(sk.config)
    tc = object.__getattribute__(view, "_config")
    count = len(blocks)
    lists = {
        k: v for k, v in vars(tc).items() if isinstance(v, (list, tuple)) and len(v) == count and not k.startswith("_")
    }
    prefix = len(sk.text_layers) + 1

    def layer(u: Unit) -> int:
        assert u.layer is not None  # called on blocks only
        return u.layer

    def kind(u: Unit) -> tuple:
        shape = tuple(sorted(p[prefix:].partition(".")[2] for p in u.params))
        return shape, u.weight_bytes, tuple(str(v[layer(u)]) for v in lists.values())

    first: dict[tuple, int] = {}
    rep: dict[int, int] = {}
    for u in sorted(blocks, key=layer):
        rep[layer(u)] = first.setdefault(kind(u), layer(u))
    n = max(max(first.values()) + 1, min(count, 2))
    if n >= count:
        return None, {}
    config = copy.deepcopy(sk.config)
    small_tc = object.__getattribute__(text_config(config), "_config")
    for k, v in lists.items():
        setattr(small_tc, k, type(v)(v[:n]))
    name = next(a for a in ALIASES["num_hidden_layers"] if getattr(small_tc, a, None) == count)
    setattr(small_tc, name, n)
    keep = {u.name for u in sk.units if u.layer is None or u.layer < n}
    small = replace(
        sk,
        config=config,
        units=tuple(u for u in sk.units if u.name in keep),
        groups=tuple(replace(g, units=tuple(x for x in g.units if x in keep)) for g in sk.groups),
    )
    return small, rep


@dataclass(frozen=True)
class SimulatedCosts:
    """Two simulated points; activations are linear in prefill tokens with fused attention,
    KV is linear in cached tokens, so other workloads interpolate exactly enough."""

    a: _Point
    b: _Point
    image_tokens: int

    def to_json(self) -> dict:
        return {"a": vars(self.a), "b": vars(self.b), "image_tokens": self.image_tokens}

    @classmethod
    def from_json(cls, d: dict) -> SimulatedCosts:
        point = lambda p: _Point(
            int(p["tokens"]),
            {k: int(v) for k, v in p["act"].items()},  # noqa: E731
            {k: float(v) for k, v in p["cache"].items()},
            {k: int(v) for k, v in p["cached"].items()},
        )
        return cls(point(d["a"]), point(d["b"]), int(d["image_tokens"]))

    def cache_split(self, sk: Skeleton, unit: Unit) -> tuple[float, float]:
        """Block ``unit``'s cache per sequence as (bytes per cached token, bytes at any length): the line
        through the two measured points. Where both points cached as many tokens (a window both prompts
        fill, a 1-token prompt), what the config says the layer keeps decides: a state or KV."""
        from fitmap.planning.profile import layer_caches

        a, b = self.a.cache[unit.name], self.b.cache[unit.name]
        ta, tb = self.a.cached[unit.name], self.b.cached[unit.name]
        if ta != tb:
            per_token = max(0.0, (a - b) / (ta - tb))
            return per_token, max(0.0, a - per_token * ta)
        assert unit.layer is not None  # blocks only
        if not layer_caches(text_config(sk.config), unit.layer)[0]:
            return 0.0, a
        return a / max(1, ta), 0.0

    def profile(self, sk: Skeleton, workload: Workload) -> Profile:
        from fitmap.planning.profile import peak_cached_tokens

        tc = text_config(sk.config)
        seq = workload.prompt + self.image_tokens + workload.new
        tokens = workload.batch * (workload.prompt + self.image_tokens)
        costs = []
        for u in sk.units:
            act = _linear(self.a.tokens, self.a.act[u.name], self.b.tokens, self.b.act[u.name], tokens)
            kv = 0
            if u.layer is not None:
                per_token, state = self.cache_split(sk, u)
                held = peak_cached_tokens(tc, u.layer, seq, seq - workload.new)
                kv = round(workload.batch * (per_token * held + state))
            costs.append(UnitCost(u.name, u.weight_bytes, kv, max(0, int(act))))
        boundary = tokens * tc.hidden_size * getattr(torch, sk.dtype).itemsize
        return Profile("simulate", workload, tuple(costs), self.image_tokens, seq, boundary)


def _linear(x0: int, y0: int, x1: int, y1: int, x: int) -> float:
    if x1 == x0:
        return y0 * (x / x0 if x0 else 1)
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def simulated_costs(prep, workload: Workload, trust_remote_code: bool = False) -> SimulatedCosts:
    a, img = measure_units(prep, workload, trust_remote_code)
    half = Workload(workload.batch, max(1, workload.prompt // 2), workload.new, workload.images)
    b, _ = measure_units(prep, half, trust_remote_code)
    return SimulatedCosts(a, b, img)
