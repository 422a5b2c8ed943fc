"""fitmap: plan, check and run models bigger than one GPU across GPUs, CPU RAM and disk.

>>> import fitmap
>>> plan = fitmap.plan("llama-3.1-70b", gpus="4x40GiB", batch=4, prompt=4096, new=1024)
>>> plan.fits, plan.device_map["model.layers.0"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fitmap.errors import BadInput, CheckpointError, DeviceMismatch, DoesNotFit, FitmapError
from fitmap.planning.workload import Workload
from fitmap.version import __version__ as __version__

if TYPE_CHECKING:
    from fitmap.planning.plan import Plan


def __getattr__(name: str):
    """``fitmap.Plan`` on first use: importing fitmap (and so starting the CLI) does not load torch,
    so Ctrl-C during the heavy imports lands inside the CLI's handler."""
    if name == "Plan":
        from fitmap.planning.plan import Plan

        return Plan
    raise AttributeError(f"module 'fitmap' has no attribute {name!r}")


__all__ = [
    "plan",
    "check",
    "load",
    "Plan",
    "Workload",
    "FitmapError",
    "BadInput",
    "CheckpointError",
    "DoesNotFit",
    "DeviceMismatch",
]


def plan(
    model: str,
    gpus: str | None = None,
    cpu: str | None = None,
    disk: str | None = None,
    *,
    batch: int = 1,
    prompt: int = 512,
    new: int = 256,
    images: tuple[tuple[int, int], ...] = (),
    **options,
) -> Plan:
    """Plan ``model`` on the given devices for a workload; see :class:`fitmap.pipeline.PlanRequest`
    for ``options`` (dtype, policy, pins, trust_remote_code, estimate, quantize, reserve). ``quantize``:
    "nf4", "int8", a ``transformers.BitsAndBytesConfig`` or a dict of its fields."""
    from fitmap import pipeline
    from fitmap.planning.devices import make_machine
    from fitmap.planning.solver import Policy
    from fitmap.planning.workload import Dtype

    machine = make_machine(gpus, cpu, disk, options.pop("reserve", None))
    if "quantize" in options:  # "nf4", "int8", a transformers.BitsAndBytesConfig or a dict of its fields
        from fitmap.model.quant import method_of

        options["quantize"] = method_of(options["quantize"])
    for name, kind in (("dtype", Dtype), ("policy", Policy)):
        if name in options:
            try:
                options[name] = kind(options[name])
            except ValueError:
                raise BadInput(
                    f"{name} must be one of {', '.join(repr(k.value) for k in kind)}, not {options[name]!r}"
                ) from None
    req = pipeline.PlanRequest(model, machine, Workload(batch, prompt, new, tuple(images)), **options)
    return pipeline.plan(req)


def load(model_dir: str, plan: Plan, **options):
    """Load ``model_dir``'s weights straight to the devices of ``plan`` (see :func:`fitmap.runtime.loader.load`)."""
    from fitmap.runtime.loader import load as _load

    return _load(model_dir, plan, **options)


def check(model: str, plan: Plan, *, trust_remote_code: bool = False):
    """Replay ``plan`` for ``model`` on fake devices (no weight read, no GPU): per-device peaks, the
    device mismatches found and the repairs that clear them, as a
    :class:`fitmap.simulation.check.CheckReport` (``.clean``, ``.plan`` with the repairs written in)."""
    from fitmap import pipeline
    from fitmap.simulation.check import check as _check

    prep = pipeline.prepare_for(model, plan, trust_remote_code)
    pipeline.require_matching(plan, prep)
    return _check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan, trust_remote_code)
