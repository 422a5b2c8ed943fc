"""The fake devices: GPU *i* is ``meta:i`` (the CPU stays ``cpu``), the model's parameters and
buffers are placed where the plan runs them, and attention and Triton launches behave as the kernels
a GPU would run (flash / memory-efficient attention allocates only its output and log-sum-exp)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from fitmap.dispatch import hooks
from fitmap.model.skeleton import share_parameter
from fitmap.planning.plan import Plan

TRITON_KERNEL: list[str] = []  # the Triton kernel whose launch is being checked (names the mismatch)


# --------------------------------------------------------------------------- devices
def fake_device(device: str | int) -> torch.device:
    """Plan device -> simulator device: GPU i -> meta:i, cpu -> cpu."""
    d = str(device)
    return torch.device("meta", int(d)) if d.isdigit() else torch.device("cpu")


def plan_device(device: torch.device) -> str:
    return str(device.index) if device.type == "meta" else "cpu"


def execution_placement(plan: Plan, device_map: Mapping[str, int | str] | None = None) -> dict[str, str]:
    """Unit -> device it executes on: offloaded (cpu/disk) units run on the execution device."""
    dm = device_map if device_map is not None else plan.device_map
    exec_dev = plan.execution_device
    return {u: (exec_dev if str(d) in ("cpu", "disk") else str(d)) for u, d in dm.items()}


# --------------------------------------------------------------------------- attention
def _device_kernel_sdpa(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """SDPA as a GPU runs it (flash / memory-efficient): output + log-sum-exp, no T x T scores.

    The operands still meet in one op, so a device mismatch raises exactly as the
    real kernel would.
    """
    probe = [query.new_empty(1), key.new_empty(1), value.new_empty(1)]
    if isinstance(attn_mask, torch.Tensor):
        probe.append(attn_mask.new_empty(1, dtype=query.dtype))
    torch.stack(probe)
    out = query.new_empty(*query.shape[:-1], value.shape[-1])
    query.new_empty(*query.shape[:-1], dtype=torch.float32)  # log-sum-exp, freed at once
    return out


@contextlib.contextmanager
def gpu_attention_kernels() -> Iterator[None]:
    """For the simulation only: SDPA allocates what the fused GPU kernels allocate, and
    Triton kernels in model code are launched as fake devices can run them."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _device_kernel_sdpa
    try:
        with _triton_launches_on_fakes():
            yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


@contextlib.contextmanager
def _triton_launches_on_fakes() -> Iterator[None]:
    """A Triton kernel (CogVLM2's rotary, ``kernel[grid](out, x, ...)``) reads raw pointers,
    which fake tensors do not have. On fakes its launch checks what the real launch needs
    (every tensor argument on one device) and leaves the outputs the caller allocated, as
    the kernel writes into them without allocating. Launches on real tensors run as written."""
    jit = sys.modules.get("triton.runtime.jit")
    interface = getattr(jit, "KernelInterface", None)
    if interface is None:  # no model code imported Triton
        yield
        return
    original = interface.__getitem__

    def launcher(kernel, grid):
        launch = original(kernel, grid)

        def run(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if not any(isinstance(t, FakeTensor) for t in tensors):
                return launch(*args, **kwargs)
            TRITON_KERNEL.append(getattr(kernel, "__name__", None) or type(kernel).__name__)
            try:
                torch.stack([t.new_empty(1, dtype=tensors[0].dtype) for t in tensors])
            finally:
                TRITON_KERNEL.pop()
            return None

        return run

    interface.__getitem__ = launcher
    try:
        yield
    finally:
        interface.__getitem__ = original


# --------------------------------------------------------------------------- building
def place_parameters(model: nn.Module, unit_device: Mapping[str, torch.device]) -> None:
    """Move each unit's parameters and buffers to its fake device (inside the fake mode)."""
    for unit, device in unit_device.items():
        try:
            module = model.get_submodule(unit)
        except AttributeError:  # a parameter unit
            owner, _, name = unit.rpartition(".")
            _move_tensor(model.get_submodule(owner), name, device)
            continue
        for m in module.modules():
            for name in list(m._parameters) + list(m._buffers):
                _move_tensor(m, name, device)


def buffers_where_they_run(model: nn.Module, offloaded: list[str], unit_device: Mapping[str, torch.device]) -> None:
    """Offloaded units keep their buffers resident on the device they run on (the loader's
    rule: rotary tables are computed, not streamed)."""
    for unit in offloaded:
        module = hooks.module_or_none(model, unit)
        if module is not None:
            for m in module.modules():
                for name in list(m._buffers):
                    _move_tensor(m, name, unit_device[unit])


def _move_tensor(m: nn.Module, name: str, device: torch.device) -> None:
    p, b = m._parameters.get(name), m._buffers.get(name)
    if p is not None:
        if p.device != device:
            m._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=False)
    elif b is not None and b.device != device:
        m._buffers[name] = b.to(device)


def retie(model: nn.Module, tied: tuple[tuple[str, ...], ...]) -> None:
    """Tied parameters share one tensor: the first name's placement wins (as in a real load)."""
    for names in tied:
        share_parameter(model, names, model.get_parameter(names[0]))


@contextlib.contextmanager
def no_grad_fake(mode: FakeTensorMode) -> Iterator[None]:
    with mode, torch.no_grad():
        yield


@contextlib.contextmanager
def tensor_types_as_on_a_gpu(model: nn.Module) -> Iterator[None]:
    """Model code that asks ``type(x) is torch.Tensor`` (GLM-4 splits its stacked prefill cache into
    per-layer tuples only then) sees what it would see on a GPU: a fake tensor is a subclass, so for
    the duration of the replay ``type`` in the modules of the model's own code (remote code) answers
    ``torch.Tensor`` for it. transformers' and torch's modules are untouched."""
    import builtins

    def gpu_type(obj: object, *args: object) -> object:
        if not args and isinstance(obj, FakeTensor):
            return torch.Tensor
        return builtins.type(obj, *args) if args else builtins.type(obj)

    names = {type(m).__module__ for m in model.modules()}
    modules = [sys.modules[n] for n in names if n.startswith("transformers_modules") and n in sys.modules]
    saved = {m: m.__dict__["type"] for m in modules if "type" in m.__dict__}
    for m in modules:
        m.__dict__["type"] = gpu_type
    try:
        yield
    finally:
        for m in modules:
            if m in saved:
                m.__dict__["type"] = saved[m]
            else:
                m.__dict__.pop("type", None)


GROUPED_MM = getattr(torch.ops.aten._grouped_mm, "default", None) if hasattr(torch.ops.aten, "_grouped_mm") else None


def grouped_mm_any_dtype(args, kwargs):
    """``_grouped_mm`` (MoE experts) for every dtype: torch's meta kernel accepts bf16 only,
    the CPU and GPU kernels more. Output (tokens, out_features), as the kernel allocates."""
    a, b = args[0], args[1]
    torch.stack([a.new_empty(1), b.new_empty(1, dtype=a.dtype)])  # same device check as the kernel
    out_dtype = kwargs.get("out_dtype") or a.dtype
    return a.new_empty(a.shape[0], b.shape[-1], dtype=out_dtype)
