"""The stages wired together: MODEL + machine + workload -> Plan.

Who calls whom: ``inventory`` -> ``skeleton`` -> ``profile`` (estimate or
simulate) -> ``plan`` (solver). The CLI and the Python API both come through here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fitmap.errors import BadInput, FitmapError, remote_code_flag, where_in_model_code
from fitmap.model import quant
from fitmap.model.build import planned_dtype
from fitmap.model.inventory import Inventory, inventory
from fitmap.model.quant import METHODS
from fitmap.model.skeleton import Skeleton, skeleton
from fitmap.planning.devices import Machine
from fitmap.planning.plan import UNLIMITED, Plan, make_plan
from fitmap.planning.profile import Profile, estimate
from fitmap.planning.solver import Policy
from fitmap.planning.workload import Dtype, Workload
from fitmap.sizes import GiB, MiB, fmt_bytes, parse_size

if TYPE_CHECKING:
    from fitmap.simulation.costs import SimulatedCosts


@dataclass(frozen=True)
class PlanRequest:
    """Everything a plan depends on; field names match the CLI flags."""

    model: str
    machine: Machine
    workload: Workload = field(default_factory=Workload)
    dtype: Dtype = Dtype.AUTO
    policy: Policy = Policy.BALANCED
    pins: dict[str, str] = field(default_factory=dict)
    trust_remote_code: bool = False
    estimate: str = "simulate"  # "simulate" | "analytic"
    quantize: str | None = None  # quantize while loading: a key of fitmap.model.quant.METHODS

    def __post_init__(self) -> None:
        remote_code_flag(self.trust_remote_code)
        if self.quantize is not None and (not isinstance(self.quantize, str) or self.quantize not in METHODS):
            raise BadInput(f"quantize must be one of {', '.join(METHODS)}, not {self.quantize!r}")
        if self.estimate not in ("simulate", "analytic"):
            raise BadInput(f"estimate must be 'simulate' or 'analytic', not {self.estimate!r}")


@dataclass
class Prepared:
    """The model-dependent, workload-independent stages, computed once."""

    inventory: Inventory
    skeleton: Skeleton
    simulated: SimulatedCosts | None = None  # measured on first use
    simulation_error: str = ""  # why the simulation could not run (analytic costs then)


def prepare(req: PlanRequest) -> Prepared:
    inv = inventory(req.model)
    dtype = planned_dtype(inv, req.dtype.torch_name)
    return Prepared(inv, skeleton(inv, dtype, req.trust_remote_code, quantize=req.quantize))


def profile_for(prep: Prepared, req: PlanRequest, workload: Workload) -> Profile:
    """Simulated costs (measured once at the request's workload, interpolated for others)
    or the analytic estimate; a model the simulator cannot run falls back to the estimate."""
    if req.estimate == "simulate" and not prep.simulation_error:
        if prep.simulated is None:
            prep.simulated = _simulate_or_explain(prep, req)
        if prep.simulated is not None:
            return prep.simulated.profile(prep.skeleton, workload)
    return estimate(prep.skeleton, workload)


def _simulate_or_explain(prep: Prepared, req: PlanRequest):
    """Simulated costs for ``req``'s workload: from fitmap's cache when this model and workload
    were simulated before (by this fitmap, torch and transformers), else measured and kept."""
    from fitmap import cache
    from fitmap.simulation.costs import simulated_costs

    k = cache.key(prep.inventory, prep.skeleton.dtype, req.workload)
    failed = cache.load_failure(k)
    if failed is not None:  # this fitmap, torch and transformers cannot simulate it: known already
        prep.simulation_error = failed
        return None
    cached = _saved_costs(cache.load_costs(k))
    if cached is not None and {u.name for u in prep.skeleton.units} <= set(cached.a.act):
        return cached
    from fitmap.simulation.vision_inputs import UnsupportedInputs

    try:
        costs = simulated_costs(prep, req.workload, req.trust_remote_code)
        cache.save_costs(k, costs.to_json())
        return costs
    except UnsupportedInputs as e:
        prep.simulation_error = str(e).split(";")[0]
        return None
    except FitmapError:
        raise
    except Exception as e:  # model code the fake devices cannot run: say so, plan analytically
        first = str(e).splitlines()[0][:200] if str(e) else ""
        prep.simulation_error = f"{type(e).__name__}: {first}{where_in_model_code(e)}"
        cache.save_failure(k, prep.simulation_error)
        return None


def _saved_costs(data: dict | None):
    from fitmap.simulation.costs import SimulatedCosts

    try:
        return SimulatedCosts.from_json(data) if data is not None else None
    except (ValueError, KeyError, TypeError):
        return None


def prepare_for(model: str, plan: Plan, trust_remote_code: bool = False) -> Prepared:
    """``model`` prepared as ``plan`` was made: its dtype, its workload, its quantization (the
    weights are sized as the plan's; the simulation runs in that dtype)."""
    from fitmap.planning.devices import make_machine

    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(plan.dtype, "auto")
    return prepare(
        PlanRequest(
            model,
            make_machine(None, 1),
            plan.workload,
            Dtype(dtype),
            trust_remote_code=trust_remote_code,
            quantize=plan.quantize,
        )
    )


def plan(req: PlanRequest, prep: Prepared | None = None) -> Plan:
    """The plan for ``req``; when it does not fit, ``plan.advice`` says what would."""
    prep = prep or prepare(req)
    require_window(prep, req.workload)
    if req.workload.images and prep.inventory.task != "image-text-to-text":
        _images_by_code(prep, req.trust_remote_code)
    result = _plan_at(prep, req, req.workload)
    if prep.simulation_error:
        result = replace(result, estimate=f"analytic (simulation failed: {prep.simulation_error})")
    if not result.fits:
        result = replace(result, advice=advice(prep, req, result))
    return result


def _images_by_code(prep: Prepared, trust_remote_code: bool) -> None:
    """Images for a model whose ``config.json`` does not call them that (no ``vision_config`` key):
    taken when its own code takes them and its config object (its class's defaults) describes the
    vision tower, which sizes them; otherwise one line saying what fitmap would need."""
    from fitmap.model.build import image_arguments, model_class
    from fitmap.model.configs import vision_config

    config = prep.skeleton.config
    takes = image_arguments(model_class(config, prep.inventory.task, trust_remote_code))
    name = prep.inventory.name
    if not takes:
        raise BadInput(
            f"{name} is a text model (its config has no vision_config and its code takes no images): drop --image"
        )
    if vision_config(config) is None:
        raise BadInput(
            f"{name}'s code takes images ({takes[0]}) but its config describes no vision tower, which "
            'fitmap sizes images from: add the tower\'s settings to config.json as "vision_config" '
            "(image_size, patch_size, hidden_size, num_hidden_layers, from the model card), or drop --image"
        )
    prep.inventory = replace(prep.inventory, task="image-text-to-text")


def _plan_at(prep: Prepared, req: PlanRequest, workload: Workload, machine: Machine | None = None) -> Plan:
    return make_plan(
        req.model, prep.skeleton, profile_for(prep, req, workload), machine or req.machine, req.policy, req.pins
    )


def require_window(prep: Prepared, workload: Workload) -> None:
    """Prompt + new tokens must fit the model's context window (``max_position_embeddings``)."""
    window = context_window(prep)
    tokens = workload.prompt + workload.new
    if tokens > window:
        raise BadInput(
            f"{prep.inventory.name} reads at most {window} tokens (its max_position_embeddings); "
            f"--prompt {workload.prompt} + --new {workload.new} = {tokens}. Keep prompt + new within "
            f"{window}, e.g. --prompt {max(1, window - workload.new)}"
        )


def require_matching(plan: Plan, prep: Prepared) -> None:
    """A plan made for another model names units this model does not have (or misses some)."""
    units = {u.name for u in prep.skeleton.units}
    experts = {u.experts for u in prep.skeleton.units if u.experts}  # MoE experts placed apart from their block
    planned = set(plan.device_map)
    unknown, missing = sorted(planned - units - experts), sorted(units - planned)
    if unknown or missing:
        detail = (
            f"{len(unknown)} unit(s) it names do not exist (e.g. {', '.join(unknown[:3])})"
            if unknown
            else f"it does not place {len(missing)} unit(s) (e.g. {', '.join(missing[:3])})"
        )
        raise BadInput(
            f"the plan was made for {plan.model}, not for {prep.inventory.name}: {detail}; "
            f"make a new one with fitmap plan {prep.inventory.name} ... --out PLAN.json"
        )


# --------------------------------------------------------------------------- advice
def advice(prep: Prepared, req: PlanRequest, failed: Plan) -> str:
    """What would fit: more offload, a shorter prompt, a smaller batch."""
    w, m = req.workload, req.machine
    ways = []
    offload = _offload_needed(prep, req)
    if offload is not None:
        ways.append(offload)
    prompt = _largest(lambda p: replace(w, prompt=p), prep, req, w.prompt - 1)
    if prompt is not None:
        ways.append(f"with --prompt {prompt}")
    elif w.new > 1:
        new = _largest(lambda n: replace(w, new=n), prep, req, w.new - 1, low=1)
        if new is not None:
            ways.append(f"with --new {new}")
    if w.batch > 1:
        batch = _largest(lambda b: replace(w, batch=b), prep, req, w.batch - 1, low=1)
        if batch is not None:
            ways.append(f"with --batch {batch}")
    quantized = _quantization_that_fits(prep, req)
    if quantized is not None:
        ways.append(quantized)
    head = (
        f"{req.model} at batch {w.batch} x ({w.prompt}+{w.new} tokens) needs "
        f"{fmt_bytes(failed.shortfall_bytes)} more than {m.describe()}"
    )
    big = [g for g in m.gpus if g.reserve_source == "--reserve" and 2 * g.reserve >= g.capacity]
    if big:
        head += (
            f" (--reserve {fmt_bytes(big[0].reserve)} keeps that much of each GPU free; the default is "
            "512 MiB + 2% of the card)"
        )
    if not ways:
        return head + "; it does not fit even with a 1-token prompt: add GPUs (--gpus) or a disk tier (--disk DIR)"
    return head + ". Fits " + ", or ".join(ways)


def _offload_needed(prep: Prepared, req: PlanRequest) -> str | None:
    """How much CPU RAM, or else disk, would make it fit, if offloading can."""
    m = req.machine
    if not m.gpus:
        return _ram_needed(prep, req)
    ways = []
    more_ram = _plan_at(prep, req, req.workload, replace(m, cpu=UNLIMITED))
    on_cpu = next((d.weights_bytes for d in more_ram.devices if d.device == "cpu"), 0)
    if more_ram.fits and on_cpu > m.cpu:
        gib = _round_up_gib(on_cpu)
        while not _plan_at(prep, req, req.workload, replace(m, cpu=gib * GiB)).fits:  # advice that fits when followed
            gib += 1
        ways.append(f"with --cpu {gib}GiB (offloading {fmt_bytes(on_cpu)} of weights to RAM)")
    with_disk = _plan_at(prep, req, req.workload, replace(m, disk=m.disk or Path("DIR"), disk_bytes=UNLIMITED))
    on_disk = next((d.weights_bytes for d in with_disk.devices if d.device == "disk"), 0)
    if with_disk.fits and on_disk:
        where = "--disk DIR" if m.disk is None else f"more free space in {m.disk}"
        ways.append(f"with {where} ({fmt_bytes(on_disk)} of weights streamed from disk)")
    return ", or ".join(ways) or None


def _quantization_that_fits(prep: Prepared, req: PlanRequest) -> str | None:
    """``with --quantize M`` for the first of int8, nf4 (less loss first) whose plan fits; the
    workload's activation and KV costs are the full-precision model's."""
    if prep.skeleton.resident_only or req.quantize is not None or not quant.supported_here():
        return None
    dtype = getattr(torch, prep.skeleton.dtype)
    for method in ("int8", "nf4"):
        sk = skeleton(prep.inventory, dtype, req.trust_remote_code, quantize=method)
        qprep = replace(prep, skeleton=sk)
        try:
            result = _plan_at(qprep, replace(req, quantize=method), req.workload)
        except BadInput:  # the request's own pins rule it out (a unit pinned to disk: quantized stays resident)
            return None
        if result.fits:
            weights = sum(d.weights_bytes for d in result.devices)
            return (
                f"with --quantize {method} ({METHODS[method].split(':')[0].split(',')[0]}: {fmt_bytes(weights)} "
                "of weights)"
            )
    return None


def _ram_needed(prep: Prepared, req: PlanRequest) -> str | None:
    """CPU-only machines: the smallest RAM budget that fits, all in RAM or (without --disk given)
    streaming the rest from a disk directory."""
    m = req.machine
    if m.disk is not None:
        ram = _smallest_ram(prep, req, m)
        return None if ram is None else f"with --cpu {ram}"
    alone = _smallest_ram(prep, req, replace(m, disk_bytes=0))
    streamed = _smallest_ram(prep, req, replace(m, disk=Path("DIR"), disk_bytes=UNLIMITED))
    ways = [f"with --cpu {alone}"] if alone is not None else []
    if streamed is not None and (alone is None or parse_size(streamed) < parse_size(alone)):
        ways.append(f"with --cpu {streamed} and --disk DIR")
    return ", or ".join(ways) or None


def _smallest_ram(prep: Prepared, req: PlanRequest, m) -> str | None:
    """The smallest --cpu (as the user types it) with which ``m`` fits the request."""

    def fits(ram: int) -> bool:
        return _plan_at(prep, req, req.workload, replace(m, cpu=ram)).fits

    high = max(m.cpu, 1)
    while not fits(high):
        high *= 2
        if high > UNLIMITED:
            return None
    low = m.cpu
    while high - low > max(high // 1000, 1):
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    text = _size_at_least(high)
    while not fits(parse_size(text)):  # the printed value, read back, must fit: it is what the user types
        text = _size_at_least(parse_size(text) + max(high // 1000, 1))
    return text


def _size_at_least(n: int) -> str:
    """A size string (GiB or MiB, one decimal) that reads back as at least ``n`` bytes."""
    unit, name = (GiB, "GiB") if n >= GiB else (MiB, "MiB")
    return f"{math.ceil(n * 10 / unit) / 10:.1f}{name}"


def _round_up_gib(n: int) -> int:
    return -(-n // GiB)


def _largest(make, prep: Prepared, req: PlanRequest, high: int, low: int = 0) -> int | None:
    """Largest value in [low, high] whose workload fits (binary search; fit is monotone)."""
    if high < low:
        return None

    def fits(v: int) -> bool:
        try:
            return _plan_at(prep, req, make(v)).fits
        except BadInput:  # e.g. a workload with no tokens at all
            return False

    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


# --------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class Limits:
    """The largest workloads that fit these devices (prompt:new ratio of the request kept)."""

    max_context: int  # prompt + new tokens per sequence, at the request's batch
    prompt: int
    new: int
    max_batch: int | None  # largest batch at the request's context (when asked)
    window: int = 0  # the model's own context window (max_position_embeddings)

    @property
    def model_limited(self) -> bool:
        """True when the model's window, not memory, is the limit."""
        return self.max_context >= self.window > 0


def limits(req: PlanRequest, prep: Prepared | None = None, batch_too: bool = False) -> Limits:
    """Binary search on the profile (simulated when ``req.estimate`` says so).

    With GPUs, the limits are for the GPUs alone: offloading blocks to make room
    for a longer context trades the speed the user came for.
    """
    prep = prep or prepare(req)
    if req.machine.gpus:
        req = replace(req, machine=replace(req.machine, cpu=0, disk=None, disk_bytes=None))
    w = req.workload
    total = max(1, w.prompt + w.new)

    def at(ctx: int) -> Workload:
        new = w.new * ctx // total
        return replace(w, prompt=ctx - new, new=new)

    window = context_window(prep) - estimate(prep.skeleton, w).image_tokens  # images take window too
    context = _largest(at, prep, req, window, low=1) or 0
    batch = None
    if batch_too:
        batch = _largest(lambda b: replace(w, batch=b), prep, req, 1 << 14, low=1) or 0
    best = at(context) if context else w
    return Limits(context, best.prompt if context else 0, best.new if context else 0, batch, window)


def context_window(prep: Prepared) -> int:
    """Tokens the model reads at most (its max_position_embeddings; unbounded when it says none)."""
    from fitmap.planning.profile import text_config

    tc = text_config(prep.skeleton.config)
    return int(getattr(tc, "max_position_embeddings", 0) or 1 << 20)
