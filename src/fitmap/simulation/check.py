"""Stage 6 — Check: replay a plan on fake devices, report peaks, repair mismatches.

:func:`check` simulates the plan (:mod:`fitmap.simulation.simulate`). On a device mismatch it
proposes one remedy (:func:`propose`: one repair, or a few that belong together),
adds it to the plan, and simulates again, until the run is clean or ``max_rounds``
is spent. A remedy after which the very same mismatch comes back changed nothing:
it is taken out again (and not retried), so the plan keeps only repairs that
helped. The repairs are written into the plan (``Plan.repairs``), and ``fitmap
run`` applies exactly them.

Repair order for a mismatch in module M between devices A and B. M's *local*
device is its own weight's (if one of the operands is), else the device of the unit
M runs in (if it is one of the two), else that of the first operand; the other
operand is *foreign*.

1. M's own weight is on the other device (a tied ``lm_head``): align M's inputs to
   its weight's device;
2. the foreign tensor came out of a module P (a layer's KV concatenated by its
   parent, vision features merged into embeddings): align P's outputs to M's
   device; if P was already aligned to another device (a shared rotary module
   called from several devices), its outputs follow its inputs instead;
3. otherwise align M's inputs to its local device;
4. the foreign tensor has no known producer: a state M keeps outside its
   parameters (a rotary table cached on first use by another layer). M runs where
   that state is (align its inputs there) and its outputs go back to its caller's
   device (follow-inputs). In the top-level forward, the foreign tensor came from
   the last unit that ran on its device (the logits of ``lm_head``): align that
   unit's outputs;
5. co-locate the units involved (the producer's, then M's own).

Blocks of one ``ModuleList`` run the same code: a repair found for a module in one
block (steps 2 and 4) is made for the same module in every block placed on another
device than the repair's, in the same round, so a 40-layer split needs one round,
not one per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch

from fitmap.dispatch.repairs import colocated
from fitmap.errors import DeviceMismatch, FitmapError, SimulationFailed
from fitmap.model.build import build_model, empty_weights
from fitmap.model.skeleton import Skeleton
from fitmap.planning.experts import CPU_COMPUTE, DISK_COMPUTE, ram_bytes
from fitmap.planning.plan import DeviceLedger, Plan, Repair
from fitmap.simulation.fake import execution_placement
from fitmap.simulation.memory import DevicePeak, Mismatch, Simulation, device_label
from fitmap.simulation.simulate import simulate

MAX_ROUNDS = 10

Remedy = tuple[Repair, ...]


@dataclass(frozen=True)
class CheckReport:
    plan: Plan  # the plan with its repairs (and re-derived device map)
    devices: tuple[DevicePeak, ...]  # simulated per-device weights, KV, peak
    predicted: tuple[DeviceLedger, ...]  # ledger with the simulated numbers filled in
    mismatches: tuple[Mismatch, ...]  # every mismatch met, in order
    repairs: tuple[Repair, ...]  # the repairs added by this check (that helped)
    clean: bool  # the last simulation ran to the end
    fits: bool  # clean and every GPU peak + reserve within capacity
    tried: tuple[Repair, ...] = ()  # repairs tried and taken back: the mismatch stayed the same


def check(
    config, task: str, sk: Skeleton, plan: Plan, trust_remote_code: bool = False, max_rounds: int = MAX_ROUNDS
) -> CheckReport:
    def run(fixes: list[Repair]) -> Simulation:
        try:
            return simulate(
                config,
                task,
                sk,
                plan,
                device_map=colocated(plan.device_map, fixes),
                plan_repairs=tuple(fixes),
                trust_remote_code=trust_remote_code,
            )
        except FitmapError:
            raise
        except Exception as e:  # an op the fake devices cannot run: one line, where it stopped
            from fitmap.errors import where_in_model_code

            text = " ".join(str(e).split())[:200]
            raise SimulationFailed(
                f"fitmap cannot replay this model on fake devices: {type(e).__name__}: {text}"
                f"{where_in_model_code(e)}; no device mismatch or memory peak was checked "
                "(the plan's numbers stand as estimated)"
            ) from None

    exists = _ModulePaths(config, task, getattr(torch, sk.dtype), trust_remote_code)
    sim, log = _repair(run, plan, max_rounds, exists)
    repaired = replace(plan, repairs=tuple(log.fixes), device_map=colocated(plan.device_map, log.fixes))
    ledger = _with_simulated(repaired, sim, sk)
    clean = sim.mismatch is None
    fits = clean and all(d.total_bytes <= d.capacity_bytes for d in ledger if d.device != "disk")
    added = tuple(r for r in log.added if r in log.fixes)
    return CheckReport(
        replace(repaired, estimate="simulate", devices=ledger, fits=fits and repaired.fits),
        sim.devices,
        ledger,
        tuple(log.seen),
        added,
        clean,
        fits,
        tuple(log.dropped),
    )


@dataclass
class _Log:
    fixes: list[Repair]  # the plan's repairs so far
    seen: list[Mismatch] = field(default_factory=list)
    added: list[Repair] = field(default_factory=list)
    dropped: list[Repair] = field(default_factory=list)


def _repair(
    run: Callable[[list[Repair]], Simulation], plan: Plan, max_rounds: int, exists: Callable[[str], bool]
) -> tuple[Simulation, _Log]:
    """Simulate, propose, repeat. Every repair kept has been simulated; the returned
    simulation is that of ``log.fixes``."""
    log = _Log(list(plan.repairs))
    tried = {_key(f) for f in log.fixes}
    undo: tuple[list[Repair], list[Repair]] | None = None  # (fixes, added) before the last remedy
    for round_ in range(max(max_rounds, 1)):
        sim = run(log.fixes)
        if sim.mismatch is None:
            break
        if undo is not None and sim.mismatch == log.seen[-1]:  # the last remedy changed nothing
            log.dropped += [f for f in log.fixes if f not in undo[0]]
            log.fixes, log.added = undo
        else:
            log.seen.append(sim.mismatch)
        undo = None
        placement = execution_placement(plan, colocated(plan.device_map, log.fixes))
        remedy = propose(sim.mismatch, log.fixes, placement, tried, exists)
        if not remedy or round_ >= max_rounds - 1:
            break
        tried |= {_key(r) for r in remedy}
        undo = (log.fixes, log.added)
        fixes = _with(log.fixes, remedy)
        log.added = log.added + [f for f in fixes if f not in log.fixes]
        log.fixes = fixes
    return sim, log


def _key(r: Repair) -> tuple[str, str, str]:
    return r.kind, r.module, r.device


def _with(fixes: list[Repair], remedy: Remedy) -> list[Repair]:
    """``fixes`` plus ``remedy``; a module whose outputs now follow its inputs loses its align-outputs."""
    following = {r.module for r in remedy if r.kind == "follow-inputs"}
    kept = [f for f in fixes if not (f.kind == "align-outputs" and f.module in following)]
    have = {_key(f) for f in kept}
    return kept + [r for r in remedy if _key(r) not in have]


class _ModulePaths:
    """Does a module path exist? The model is built on meta the first time it is asked."""

    def __init__(self, config, task: str, dtype: torch.dtype, trust_remote_code: bool) -> None:
        self.args = (config, task, dtype, trust_remote_code)
        self.paths: set[str] | None = None

    def __call__(self, path: str) -> bool:
        if self.paths is None:
            with empty_weights():
                model = build_model(*self.args)
            self.paths = {p for p, _ in model.named_modules(remove_duplicate=False)}
        return path in self.paths


# --------------------------------------------------------------------------- proposing
def propose(
    m: Mismatch,
    fixes: list[Repair],
    placement: Mapping[str, str],
    tried=frozenset(),
    exists: Callable[[str], bool] = lambda path: True,
) -> Remedy:
    """The first remedy for ``m`` whose main repair is neither in ``fixes`` nor ``tried``;
    () when out of ideas. ``placement``: unit -> plan device it executes on."""
    done = set(tried) | {_key(f) for f in fixes}
    for remedy in _remedies(m, fixes, placement, exists):
        if _key(remedy[0]) not in done:
            return remedy
    return ()


def _remedies(
    m: Mismatch, fixes: list[Repair], placement: Mapping[str, str], exists: Callable[[str], bool]
) -> Iterator[Remedy]:
    weight_dev = next((d for d, _, is_param in m.operands if is_param), None)
    local = weight_dev or _local(m, placement)
    foreign_dev, producer = next(((d, p) for d, p, is_param in m.operands if d != local and not is_param), (None, None))
    where = m.module or "the model"
    if weight_dev is not None:  # 1
        yield (Repair("align-inputs", m.module, weight_dev, f"{m.module}'s weights are on {weight_dev}"),)
    if producer is not None and not _under(m.module, producer):  # 2
        aligned = [f for f in fixes if f.module == producer and f.kind in ("align-outputs", "align-inputs")]
        if any(f.device != local for f in aligned):
            yield _in_every_block(
                Repair("follow-inputs", producer, local, f"{producer} feeds several devices"), placement, exists
            )
        yield _in_every_block(
            Repair("align-outputs", producer, local, f"{m.op} in {where} needs it on {local}"), placement, exists
        )
    if m.module:  # 3
        yield (Repair("align-inputs", m.module, local, f"{m.op} mixes {m.devices[0]} and {m.devices[1]}"),)
    if foreign_dev is not None and producer is None:  # 4
        if m.module:
            why = f"{m.op} in {m.module} meets a tensor kept on {foreign_dev}"
            yield _in_every_block(
                Repair("align-inputs", m.module, foreign_dev, why),
                placement,
                exists,
                Repair("follow-inputs", m.module, local, f"{m.module} answers its caller"),
            )
        last = _last_unit_on(foreign_dev, placement)
        if not m.module and last is not None:
            yield _in_every_block(
                Repair("align-outputs", last, local, f"{m.op} in {where} needs it on {local}"), placement, exists
            )
    for unit in _units_to_colocate(m, producer, foreign_dev, local, placement):  # 5
        assert foreign_dev is not None  # no unit to colocate without a foreign operand (and its producer)
        dev = local if unit != m.unit else foreign_dev
        yield (Repair("colocate", unit, dev, f"{m.op} in {where} needs it on {dev}"),)


def _local(m: Mismatch, placement: Mapping[str, str]) -> str:
    """Where M's own code runs: its unit's device when that is one of the two; in the top-level
    model's own code, where its inputs are (an operand no unit produced: InternVL's ``image_flags``
    beside ``mlp1``'s image features), so the unit that produced the other one is aligned;
    else the first operand's."""
    home = placement.get(m.unit) if m.unit else None
    if home in m.devices:
        return home
    if not m.module and any(p is not None for _, p, _ in m.operands):
        given = next((d for d, p, is_param in m.operands if p is None and not is_param), None)
        if given is not None:
            return given
    return m.operands[0][0]


def _last_unit_on(device: str, placement: Mapping[str, str]) -> str | None:
    return next((u for u in reversed(list(placement)) if placement[u] == device), None)


def _units_to_colocate(
    m: Mismatch, producer: str | None, foreign_dev: str | None, local: str, placement: Mapping[str, str]
) -> list[str]:
    out = [u for u in placement if producer is not None and _under(producer, u) and placement[u] != local]
    if m.unit is not None and foreign_dev is not None and m.unit not in out:
        out.append(m.unit)
    return out


def _in_every_block(
    first: Repair, placement: Mapping[str, str], exists: Callable[[str], bool], *with_it: Repair
) -> Remedy:
    """``first`` (and ``with_it``), and the same for the same module in every other block of
    its ModuleList that runs on another device than ``first.device``."""
    out = [first, *with_it]
    unit = _unit_of(first.module, placement)
    if unit is None:
        return tuple(out)
    head, _, index = unit.rpartition(".")
    rest = first.module[len(unit) :]
    if not index.isdigit():
        return tuple(out)
    for other, dev in placement.items():
        h, _, i = other.rpartition(".")
        if h == head and i.isdigit() and other != unit and dev != first.device and exists(other + rest):
            out += [replace(r, module=other + rest) for r in (first, *with_it)]
    return tuple(out)


def _unit_of(path: str, placement: Mapping[str, str]) -> str | None:
    return max((u for u in placement if _under(path, u) and u), key=len, default=None)


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _with_simulated(plan: Plan, sim: Simulation, sk: Skeleton) -> tuple[DeviceLedger, ...]:
    """The plan's ledger with KV and activations replaced by the simulated ones.

    Weights stay the skeleton's exact bytes under the (possibly co-located) map: the
    simulation builds every floating weight at the plan's dtype, which is wrong for
    checkpoints stored narrower (FP8 DeepSeek-V3: half the bytes).
    """
    peaks = {d.device: d for d in sim.devices}
    weights: dict[str, int] = {}
    for u in sk.units:
        dev = str(plan.device_map.get(u.name))
        weights[dev] = weights.get(dev, 0) + u.weight_bytes
        apart = plan.device_map.get(u.experts) if u.experts else None
        if apart is not None and str(apart) != dev:  # MoE experts placed apart from their block
            where = {CPU_COMPUTE: "cpu", DISK_COMPUTE: "disk"}.get(str(apart), str(apart))
            weights[dev] -= u.expert_bytes
            weights[where] = weights.get(where, 0) + (ram_bytes(sk, u) if apart == CPU_COMPUTE else u.expert_bytes)
    out = []
    for led in plan.devices:
        p = peaks.get(led.device)
        if p is None or led.device == "disk" or (led.device == "cpu" and plan.execution_device != "cpu"):
            out.append(led)
            continue
        # The simulation streams one offloaded unit at a time through the execution device;
        # the runtime's prefetch holds two (the ledger's stream buffer), so one is already in the peak.
        activation = max(0, p.activation_bytes - led.stream_bytes // 2)
        w = weights.get(led.device, 0)
        total = w + p.kv_bytes + activation + led.reserve_bytes + led.stream_bytes
        out.append(replace(led, weights_bytes=w, kv_bytes=p.kv_bytes, activation_bytes=activation, total_bytes=total))
    return tuple(out)


def raise_unrepaired(report: CheckReport) -> None:
    """:class:`DeviceMismatch` when the check ended on a mismatch it could not repair."""
    if report.clean or not report.mismatches:
        return
    last = report.mismatches[-1]
    tried = report.repairs + report.tried
    shown = ", ".join(f"{r.kind} {r.module or 'model'} -> {device_label(r.device)}" for r in tried[:4])
    what = f"tried {len(tried)} repair(s) ({shown}{', ...' if len(tried) > 4 else ''})" if tried else "found no repair"
    raise DeviceMismatch(f"{last.message()}. fitmap {what} and the mismatch remains; {_advice(last, report.plan)}")


def _advice(m: Mismatch, plan: Plan) -> str:
    placement = execution_placement(plan)
    stray = [d for d in m.devices if d not in set(placement.values())]
    if stray:
        return (
            f"the model code itself puts a tensor on {device_label(stray[0])}, where the plan runs nothing, "
            "so no device map can fix it: change that line of the model code, or run the model on one device"
        )
    producers = [_unit_of(p, placement) for _, p, _ in m.operands if p is not None]
    units = [u for u in dict.fromkeys([m.unit, *producers]) if u]
    if not units:
        return "keep the units involved on one device: plan again with fitmap plan ... --pin MODULE=DEVICE"
    dev = m.devices[0]
    return "keep the units involved on one device: plan again with fitmap plan ... " + " ".join(
        f"--pin {u}={dev}" for u in units
    )
