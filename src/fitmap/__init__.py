"""fitmap: plan, check and run models bigger than one GPU across GPUs, CPU RAM and disk.

>>> import fitmap
>>> plan = fitmap.plan("llama-3.1-70b", gpus="4x40GiB", batch=4, prompt=4096, new=1024)
>>> plan.fits, plan.device_map["model.layers.0"]
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

from fitmap.errors import BadInput, CheckpointError, DeviceMismatch, DoesNotFit, FitmapError
from fitmap.workload import Workload

if TYPE_CHECKING:
    from fitmap.plan import Plan


def __getattr__(name: str):
    """``fitmap.Plan`` on first use: importing fitmap (and so starting the CLI) does not load torch,
    so Ctrl-C during the heavy imports lands inside the CLI's handler."""
    if name == "Plan":
        from fitmap.plan import Plan

        return Plan
    raise AttributeError(f"module 'fitmap' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``fitmap.plan`` is the function below, also after the submodule ``fitmap.plan`` is first
    imported (the import system sets the package attribute to the submodule then; the submodule
    stays in ``sys.modules``)."""

    @property
    def plan(self):
        return _plan

    @plan.setter
    def plan(self, value) -> None:
        pass


__all__ = ["plan", "load", "Plan", "Workload", "FitmapError", "BadInput", "CheckpointError", "DoesNotFit",
           "DeviceMismatch"]
__version__ = "0.1.0"


def _plan(
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
    for ``options`` (dtype, policy, pins, trust_remote_code, estimate, quantize, reserve)."""
    from fitmap import pipeline
    from fitmap.devices import make_machine
    from fitmap.solver import Policy
    from fitmap.workload import Dtype

    machine = make_machine(gpus, cpu, disk, options.pop("reserve", None))
    for name, kind in (("dtype", Dtype), ("policy", Policy)):
        if name in options:
            try:
                options[name] = kind(options[name])
            except ValueError:
                raise BadInput(f"{name} must be one of {', '.join(repr(k.value) for k in kind)}, "
                               f"not {options[name]!r}") from None
    req = pipeline.PlanRequest(model, machine, Workload(batch, prompt, new, tuple(images)), **options)
    return pipeline.plan(req)


def load(model_dir: str, plan: Plan, **options):
    """Load ``model_dir``'s weights straight to the devices of ``plan`` (see :func:`fitmap.loader.load`)."""
    from fitmap.loader import load as _load

    return _load(model_dir, plan, **options)


_plan.__name__ = _plan.__qualname__ = "plan"
sys.modules[__name__].__class__ = _Package
