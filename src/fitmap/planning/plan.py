"""Stage 4 — Plan: a device map that fits the workload, and a ledger per device.

:func:`make_plan` turns a skeleton and a profile into solver items (co-location
groups merged, pins applied), asks the pure solver (:mod:`fitmap.planning.solver`) for an
assignment, and writes the result in the transformers/accelerate ``device_map``
format: ``{module path: GPU index | "cpu" | "disk"}``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fitmap.errors import BadInput
from fitmap.model.skeleton import Skeleton
from fitmap.planning import experts
from fitmap.planning.devices import Machine
from fitmap.planning.profile import Profile
from fitmap.planning.solver import Assignment, Gpu, Item, Policy, Tiers, solve
from fitmap.planning.workload import Workload
from fitmap.sizes import fmt_bytes

UNLIMITED = 1 << 62


@dataclass(frozen=True)
class DeviceLedger:
    device: str  # "0", "1", ... | "cpu" | "disk"
    capacity_bytes: int
    weights_bytes: int
    kv_bytes: int
    activation_bytes: int
    reserve_bytes: int
    stream_bytes: int  # double buffer for offloaded weights (execution device)
    total_bytes: int
    units: tuple[str, ...] = ()

    @property
    def utilization(self) -> float:
        return self.total_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


@dataclass(frozen=True)
class Repair:
    """A fix found by ``fitmap check``: an alignment hook (see :mod:`fitmap.dispatch.repairs`) or a co-location."""

    kind: str  # "align-inputs" | "align-outputs" | "follow-inputs" | "colocate"
    module: str  # module path the repair applies to
    device: str  # device the inputs are moved to / the unit is moved to
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    model: str
    fits: bool
    policy: str
    dtype: str
    estimate: str  # "analytic" | "simulate"
    workload: Workload
    device_map: dict[str, int | str]
    devices: tuple[DeviceLedger, ...]
    shortfall_bytes: int = 0
    advice: str = ""
    groups: dict[str, list[str]] = field(default_factory=dict)
    repairs: tuple[Repair, ...] = ()
    execution_device: str = "cpu"  # where offloaded units run
    quantize: str | None = None  # quantized while loading (``--quantize``), e.g. "nf4"
    notes: tuple[str, ...] = ()  # what the planner chose beyond the usual, and what it costs
    cpu_token_bytes: int = 0  # weights the CPU computes with per token besides offloaded units (routed experts)
    cpu_compute_bytes: int = 0  # of the cpu ledger's weights, those computed where they live (not streamed)
    cpu_unpack_values: int = 0  # of the routed experts a token uses there, MXFP4 values the CPU unpacks
    disk_compute_bytes: int = 0  # of the disk ledger's weights, routed experts the CPU reads per routed expert
    disk_token_bytes: int = 0  # of those, bytes a token reads (its routed experts)
    hosts: dict[str, list[int]] = field(default_factory=dict)  # several machines: host -> its GPUs, pipeline order

    def host_of(self, unit: str) -> str:
        """The host ``unit`` runs on ("" on one machine; offloaded units run on the execution device's)."""
        dev = str(self.device_map.get(unit))
        dev = dev if dev.isdigit() else self.execution_device
        return next((h for h, gpus in self.hosts.items() if dev.isdigit() and int(dev) in gpus), "")

    def to_json(self) -> dict:
        return (
            {
                "fitmap_plan": 1,
                "model": self.model,
                "fits": self.fits,
                "policy": self.policy,
                "dtype": self.dtype,
                "estimate": self.estimate,
                "workload": self.workload.to_json(),
                "device_map": self.device_map,
                "devices": [asdict(d) | {"units": list(d.units)} for d in self.devices],
                "shortfall_bytes": self.shortfall_bytes,
                "advice": self.advice,
                "groups": self.groups,
                "repairs": [asdict(r) for r in self.repairs],
                "execution_device": self.execution_device,
            }
            | ({"quantize": self.quantize} if self.quantize else {})
            | ({"notes": list(self.notes)} if self.notes else {})
            | ({"cpu_token_bytes": self.cpu_token_bytes} if self.cpu_token_bytes else {})
            | ({"cpu_compute_bytes": self.cpu_compute_bytes} if self.cpu_compute_bytes else {})
            | ({"cpu_unpack_values": self.cpu_unpack_values} if self.cpu_unpack_values else {})
            | ({"disk_compute_bytes": self.disk_compute_bytes} if self.disk_compute_bytes else {})
            | ({"disk_token_bytes": self.disk_token_bytes} if self.disk_token_bytes else {})
            | ({"hosts": self.hosts} if self.hosts else {})
        )

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        from fitmap.model.quant import METHODS

        quantize = d.get("quantize") if isinstance(d, dict) else None
        if quantize is not None and (not isinstance(quantize, str) or quantize not in METHODS):
            raise BadInput(
                f"not a fitmap plan (quantize must be {' or '.join(map(repr, METHODS))} or absent, not "
                f"{repr(quantize)[:60]}); make one with fitmap plan --out"
            )
        try:
            return cls(
                model=d["model"],
                fits=d["fits"],
                policy=d["policy"],
                dtype=d["dtype"],
                estimate=d["estimate"],
                workload=Workload.from_json(d["workload"]),
                device_map=dict(d["device_map"]),
                devices=tuple(DeviceLedger(**(x | {"units": tuple(x.get("units", ()))})) for x in d["devices"]),
                shortfall_bytes=d.get("shortfall_bytes", 0),
                advice=d.get("advice", ""),
                groups=d.get("groups", {}),
                repairs=tuple(Repair(**r) for r in d.get("repairs", [])),
                execution_device=d.get("execution_device", "cpu"),
                quantize=quantize,
                notes=tuple(str(n) for n in d.get("notes", ())),
                cpu_token_bytes=int(d.get("cpu_token_bytes", 0)),
                cpu_compute_bytes=int(d.get("cpu_compute_bytes", 0)),
                cpu_unpack_values=int(d.get("cpu_unpack_values", 0)),
                disk_compute_bytes=int(d.get("disk_compute_bytes", 0)),
                disk_token_bytes=int(d.get("disk_token_bytes", 0)),
                hosts={str(h): [int(g) for g in gpus] for h, gpus in d.get("hosts", {}).items()},
            ).validated()
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise BadInput(f"not a fitmap plan (missing or wrong field {e}); make one with fitmap plan --out") from None

    def validated(self) -> Plan:
        if not isinstance(self.device_map, dict) or not self.device_map:
            raise BadInput("the plan has no device_map; make one with fitmap plan --out")
        self.check_devices()
        return self

    def save(self, path: str | Path) -> None:
        p = Path(path)
        text = json.dumps(self.to_json(), indent=2) + "\n"
        try:
            p.write_text(text)
        except OSError as e:
            raise BadInput(
                f"cannot write the plan to {p}: {e.strerror or e}; give --out a file path in a "
                "directory you can write to"
            ) from None

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
            if not isinstance(data, dict):
                raise BadInput(
                    f"plan file {p} holds a JSON {type(data).__name__}, not an object: give a fitmap "
                    "plan (fitmap plan --out) or a device map {module: device}"
                )
            return cls.from_json(data)
        except FileNotFoundError:
            raise BadInput(f"plan file {p} does not exist; write one with fitmap plan ... --out {p}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadInput(f"plan file {p} is not valid JSON; write it again with fitmap plan ... --out") from None
        except OSError as e:
            raise BadInput(
                f"cannot read plan file {p}: {e.strerror or e}; give --plan the JSON file fitmap plan --out wrote"
            ) from None

    def check_devices(self) -> None:
        """Every unit on a GPU of the plan's ledger, ``cpu`` or ``disk`` (a hand-edited plan may say ``tpu``)."""
        gpus = sorted(int(d.device) for d in self.devices if d.device.isdigit())
        bad = []
        for unit, dev in self.device_map.items():
            if dev in ("cpu", "disk", experts.CPU_COMPUTE, experts.DISK_COMPUTE):
                continue
            index = dev if type(dev) is int else int(dev) if isinstance(dev, str) and dev.isdigit() else None
            if index is None or index not in gpus:
                bad.append(f"{unit} -> {dev!r}")
        if bad:
            have = ", ".join(map(str, gpus)) or "none"
            raise BadInput(
                f"the plan places {len(bad)} unit(s) on devices it does not have ({'; '.join(bad[:3])}); "
                f"a unit goes on one of the plan's GPUs ({have}), 'cpu' or 'disk': fix the map or re-plan"
            )


# --------------------------------------------------------------------------- items
@dataclass(frozen=True)
class _Component:
    units: tuple[str, ...]
    pin: str | None
    offloadable: bool


def components(sk: Skeleton, pins: dict[str, str]) -> list[_Component]:
    """Units merged by co-location groups, in execution order: a group sits where its first
    unit does, and the skeleton lists the input side first and the output side last."""
    parent = {u.name: u.name for u in sk.units}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for g in sk.groups:
        for other in g.units[1:]:
            parent[find(other)] = find(g.units[0])
    members: dict[str, list[str]] = {}
    for u in sk.units:
        members.setdefault(find(u.name), []).append(u.name)
    kinds = {u.name: u.kind for u in sk.units}
    comps = []
    for names in members.values():
        comp_pins = {pins[n] for n in names if n in pins}
        if len(comp_pins) > 1:
            raise BadInput(f"--pin puts {', '.join(names)} on {sorted(comp_pins)}, but they must stay together")
        offloadable = len(names) == 1 and kinds[names[0]] == "block"
        comps.append(_Component(tuple(names), comp_pins.pop() if comp_pins else None, offloadable))
    return comps


def resolve_pins(sk: Skeleton, pins: dict[str, str], machine: Machine) -> dict[str, str]:
    """``{MODULE: DEVICE}`` from the user -> ``{unit name: device}``."""
    valid = {str(g.index) for g in machine.gpus} | {"cpu"} | ({"disk"} if machine.disk else set())
    out: dict[str, str] = {}
    names = [u.name for u in sk.units]
    for module, device in pins.items():
        if device not in valid:
            raise BadInput(f"--pin {module}={device}: no such device; use one of {', '.join(sorted(valid))}")
        hit = [n for n in names if n == module or n.startswith(module + ".") or module.startswith(n + ".")]
        if not hit:
            import difflib

            close = difflib.get_close_matches(module, names, 3, 0.5)
            raise BadInput(
                f"--pin {module}: no such module in {sk.model_class}"
                + (f"; did you mean {', '.join(close)}?" if close else "; see fitmap inspect for unit names")
            )
        out.update({n: device for n in hit})
    return out


def items(sk: Skeleton, profile: Profile, comps: list[_Component]) -> list[Item]:
    costs = {c.name: c for c in profile.costs}
    out = []
    for c in comps:
        cs = [costs[n] for n in c.units]
        out.append(
            Item(
                name=c.units[0] if len(c.units) == 1 else f"{c.units[0]} (+{len(c.units) - 1})",
                weight_bytes=sum(x.weight_bytes for x in cs),
                kv_bytes=sum(x.kv_bytes for x in cs),
                act_bytes=max(x.act_bytes for x in cs),
                pin=c.pin,
                offloadable=c.offloadable and not sk.resident_only,  # quantized weights stay resident
            )
        )
    return out


# --------------------------------------------------------------------------- plan
def make_plan(
    model: str,
    sk: Skeleton,
    profile: Profile,
    machine: Machine,
    policy: Policy = Policy.BALANCED,
    pins: dict[str, str] | None = None,
) -> Plan:
    unit_pins = resolve_pins(sk, pins or {}, machine)
    comps = components(sk, unit_pins)
    gpus = [Gpu(str(g.index), g.capacity, g.reserve) for g in machine.gpus]
    tiers = Tiers(cpu=machine.cpu, disk=machine.disk_bytes if machine.disk is not None else None)
    base = items(sk, profile, comps)
    result = solve(base, gpus, tiers, policy)
    offloaded = any(d in ("cpu", "disk") for d in result.devices) if gpus else "disk" in result.devices
    if (tiers.cpu is not None and (gpus or tiers.disk is not None)) and (not result.fits or offloaded):
        cpu_room = tiers.cpu

        def with_ram_used(its: list[Item], ram: int) -> Assignment:
            if ram > cpu_room:
                return replace(result, fits=False)
            return solve(its, gpus, replace(tiers, cpu=cpu_room - ram), policy)

        w = profile.workload
        choice = experts.choose(
            sk,
            base,
            [c.units for c in comps],
            result,
            with_ram_used,
            str(machine.gpus[0].index) if gpus else "cpu",
            prompt=w.batch * (w.prompt + profile.image_tokens),
            disk=tiers.disk is not None,
        )
        if choice is not None:
            plan = _to_plan(model, sk, profile, machine, policy, comps, choice.result)
            return _with_cpu_experts(plan, choice)
    if not result.fits and gpus:
        apart = _vision_apart(sk, profile, comps, max(g.capacity - g.reserve for g in gpus))
        if apart is not None:
            split, note, groups = apart
            again = solve(items(sk, profile, split), gpus, tiers, policy)
            if again.fits:
                plan = _to_plan(model, sk, profile, machine, policy, split, again)
                return replace(plan, notes=plan.notes + (note,), groups=plan.groups | groups)
    return _to_plan(model, sk, profile, machine, policy, comps, result)


def _with_cpu_experts(plan: Plan, choice: experts.Choice) -> Plan:
    """``plan`` with the chosen blocks' routed experts computed on the CPU: each experts module after its
    block in the device map, their bytes in the cpu ledger (in the disk ledger for those read from there)."""
    device_map: dict[str, int | str] = {}
    moved = {u.name: (str(u.experts), experts.CPU_COMPUTE) for u in choice.blocks if u.experts}
    moved |= {u.name: (str(u.experts), experts.DISK_COMPUTE) for u in choice.on_disk if u.experts}
    for name, dev in plan.device_map.items():
        device_map[name] = dev
        if name in moved:
            device_map[moved[name][0]] = moved[name][1]
    tiers = {"cpu": (choice.expert_bytes, experts.CPU_COMPUTE), "disk": (choice.disk_bytes, experts.DISK_COMPUTE)}
    ledgers = []
    for d in plan.devices:
        if d.device in tiers:
            extra, value = tiers[d.device]
            d = replace(
                d,
                capacity_bytes=d.capacity_bytes + (extra if d.device == "cpu" else 0),  # the solver saw RAM less
                weights_bytes=d.weights_bytes + extra,
                total_bytes=d.total_bytes + extra,
                units=d.units + tuple(e for e, v in moved.values() if v == value),
            )
        ledgers.append(d)
    return replace(
        plan,
        device_map=device_map,
        devices=tuple(ledgers),
        notes=plan.notes + (choice.note,),
        cpu_token_bytes=choice.token_bytes,
        cpu_compute_bytes=choice.expert_bytes,
        cpu_unpack_values=choice.token_values,
        disk_compute_bytes=choice.disk_bytes,
        disk_token_bytes=choice.disk_token_bytes,
    )


def _bytes(profile: Profile, units: tuple[str, ...]) -> int:
    costs = {c.name: c for c in profile.costs}
    return sum(costs[n].weight_bytes + costs[n].kv_bytes for n in units) + max(costs[n].act_bytes for n in units)


def _vision_apart(
    sk: Skeleton, profile: Profile, comps: list[_Component], usable: int
) -> tuple[list[_Component], str, dict[str, list[str]]] | None:
    """When the input side (vision tower + projector + text embeddings) is larger than any one GPU
    (``usable`` bytes): the tower and projector placed apart from the embeddings, as one unit when they
    fit a GPU, else split at the tower's own blocks; None when that is not the obstacle. Image features
    then cross to the embeddings' GPU, once per image (the check adds the moves it needs)."""
    kinds = {u.name: u.kind for u in sk.units}
    i = next((i for i, c in enumerate(comps) if any(kinds[n] == "vision" for n in c.units)), None)
    if i is None or comps[i].pin is not None or _bytes(profile, comps[i].units) <= usable:
        return None
    comp = comps[i]
    tower = tuple(n for n in comp.units if kinds[n] == "vision")
    rest = tuple(n for n in comp.units if kinds[n] != "vision")
    side, whole = fmt_bytes(_bytes(profile, comp.units)), fmt_bytes(_bytes(profile, tower))
    if _bytes(profile, tower) <= usable:
        parts = [_Component(tower, None, False)]
        how = f"the vision tower and projector ({whole}) on a GPU of their own"
    else:
        parts = [_Component((n,), None, False) for n in tower]
        how = f"the vision tower and projector ({whole}) split at their own blocks across GPUs"
    note = (
        f"the input side ({side}) is larger than one GPU ({fmt_bytes(usable)} usable): {how}, apart from the "
        "text embeddings; image features cross to the embeddings' GPU once per image"
    )
    split = comps[:i] + parts + ([_Component(rest, None, False)] if rest else []) + comps[i + 1 :]
    return split, note, {"vision": list(tower), "input": list(rest)}


def _to_plan(
    model: str,
    sk: Skeleton,
    profile: Profile,
    machine: Machine,
    policy: Policy,
    comps: list[_Component],
    result: Assignment,
) -> Plan:
    device_map: dict[str, int | str] = {}
    units_on: dict[str, list[str]] = {}
    for comp, dev in zip(comps, result.devices):
        for n in comp.units:
            device_map[n] = int(dev) if dev.isdigit() else dev
            units_on.setdefault(dev, []).append(n)
    order = {u.name: i for i, u in enumerate(sk.units)}
    device_map = dict(sorted(device_map.items(), key=lambda kv: order[kv[0]]))
    ledgers = tuple(
        DeviceLedger(
            d.device,
            d.capacity,
            d.weights,
            d.kv,
            d.activations,
            d.reserve,
            d.stream_buffer,
            d.total,
            tuple(units_on.get(d.device, ())),
        )
        for d in result.loads
    )
    return Plan(
        model=model,
        fits=result.fits,
        policy=policy.value,
        dtype=sk.dtype,
        estimate=profile.method,
        workload=profile.workload,
        device_map=device_map,
        devices=ledgers,
        shortfall_bytes=result.shortfall,
        groups={g.name: list(g.units) for g in sk.groups},
        execution_device=str(machine.gpus[0].index) if machine.gpus else "cpu",
        quantize=sk.quantize,
        hosts=_hosts(machine),
        notes=_links(machine, sk, profile, device_map),
    )


# Between hosts: activations of each stage boundary cross the network once per step. Without a link measured
# by `fitmap calibrate --peer` (under torchrun), a 25 Gb/s Ethernet link and 50 us per message are assumed.
LINK_BYTES_PER_S = 25e9 / 8
LINK_LATENCY_S = 50e-6


def _hosts(machine: Machine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    start = 0
    for name, count in machine.hosts:
        out[name] = [g.index for g in machine.gpus[start : start + count]]
        start += count
    return out


def _links(machine: Machine, sk: Skeleton, profile: Profile, device_map: dict[str, int | str]) -> tuple[str, ...]:
    """Where the plan crosses from host to host, and what a step pays there."""
    if not machine.hosts:
        return ()
    order = [machine.host_of(int(d)) for d in device_map.values() if isinstance(d, int)]
    boundaries = [(a, b) for a, b in zip(order, order[1:]) if a != b]
    import torch

    from fitmap.model.configs import text_config
    from fitmap.planning.calibrate import load_link

    w = profile.workload
    hidden = int(text_config(sk.config).hidden_size) * getattr(torch, sk.dtype).itemsize
    prefill = w.batch * (w.prompt + profile.image_tokens) * hidden
    decode = w.batch * hidden
    link = load_link()
    rate, latency = (link.bytes_per_s, link.latency_s) if link else (LINK_BYTES_PER_S, LINK_LATENCY_S)
    per = (
        f"{fmt_bytes(prefill)} per prefill ({(prefill / rate + latency) * 1e3:.1f} ms), {fmt_bytes(decode)} per "
        f"token ({(decode / rate + latency) * 1e6:.0f} us)"
    )
    path = " -> ".join(dict.fromkeys(order))
    how = (
        f"the {rate * 8 / 1e9:.2f} Gb/s link with {latency * 1e6:.0f} us latency fitmap calibrate --peer measured"
        if link
        else "an assumed 25 Gb/s link with 50 us latency (fitmap calibrate --peer measures it)"
    )
    return (
        f"{len(boundaries)} stage boundar{'y' if len(boundaries) == 1 else 'ies'} between hosts ({path}): the hidden "
        f"states cross each once per step, {per} at {how}",
    )
