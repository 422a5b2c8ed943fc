"""Stage 6 — Check: replay a plan on fake devices, report peaks, repair mismatches.

:func:`check` simulates the plan (:mod:`fitmap.simulate`). On a device mismatch it
proposes one repair (:func:`propose`), adds it to the plan, and simulates again,
until the run is clean or ``max_rounds`` is spent. The repairs are written into the
plan (``Plan.repairs``), and ``fitmap run`` applies exactly them.

Repair order for a mismatch in module M between devices A and B:

1. M's own weight is on the other device (a tied ``lm_head``): align M's inputs to
   its weight's device;
2. the foreign tensor came out of a module P (a layer's KV concatenated by its
   parent, vision features merged into embeddings): align P's outputs to M's
   device; if P was already aligned to another device (a shared rotary module
   called from several devices), its outputs follow its inputs instead;
3. otherwise align M's inputs to the device of its first operand;
4. when a repair did not help, co-locate the two units involved.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fitmap.errors import DeviceMismatch
from fitmap.plan import DeviceLedger, Plan, Repair
from fitmap.repairs import colocated
from fitmap.simulate import DevicePeak, Mismatch, Simulation, simulate
from fitmap.skeleton import Skeleton

MAX_ROUNDS = 10


@dataclass(frozen=True)
class CheckReport:
    plan: Plan                              # the plan with its repairs (and re-derived device map)
    devices: tuple[DevicePeak, ...]         # simulated per-device weights, KV, peak
    predicted: tuple[DeviceLedger, ...]     # ledger with the simulated numbers filled in
    mismatches: tuple[Mismatch, ...]        # every mismatch met, in order
    repairs: tuple[Repair, ...]             # the repairs added by this check
    clean: bool                             # the last simulation ran to the end
    fits: bool                              # clean and every GPU peak + reserve within capacity


def check(config, task: str, sk: Skeleton, plan: Plan, trust_remote_code: bool = False,
          max_rounds: int = MAX_ROUNDS) -> CheckReport:
    fixes = list(plan.repairs)
    seen: list[Mismatch] = []
    added: list[Repair] = []
    sim: Simulation | None = None
    for _ in range(max_rounds):
        dm = colocated(plan.device_map, fixes)
        sim = simulate(config, task, sk, plan, device_map=dm, plan_repairs=tuple(fixes),
                       trust_remote_code=trust_remote_code)
        if sim.mismatch is None:
            break
        seen.append(sim.mismatch)
        fix = propose(sim.mismatch, fixes, dm)
        if fix is None:
            break
        fixes = [f for f in fixes if not (f.module == fix.module and f.kind != "colocate"
                                          and fix.kind == "follow-inputs")] + [fix]
        added.append(fix)
    assert sim is not None
    repaired = replace(plan, repairs=tuple(fixes), device_map=colocated(plan.device_map, fixes))
    ledger = _with_simulated(repaired, sim)
    clean = sim.mismatch is None
    fits = clean and all(d.total_bytes <= d.capacity_bytes for d in ledger if d.device != "disk")
    return CheckReport(replace(repaired, estimate="simulate", devices=ledger, fits=fits and repaired.fits),
                       sim.devices, ledger, tuple(seen), tuple(added), clean, fits)


def propose(m: Mismatch, fixes: list[Repair], device_map: dict) -> Repair | None:
    """One repair for mismatch ``m`` that has not been tried yet (None when out of ideas)."""
    tried = {(f.kind, f.module, f.device) for f in fixes}
    weight_dev = next((d for d, _, is_param in m.operands if is_param), None)
    local = weight_dev or m.operands[0][0]
    foreign = next(((d, p) for d, p, is_param in m.operands if d != local and not is_param), None)
    candidates: list[Repair] = []
    if weight_dev is not None:
        candidates.append(Repair("align-inputs", m.module, weight_dev, f"{m.module}'s weights are on {weight_dev}"))
    if foreign is not None and foreign[1] is not None and not _under(m.module, foreign[1]):
        producer = foreign[1]
        aligned = [f for f in fixes if f.kind == "align-outputs" and f.module == producer]
        if aligned and aligned[0].device != local:
            candidates.append(Repair("follow-inputs", producer, local, f"{producer} feeds several devices"))
        candidates.append(Repair("align-outputs", producer, local, f"{m.op} in {m.module or 'model'} needs it on {local}"))
    if m.module:
        candidates.append(Repair("align-inputs", m.module, local, f"{m.op} mixes {m.devices[0]} and {m.devices[1]}"))
    for unit in _units_to_colocate(m, foreign, device_map):
        candidates.append(Repair("colocate", unit, local, f"{m.op} in {m.module or 'model'} needs it on {local}"))
    return next((c for c in candidates if (c.kind, c.module, c.device) not in tried), None)


def _units_to_colocate(m: Mismatch, foreign, device_map: dict) -> list[str]:
    out = []
    if foreign is not None and foreign[1] is not None:
        out += [u for u in device_map if _under(foreign[1], u)]
    return out


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _with_simulated(plan: Plan, sim: Simulation) -> tuple[DeviceLedger, ...]:
    """The plan's ledger with weights/KV/activations replaced by the simulated ones."""
    peaks = {d.device: d for d in sim.devices}
    out = []
    for led in plan.devices:
        p = peaks.get(led.device)
        if p is None or led.device == "disk" or (led.device == "cpu" and plan.execution_device != "cpu"):
            out.append(led)
            continue
        # The simulation streams one offloaded unit at a time through the execution device;
        # the runtime's prefetch holds two (the ledger's stream buffer), so one is already in the peak.
        activation = max(0, p.activation_bytes - led.stream_bytes // 2)
        total = p.weights_bytes + p.kv_bytes + activation + led.reserve_bytes + led.stream_bytes
        out.append(replace(led, weights_bytes=p.weights_bytes, kv_bytes=p.kv_bytes,
                           activation_bytes=activation, total_bytes=total))
    return tuple(out)


def raise_unrepaired(report: CheckReport) -> None:
    if not report.clean and report.mismatches:
        last = report.mismatches[-1]
        raise DeviceMismatch(f"{last.message()}; fitmap could not repair it after {len(report.repairs)} "
                             "repair(s). Keep these units on one device with --pin MODULE=DEVICE")
