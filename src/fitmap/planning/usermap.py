"""A device map the user wrote or got elsewhere, checked like a fitmap plan.

``fitmap check MODEL --plan MAP.json`` takes, besides a fitmap plan, a bare
``{module path: device}`` map: what ``infer_auto_device_map`` returns or
``model.hf_device_map`` prints, including maps that split inside a block (layer
9's attention on ``cuda:0``, its MLP on ``cuda:1``). Keys may be coarser or finer
than fitmap's units; as in accelerate, the longest key that prefixes a parameter
places it. :func:`as_plan` wraps such a map in a :class:`~fitmap.planning.plan.Plan` so the
check replays exactly that placement; :func:`to_units` gives the whole-unit map
fitmap writes after the check.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from fitmap.errors import BadInput
from fitmap.model.skeleton import Skeleton
from fitmap.planning.devices import GpuSpec, Machine
from fitmap.planning.plan import DeviceLedger, Plan
from fitmap.planning.workload import Workload


def read(path: str | Path) -> dict | None:
    """The JSON at ``path`` when it is a bare device map (no ``fitmap_plan`` marker), else None."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None  # Plan.load gives the message
    if not isinstance(data, dict) or "fitmap_plan" in data or "device_map" in data:
        return None
    return data


def device_of(value: object, key: str) -> int | str:
    """``0``, ``"0"``, ``"cuda:0"``, ``"cpu"``, ``"disk"`` -> fitmap's device names."""
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("cpu", "disk"):
            return v
        v = v.removeprefix("cuda:")
        if v.isdigit():
            return int(v)
    raise BadInput(
        f"device map entry {_shown(key)}: {_shown(value)} is not a device; use a GPU index (0, 'cuda:0'), "
        "'cpu' or 'disk'"
    )


def _shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message never echoes a huge key or value whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def normalized(
    raw: Mapping[str, object], param_names: list[str], module_names: Iterable[str] = ()
) -> dict[str, int | str]:
    """The map with fitmap device names; every key a module or parameter of the model and every
    parameter placed (accelerate refuses a map that leaves one out)."""
    dm = {("" if k in ("", ".") else str(k)): device_of(v, str(k)) for k, v in raw.items()}
    modules = {n.rpartition(".")[0] for n in param_names} | set(module_names)
    prefixes = {".".join(n.split(".")[:i]) for n in param_names for i in range(1, n.count(".") + 2)}
    unknown = [k for k in dm if k and k not in prefixes and k not in modules]
    if unknown:
        raise BadInput(
            f"the device map names {len(unknown)} module(s) this model does not have "
            f"(e.g. {', '.join(_shown(k) for k in unknown[:3])}); make it for this model (fitmap inspect "
            "lists its units)"
        )
    unplaced = [n for n in param_names if owner_key(n, dm) is None]
    if unplaced:
        raise BadInput(
            f"the device map places no device for {len(unplaced)} parameter(s) (e.g. "
            f"{', '.join(unplaced[:3])}); add their modules to the map"
        )
    return dm


def check_devices(dm: Mapping[str, int | str], machine: Machine, gpus_from: str) -> None:
    """Every device ``dm`` names is one of ``machine``'s: its GPUs (``gpus_from`` says where they
    came from, e.g. ``"--gpus 2x24GiB gives"``), and a disk tier for ``"disk"``."""
    have = sorted(g.index for g in machine.gpus)
    missing = sorted({d for d in dm.values() if type(d) is int} - set(have))
    if missing:
        key = next(k for k, d in dm.items() if d == missing[-1])
        want = missing[-1] + 1
        instead = f"name GPUs {_indices(have)} in the map" if have else "map those modules to 'cpu'"
        raise BadInput(
            f"the device map places {_shown(key)} on GPU {missing[-1]} but {gpus_from} {len(have)} GPU(s)"
            f"{f' ({_indices(have)})' if have else ''}; {instead}, or give --gpus with {want} GPUs "
            f"(e.g. --gpus {want}x24GiB)"
        )
    on_disk = [k for k, d in dm.items() if d == "disk"]
    if on_disk and machine.disk is None:
        raise BadInput(
            f"the device map places {len(on_disk)} module(s) on 'disk' (e.g. {_shown(on_disk[0])}) but no "
            "disk tier was given; give --disk DIR (a directory for the offloaded weights), or map them to 'cpu'"
        )


def _indices(gpus: list[int]) -> str:
    """``[0, 1, 2]`` -> ``"0-2"``; ``[0, 2]`` -> ``"0, 2"``."""
    if len(gpus) > 1 and gpus == list(range(gpus[0], gpus[-1] + 1)):
        return f"{gpus[0]}-{gpus[-1]}"
    return ", ".join(map(str, gpus))


def expanded(dm: dict[str, int | str], containers: Iterable[str], module_names: Iterable[str]) -> dict[str, int | str]:
    """Keys that name a ModuleList or ModuleDict (``"model.layers": 0``) given to their children, as
    accelerate hooks each child: a container has no forward of its own to hook."""
    names = list(module_names)
    out = dict(dm)
    for key in sorted(set(containers) & set(out), key=len):
        device = out.pop(key)
        for child in (n for n in names if n.startswith(key + ".") and "." not in n[len(key) + 1 :]):
            out.setdefault(child, device)
    return out


def owner_key(name: str, dm: Mapping[str, object]) -> str | None:
    """The longest map key that is ``name`` or a module above it."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in dm:
            return key
    return None


def as_plan(model: str, sk: Skeleton, dm: dict[str, int | str], machine: Machine, workload: Workload) -> Plan:
    """A plan that places exactly what ``dm`` says (keys ordered coarse to fine, so finer keys
    win when the check places them in turn)."""
    ordered = dict(sorted(dm.items(), key=lambda kv: kv[0].count(".") + bool(kv[0])))
    gpus = sorted({d for d in dm.values() if type(d) is int})
    specs = {g.index: g for g in machine.gpus}
    ledgers = []
    for g in gpus:
        spec = specs.get(g)
        ledgers.append(
            DeviceLedger(str(g), spec.capacity if spec else 1 << 62, 0, 0, 0, spec.reserve if spec else 0, 0, 0)
        )
    ledgers.append(DeviceLedger("cpu", machine.cpu, 0, 0, 0, 0, 0, 0))
    if machine.disk is not None:
        assert machine.disk_bytes is not None  # every Machine with a disk has its free bytes (make_machine)
        ledgers.append(DeviceLedger("disk", machine.disk_bytes, 0, 0, 0, 0, 0, 0))
    return Plan(
        model=model,
        fits=True,
        policy="user map",
        dtype=sk.dtype,
        estimate="simulate",
        workload=workload,
        device_map=ordered,
        devices=tuple(ledgers),
        groups={g.name: list(g.units) for g in sk.groups},
        execution_device=str(gpus[0]) if gpus else "cpu",
    )


def to_units(sk: Skeleton, dm: Mapping[str, int | str]) -> dict[str, int | str]:
    """Each fitmap unit whole on the device that held most of its weights in ``dm``."""
    out: dict[str, int | str] = {}
    for u in sk.units:
        votes: dict[int | str, int] = {}
        for name in u.params or (u.name,):
            key = owner_key(name, dm)
            if key is not None:
                votes[dm[key]] = votes.get(dm[key], 0) + 1
        key = owner_key(u.name, dm)
        out[u.name] = max(votes, key=votes.__getitem__) if votes else (dm[key] if key is not None else "cpu")
    return out


def fits_model(dm: Mapping[str, object], sk: Skeleton, module_names: Iterable[str] = ()) -> bool:
    """Does ``dm`` name only modules (or parameters) of ``sk``'s model and place all its weights?"""
    names = [p for u in sk.units for p in u.params]
    try:
        normalized(dm, names, module_names)
    except BadInput:
        return False
    return True


def machine_of(plan: Plan) -> Machine:
    """The devices a plan's ledger describes."""
    gpus = tuple(
        GpuSpec(int(d.device), d.capacity_bytes, d.reserve_bytes, "from the plan")
        for d in plan.devices
        if d.device.isdigit()
    )
    cpu = next((d.capacity_bytes for d in plan.devices if d.device == "cpu"), 0)
    disk = next((d for d in plan.devices if d.device == "disk"), None)
    return Machine(gpus, cpu, Path(".") if disk else None, disk.capacity_bytes if disk else None)
