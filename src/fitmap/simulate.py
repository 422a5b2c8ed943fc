"""Stage 5 — Simulation: run the real model code on fake devices, no weights, no GPU.

The model is built under ``FakeTensorMode``; GPU *i* becomes the fake device
``meta:i`` (the CPU stays ``cpu``), every unit is placed as the plan says, the same
boundary hooks the runtime uses are attached (:mod:`fitmap.hooks`, plus the
plan's repairs from :mod:`fitmap.repairs`), and then:

1. a prefill at the workload (batch x (prompt + image tokens)), images through
   the vision tower;
2. the cache is grown to the full context (prompt + image tokens + new - 1);
3. one decode step, with the next-token selection ``generate()`` does between
   steps (argmax of the last logits, new token appended on the input device).

A ``TorchDispatchMode`` adds each new output storage to its device (keyed by the
storage, freed through a weak reference) and keeps the peak per device and per
unit. Attention is modelled as the kernels a GPU runs (flash / memory-efficient:
only the output and its log-sum-exp are allocated, never the T x T scores).

A device mismatch raises inside the dispatch mode, where the op, its operands'
devices and producers, the running module and the model's own source line are
recorded as a :class:`Mismatch`.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import sys
import traceback
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fitmap import compat, hooks, hybrid, repairs
from fitmap.plan import Plan, Repair
from fitmap.profile import Profile, UnitCost, text_config
from fitmap.skeleton import Skeleton, Unit, build_model, empty_weights, share_parameter
from fitmap.workload import Workload


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Mismatch:
    """Two devices met in one op."""

    op: str                              # e.g. "aten.cat"
    devices: tuple[str, str]             # plan device names ("0", "1", "cpu")
    module: str                          # innermost module running ("" = top level)
    unit: str | None                     # the unit that module belongs to
    code: str                            # "file.py:123: the source line"
    operands: tuple[tuple[str, str | None, bool], ...]  # (device, producer module, is a parameter of `module`)

    def message(self) -> str:
        a, b = (device_label(d) for d in self.devices)
        where = self.module or "the top-level model"
        return (f"{self.op} in {where} got tensors on {a} and {b} "
                f"(Expected all tensors to be on the same device, but found at least two devices, {a} and {b}!) "
                f"at {self.code}")


@dataclass(frozen=True)
class DevicePeak:
    device: str
    weights_bytes: int
    kv_bytes: int
    peak_bytes: int                      # the largest total the device held at any moment

    @property
    def activation_bytes(self) -> int:
        return max(0, self.peak_bytes - self.weights_bytes - self.kv_bytes)


@dataclass(frozen=True)
class Simulation:
    devices: tuple[DevicePeak, ...]
    unit_activation: Mapping[str, int]   # peak bytes a unit allocated above what it was given
    unit_kv: Mapping[str, int]           # KV bytes held for each decoder block at full context
    mismatch: Mismatch | None = None
    image_tokens: int = 0
    stage: str = ""                      # where it stopped or "done"
    unit_entry: Mapping[str, int] = field(default_factory=dict)  # activation bytes live on its device
    # when a unit first ran (inputs, image features, masks made above the units, earlier layers' KV)


def device_label(device: str) -> str:
    return f"cuda:{device}" if device.isdigit() else device


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


# --------------------------------------------------------------------------- memory
class MemoryTracker(TorchDispatchMode):
    """Bytes live per device, their peak, and the peak above entry per running unit."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[str, int, int]] = {}   # storage key -> (device, bytes, refs)
        self.current: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.unit_stack: list[tuple[str, str, int]] = []  # (unit, device, bytes live at entry)
        self.unit_peak: Counter[str] = Counter()
        self.producer: dict[int, tuple[weakref.ref, str]] = {}
        self.module_stack: list[str] = []
        self.mismatch: Mismatch | None = None
        self.param_owner: dict[int, list[str]] = {}       # weight storage key -> module paths (tied: several)
        self.unit_of: Mapping[str, str] = {}
        self.weights: Counter[str] = Counter()            # weight and buffer bytes per device
        self.entry: dict[str, int] = {}                   # unit -> bytes above the weights at its first entry

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        dev = plan_device(t.device)
        entry = self.live.get(key)
        if entry is None:
            nbytes = st.nbytes()
            self.live[key] = (dev, nbytes, 1)
            self.current[dev] += nbytes
            if self.current[dev] > self.peak[dev]:
                self.peak[dev] = self.current[dev]
            for unit, udev, base in self.unit_stack:
                if udev == dev:
                    self.unit_peak[unit] = max(self.unit_peak[unit], self.current[dev] - base)
        else:
            self.live[key] = (entry[0], entry[1], entry[2] + 1)
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        dev, nbytes, refs = self.live[key]
        if refs > 1:
            self.live[key] = (dev, nbytes, refs - 1)
        else:
            del self.live[key]
            self.current[dev] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = _grouped_mm_any_dtype(args, kwargs) if func is _GROUPED_MM else func(*args, **kwargs)
        except RuntimeError as e:
            if _is_device_mismatch(str(e)) and self.mismatch is None:
                self.mismatch = self._describe(func, args, kwargs)
            raise
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in outs:
            self.track(t)
        self._inherit_producer(args, outs)
        return out

    def _inherit_producer(self, args, outs: list[torch.Tensor]) -> None:
        """A view or reshape of a module's output still came from that module."""
        ins = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        if len(ins) != 1 or not outs:
            return
        prod = self.producer.get(id(ins[0]))
        if prod is not None and prod[0]() is ins[0]:
            for t in outs:
                self.producer[id(t)] = (weakref.ref(t), prod[1])

    def _describe(self, func, args, kwargs) -> Mismatch:
        module = self.module_stack[-1] if self.module_stack else ""
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        operands, devices = [], []
        for t in tensors:
            dev = plan_device(t.device)
            if dev not in devices:
                devices.append(dev)
            prod = self.producer.get(id(t))
            producer = prod[1] if prod is not None and prod[0]() is t else None
            owners = self.param_owner.get(t.untyped_storage()._cdata, [])
            operands.append((dev, producer, any(_under(module, o) for o in owners)))
        op = f"Triton kernel {_KERNEL[-1]}" if _KERNEL else str(func.overloadpacket).replace("aten::", "aten.")
        return Mismatch(op,
                        (devices[0], devices[1] if len(devices) > 1 else devices[0]),
                        module, _unit_of(module, self.unit_of), _model_code_line(), tuple(operands))


_GROUPED_MM = getattr(torch.ops.aten._grouped_mm, "default", None) if hasattr(torch.ops.aten, "_grouped_mm") else None


def _grouped_mm_any_dtype(args, kwargs):
    """``_grouped_mm`` (MoE experts) for every dtype: torch's meta kernel accepts bf16 only,
    the CPU and GPU kernels more. Output (tokens, out_features), as the kernel allocates."""
    a, b = args[0], args[1]
    torch.stack([a.new_empty(1), b.new_empty(1, dtype=a.dtype)])  # same device check as the kernel
    out_dtype = kwargs.get("out_dtype") or a.dtype
    return a.new_empty(a.shape[0], b.shape[-1], dtype=out_dtype)


def _is_device_mismatch(text: str) -> bool:
    """Both forms fake tensors raise: most ops, and in-place indexing (``index_put_``)."""
    return "found at least two devices" in text or ("Mismatching" in text and "device between" in text)


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _unit_of(module: str, unit_of: Mapping[str, str]) -> str | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        u = unit_of.get(".".join(parts[:i]))
        if u is not None:
            return u
    return None


_SKIP = ("/torch/", "/fitmap/", "/contextlib.py", "/functools.py")


def _model_code_line() -> str:
    """The innermost frame of model code (not torch, not fitmap) on the current stack."""
    for frame in reversed(traceback.extract_stack()):
        if not any(s in frame.filename for s in _SKIP) or "/transformers/models/" in frame.filename:
            line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            return f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}: {line}"
    return "unknown"


# --------------------------------------------------------------------------- attention
def _device_kernel_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False):
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


_KERNEL: list[str] = []      # the Triton kernel whose launch is being checked (names the mismatch)


@contextlib.contextmanager
def _triton_launches_on_fakes() -> Iterator[None]:
    """A Triton kernel (CogVLM2's rotary, ``kernel[grid](out, x, ...)``) reads raw pointers,
    which fake tensors do not have. On fakes its launch checks what the real launch needs
    (every tensor argument on one device) and leaves the outputs the caller allocated, as
    the kernel writes into them without allocating. Launches on real tensors run as written."""
    jit = sys.modules.get("triton.runtime.jit")
    interface = getattr(jit, "KernelInterface", None)
    if interface is None:               # no model code imported Triton
        yield
        return
    original = interface.__getitem__

    def launcher(kernel, grid):
        launch = original(kernel, grid)

        def run(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if not any(isinstance(t, FakeTensor) for t in tensors):
                return launch(*args, **kwargs)
            _KERNEL.append(getattr(kernel, "__name__", None) or type(kernel).__name__)
            try:
                torch.stack([t.new_empty(1, dtype=tensors[0].dtype) for t in tensors])
            finally:
                _KERNEL.pop()
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


def _buffers_where_they_run(model: nn.Module, offloaded: list[str], unit_device: Mapping[str, torch.device]) -> None:
    """Offloaded units keep their buffers resident on the device they run on (the loader's
    rule: rotary tables are computed, not streamed)."""
    for unit in offloaded:
        module = hooks.module_or_none(model, unit)
        if module is not None:
            for m in module.modules():
                for name in list(m._buffers):
                    _move_tensor(m, name, unit_device[unit])


def _move_tensor(m: nn.Module, name: str, device: torch.device) -> None:
    if name in m._parameters and m._parameters[name] is not None:
        p = m._parameters[name]
        if p.device != device:
            m._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=False)
    elif m._buffers.get(name) is not None and m._buffers[name].device != device:
        m._buffers[name] = m._buffers[name].to(device)


def retie(model: nn.Module, tied: tuple[tuple[str, ...], ...]) -> None:
    """Tied parameters share one tensor: the first name's placement wins (as in a real load)."""
    for names in tied:
        share_parameter(model, names, model.get_parameter(names[0]))


# --------------------------------------------------------------------------- inputs
def make_inputs(config, workload: Workload, device: torch.device, task: str,
                trust_remote_code: bool = False) -> tuple[dict, int]:
    """Model inputs shaped as the processor makes them; (kwargs, image tokens per sequence)."""
    b = workload.batch
    if task != "image-text-to-text" or not workload.images:
        ids = torch.ones(b, max(workload.prompt, 1), dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0
    from fitmap.vision_inputs import vision_inputs

    return vision_inputs(config, workload, device, trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------- running
@dataclass
class _Run:
    model: nn.Module
    tracker: MemoryTracker
    input_device: torch.device
    unit_device: dict[str, torch.device]
    weights: Counter[str] = field(default_factory=Counter)
    trust_remote_code: bool = False


def simulate(config, task: str, sk: Skeleton, plan: Plan, workload: Workload | None = None,
             device_map: Mapping[str, int | str] | None = None,
             plan_repairs: tuple[Repair, ...] | None = None, trust_remote_code: bool = False) -> Simulation:
    """Replay ``plan`` (or ``device_map`` with ``plan``'s execution device) on fake devices."""
    workload = workload or plan.workload
    fixes = plan.repairs if plan_repairs is None else plan_repairs
    dm = dict(device_map if device_map is not None else plan.device_map)
    placement = execution_placement(plan, dm)
    offloaded = [u for u, d in dm.items() if str(d) in ("cpu", "disk") and plan.execution_device != "cpu"]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = MemoryTracker()
    dtype = getattr(torch, sk.dtype)
    with empty_weights(real_buffers=True):      # __init__ computes for real (InternViT's .item())
        model = build_model(config, task, dtype, trust_remote_code).eval()
    with _no_grad_fake(mode), hybrid.propagation(mode), gpu_attention_kernels():
        unit_device = {u: fake_device(d) for u, d in placement.items()}
        place_parameters(model, unit_device | {u: torch.device("cpu") for u in offloaded})
        _buffers_where_they_run(model, offloaded, unit_device)
        retie(model, sk.tied)
        _clear_hf_device_hints(model)
        # A user's own map replays as accelerate dispatches it: the inputs on ``model.device`` (its first
        # parameter's, where users move them), every key of the map hooked. A fitmap plan replays as
        # fitmap's runtime runs it: inputs where the embeddings are, units hooked from the first device change.
        accelerate_like = plan.policy == "user map"
        input_device = next(model.parameters()).device if accelerate_like else _input_device(model)
        run = _Run(model, tracker, input_device, unit_device, trust_remote_code=trust_remote_code)
        handles = _instrument(run, sk, fixes, every_key=accelerate_like)
        handles += [_stream_weights(model, u, unit_device[u]) for u in offloaded]
        try:
            return _simulate_steps(run, config, task, sk, workload)
        finally:
            for h in handles:
                h.remove()


@contextlib.contextmanager
def _no_grad_fake(mode: FakeTensorMode) -> Iterator[None]:
    with mode, torch.no_grad():
        yield


def _clear_hf_device_hints(model: nn.Module) -> None:
    """transformers caches ``hf_device_map``; a fake placement must not leave one behind."""
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _instrument(run: _Run, sk: Skeleton, fixes: tuple[Repair, ...], every_key: bool = False) -> list:
    t = run.tracker
    t.unit_of = {u.name: u.name for u in sk.units}
    paths = {id(m): p for p, m in run.model.named_modules()}
    for path, m in run.model.named_modules():
        for p in m.parameters(recurse=False):
            t.param_owner.setdefault(p.untyped_storage()._cdata, []).append(path)
    handles: list = []
    for path, m in run.model.named_modules():
        handles.append(m.register_forward_pre_hook(_enter(t, path)))
        handles.append(m.register_forward_hook(_leave(t, path)))
    for u in sk.units:
        if u.name in paths.values() and u.name in run.unit_device:
            m = run.model.get_submodule(u.name)
            handles.append(m.register_forward_pre_hook(_unit_enter(t, u.name, plan_device(run.unit_device[u.name]))))
            handles.append(m.register_forward_hook(_unit_leave(t)))
    placement = {u: d for u, d in run.unit_device.items()}
    h = hooks.attach(run.model, placement, run.input_device, every_unit=every_key)
    handles.append(h)
    handles.extend(repairs.apply(run.model, fixes, fake_device))
    return handles


def _stream_weights(model: nn.Module, unit: str, device: torch.device) -> Any:
    """An offloaded unit's weights come to ``device`` for its forward and leave after
    (what the runtime's offload does, minus the prefetch buffer the plan adds)."""
    try:
        module = model.get_submodule(unit)
    except AttributeError:
        return _NoHandle()
    host = {}

    def fetch(m, args):
        for name, p in m.named_parameters():
            owner, _, attr = name.rpartition(".")
            sub = m.get_submodule(owner) if owner else m
            host[name] = p
            sub._parameters[attr] = nn.Parameter(p.detach().to(device), requires_grad=False)

    def release(m, args, output):
        for name, p in host.items():
            owner, _, attr = name.rpartition(".")
            (m.get_submodule(owner) if owner else m)._parameters[attr] = p
        host.clear()

    return _Handles([module.register_forward_pre_hook(fetch), module.register_forward_hook(release)])


class _Handles:
    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _NoHandle:
    def remove(self) -> None:
        pass


def _enter(t: MemoryTracker, path: str):
    def hook(module, args):
        t.module_stack.append(path)
    return hook


def _leave(t: MemoryTracker, path: str):
    def hook(module, args, output):
        if t.module_stack and t.module_stack[-1] == path:
            t.module_stack.pop()
        for x in tree_flatten(output)[0]:
            if isinstance(x, torch.Tensor):
                t.producer[id(x)] = (weakref.ref(x), path)
    return hook


def _unit_enter(t: MemoryTracker, unit: str, device: str):
    def hook(module, args):
        t.unit_stack.append((unit, device, t.current[device]))
        t.entry.setdefault(unit, t.current[device] - t.weights[device])
    return hook


def _unit_leave(t: MemoryTracker):
    def hook(module, args, output):
        if t.unit_stack:
            t.unit_stack.pop()
    return hook


def _simulate_steps(run: _Run, config, task: str, sk: Skeleton, workload: Workload) -> Simulation:
    t = run.tracker
    for p in list(run.model.parameters()) + list(run.model.buffers()):
        t.track(p)
    weights = Counter(t.current)
    t.weights = weights
    inputs, image_tokens = make_inputs(config, workload, run.input_device, task, run.trust_remote_code)
    stage = "prefill"
    model = run.model
    decoder = generation_owner(model)
    _set_image_token(model, inputs)
    ids = inputs.pop("_input_ids", None)
    text = {"input_ids": ids} if ids is not None else inputs
    for value in (*inputs.values(), ids):   # a real run holds its inputs (pixel values too) until the answer
        if isinstance(value, torch.Tensor):
            t.track(value)
    try:
        with t:
            images = ids is not None or "pixel_values" in inputs or "images" in inputs
            first = model if decoder is model or images else decoder
            out = first(**prefill_inputs(first, inputs))
            cache = compat.cache_of(out)
            stage = "decode"
            full = workload.prompt + image_tokens + workload.new - 1
            cache = grow_cache(cache, full, text["input_ids"].shape[1])
            del out
            decoder(**decode_inputs(decoder, text, cache, full))
            stage = "done"
            kv = _cache_bytes(cache)
    except RuntimeError:
        if t.mismatch is None:
            raise
        return Simulation((), {}, {}, t.mismatch, image_tokens, stage)
    peaks = tuple(DevicePeak(d, weights[d], sum(b for (dd, _), b in kv.items() if dd == d), t.peak[d])
                  for d in sorted(set(t.peak) | set(weights), key=_order))
    unit_kv = {u.name: kv.get((plan_device(run.unit_device[u.name]), u.layer), 0)
               for u in sk.units if u.layer is not None and u.name in run.unit_device}
    return Simulation(peaks, dict(t.unit_peak), unit_kv, None, image_tokens, stage, dict(t.entry))


def _order(device: str) -> tuple[int, int]:
    return (0, int(device)) if device.isdigit() else (1, 0)


def _accepted(fn: Any, kwargs: dict) -> dict:
    """The keyword arguments ``fn`` takes (all of them when it takes ``**kwargs``): remote code
    written for transformers 4.x has no ``logits_to_keep`` or ``cache_position``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def generation_owner(model: nn.Module) -> nn.Module:
    """The module ``generate`` runs decode steps on. Remote-code VLMs (InternVL) define their
    own ``generate`` that merges image features into the embeddings once and hands
    ``inputs_embeds`` to their language model's ``generate``: decoding runs there."""
    own = getattr(type(model), "generate", None)
    if own is None or not getattr(own, "__module__", "").startswith("transformers_modules"):
        return model
    for name in ("language_model", "llm", "text_model"):
        child = getattr(model, name, None)
        if isinstance(child, nn.Module) and callable(getattr(child, "prepare_inputs_for_generation", None)):
            return child
    return model


def _set_image_token(model: nn.Module, inputs: dict) -> None:
    """InternVL's ``chat()`` sets ``img_context_token_id`` from the tokenizer before it generates."""
    token = inputs.pop("_image_token_id", None)
    if token is not None and hasattr(model, "img_context_token_id") and model.img_context_token_id is None:
        model.img_context_token_id = int(token)


def _own_generation(model: nn.Module) -> bool:
    """Does the model's own code (remote code) define how generation prepares each step?"""
    fn = getattr(type(model), "prepare_inputs_for_generation", None)
    return fn is not None and getattr(fn, "__module__", "").startswith("transformers_modules")


def _requires(model: nn.Module, name: str) -> bool:
    """Does the model's forward or its own ``prepare_inputs_for_generation`` require ``name``?"""
    for fn in (model.forward, getattr(model, "prepare_inputs_for_generation", None)):
        try:
            param = inspect.signature(fn).parameters.get(name) if fn is not None else None
        except (TypeError, ValueError):
            continue
        if param is not None and param.default is inspect.Parameter.empty:
            return True
    return False


def _last_logit_only(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}
    if "return_last_logit" in params:          # ChatGLM's own name for it
        return {"return_last_logit": True}
    return {}


def prefill_inputs(model: nn.Module, inputs: dict) -> dict:
    """The prefill call as ``generate`` makes it: through the model's own
    ``prepare_inputs_for_generation`` when its code defines one; only arguments its forward takes."""
    kwargs = {**inputs, "use_cache": True, **_last_logit_only(model)}
    if "input_ids" in inputs and "token_type_ids" not in inputs and _requires(model, "token_type_ids"):
        kwargs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])    # CogVLM: all text tokens
    if _own_generation(model) and "input_ids" in inputs:
        rest = {k: v for k, v in kwargs.items() if k != "input_ids"}
        prepared = model.prepare_inputs_for_generation(
            inputs["input_ids"], **_accepted(model.prepare_inputs_for_generation, rest))
        kwargs = {**kwargs, **{k: v for k, v in prepared.items() if v is not None}}
    return _accepted(model.forward, kwargs)


def decode_inputs(model: nn.Module, inputs: dict, cache: Any, past: int) -> dict:
    """One decode step after ``past`` cached tokens, as ``generate()`` builds it. The next
    token is a stand-in id (0): what the step costs does not depend on its value."""
    ids = inputs["input_ids"]
    b, device = ids.shape[0], ids.device
    next_ids = torch.zeros(b, 1, dtype=torch.long, device=device)
    mask = torch.ones(b, past + 1, dtype=torch.long, device=device)
    if _own_generation(model):
        full_ids = torch.cat([ids, next_ids.expand(b, past + 1 - ids.shape[1])], dim=1)
        positions = torch.arange(past + 1, device=device).unsqueeze(0).expand(b, -1)
        given = {compat.cache_kwarg(model): cache, "attention_mask": mask, "use_cache": True,
                 "is_first_forward": False, "cache_position": torch.arange(past, past + 1, device=device)}
        if "token_type_ids" in inputs or _requires(model, "token_type_ids"):   # CogVLM: new tokens are text
            types = inputs.get("token_type_ids", torch.zeros_like(ids))
            given["token_type_ids"] = torch.cat([types, torch.zeros_like(full_ids[:, types.shape[1]:])], dim=1)
        if "position_ids" in inspect.signature(model.prepare_inputs_for_generation).parameters:
            given["position_ids"] = positions   # ChatGLM's tokenizer makes them and generate extends them
        prepared = model.prepare_inputs_for_generation(
            full_ids, **_accepted(model.prepare_inputs_for_generation, given))
        step = {k: v for k, v in prepared.items() if v is not None}
    else:
        step = {"input_ids": next_ids, "attention_mask": mask, compat.cache_kwarg(model): cache, "use_cache": True,
                "cache_position": torch.arange(past, past + 1, device=device)}
        if "image_grid_thw" in inputs:  # Qwen2-VL keeps its rope deltas from the prefill
            step["position_ids"] = torch.full((3, b, 1), past, dtype=torch.long, device=device)
    return _accepted(model.forward, {**step, **_last_logit_only(model)})


def grow_cache(cache: Any, length: int, prefill: int) -> Any:
    """Give every cache layer ``length`` tokens (sliding layers keep their window). Cache
    objects are grown in place; tuple caches (remote code written for transformers 4.x:
    per layer ``(key, value)``, the sequence on the axis that had ``prefill`` entries) are
    returned anew."""
    if isinstance(cache, (tuple, list)):
        return type(cache)(grow_cache(c, length, prefill) for c in cache)
    if isinstance(cache, torch.Tensor):
        dims = [d for d in range(cache.dim() - 1) if cache.shape[d] == prefill]
        if not dims:
            return cache
        shape = list(cache.shape)
        shape[dims[-1] if cache.dim() == 4 and dims[-1] == 2 else dims[0]] = length
        return cache.new_empty(shape)
    for kname, vname in (("key_cache", "value_cache"),):   # transformers 4.x DynamicCache
        if isinstance(getattr(cache, kname, None), list):
            for lists in (getattr(cache, kname), getattr(cache, vname)):
                for i, t in enumerate(lists):
                    if isinstance(t, torch.Tensor) and t.dim() == 4:
                        lists[i] = t.new_empty(*t.shape[:-2], length, t.shape[-1])
            if hasattr(cache, "_seen_tokens"):
                cache._seen_tokens = length
            return cache
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() < 3:
            continue
        window = getattr(layer, "sliding_window", None)
        n = min(length, window - 1) if window else length
        layer.keys = keys.new_empty(*keys.shape[:-2], n, keys.shape[-1])
        layer.values = values.new_empty(*values.shape[:-2], n, values.shape[-1])
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = length
    return cache


def _cache_layers(cache: Any) -> list[list[torch.Tensor]]:
    """Per text layer, the KV tensors of ``cache`` (any of the layouts above)."""
    if isinstance(cache, (tuple, list)):
        return [[t for t in layer if isinstance(t, torch.Tensor)] if isinstance(layer, (tuple, list)) else [layer]
                for layer in cache]
    if isinstance(getattr(cache, "key_cache", None), list):
        return [[k, v] for k, v in zip(cache.key_cache, cache.value_cache)]
    return [[t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]
            for layer in getattr(cache, "layers", [])]


def _cache_bytes(cache: Any) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for i, layer in enumerate(_cache_layers(cache)):
        for t in layer:
            key = (plan_device(t.device), i)
            out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


# --------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class _Point:
    tokens: int                       # prefill tokens (batch x (prompt + image tokens))
    act: Mapping[str, int]            # unit -> activation bytes
    kv_per_token: Mapping[str, float]  # unit -> KV bytes per cached token per sequence


def measure_units(prep, workload: Workload, trust_remote_code: bool = False) -> tuple[_Point, int]:
    """Simulate everything on one fake device; per-unit activation and KV at ``workload``."""
    from fitmap.plan import make_plan
    from fitmap.devices import Machine, GpuSpec
    from fitmap.profile import estimate

    sk = prep.skeleton
    small, rep = fewer_layers(sk, trust_remote_code)
    run = small or sk
    big = Machine((GpuSpec(0, 1 << 60, 0, "simulated"),), 0, None, None)
    one = make_plan(prep.inventory.name, run, estimate(run, workload), big)
    sim = simulate(run.config, prep.inventory.task, run, one, workload, trust_remote_code=trust_remote_code)
    if sim.mismatch is not None:  # on one device this is a bug in the model code or in fitmap
        raise RuntimeError(sim.mismatch.message())
    tc = text_config(sk.config)
    seq = workload.prompt + sim.image_tokens + workload.new
    carried = workload.batch * (workload.prompt + sim.image_tokens) * tc.hidden_size * getattr(torch, sk.dtype).itemsize
    from fitmap.profile import cached_tokens

    def source(u: Unit) -> tuple[str, int | None]:
        """The measured unit that stands for ``u``: itself, or the first block of its kind."""
        if small is None or u.layer is None:
            return u.name, u.layer
        return f"{sk.text_layers}.{rep[u.layer]}", rep[u.layer]

    act, kv = {}, {}
    first_block = next((i for i, u in enumerate(sk.units) if u.layer is not None), len(sk.units))
    at_blocks = max(carried, sim.unit_entry.get(source(sk.units[first_block])[0], 0)) \
        if first_block < len(sk.units) else carried
    for i, u in enumerate(sk.units):
        name, layer = source(u)
        # What is live when a unit starts, besides weights: before the first block (vision tower,
        # projector, embeddings) all of it is activation (the tower's attention mask, image features);
        # from the first block on, what was live there (the hidden state, masks and position tables made
        # above the blocks, Qwen3-VL's DeepStack features) while the KV cache grows beside it
        held = sim.unit_entry.get(name, 0) if i < first_block else at_blocks
        act[u.name] = sim.unit_activation.get(name, 0) + held
        if u.layer is not None:
            kv[u.name] = sim.unit_kv.get(name, 0) / max(1, workload.batch * cached_tokens(tc, layer, seq))
    return _Point(workload.batch * (workload.prompt + sim.image_tokens), act, kv), sim.image_tokens


def fewer_layers(sk: Skeleton, trust_remote_code: bool = False) -> tuple[Skeleton | None, dict[int, int]]:
    """The skeleton of the same model with only as many text blocks as it takes to hold one block
    of each kind (same parameters and bytes, same entry in every per-layer list of the config:
    ``layer_types``, ``mlp_only_layers`` ...), and each layer's representative. DeepSeek-V3's 61
    layers are 3 dense and 58 MoE: 4 blocks are simulated. None when nothing would be saved, or
    for remote code (its layers may differ by index in ways its config does not say)."""
    import copy

    from fitmap.configs import ALIASES

    blocks = [u for u in sk.units if u.layer is not None]
    if trust_remote_code or not blocks or any(u.name != f"{sk.text_layers}.{u.layer}" for u in blocks):
        return None, {}
    view = text_config(sk.config)
    tc = object.__getattribute__(view, "_config")
    count = len(blocks)
    lists = {k: v for k, v in vars(tc).items() if isinstance(v, (list, tuple)) and len(v) == count
             and not k.startswith("_")}
    prefix = len(sk.text_layers) + 1

    def kind(u: Unit) -> tuple:
        shape = tuple(sorted(p[prefix:].partition(".")[2] for p in u.params))
        return shape, u.weight_bytes, tuple(str(v[u.layer]) for v in lists.values())

    first: dict[tuple, int] = {}
    rep = {}
    for u in sorted(blocks, key=lambda b: b.layer):
        rep[u.layer] = first.setdefault(kind(u), u.layer)
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
    small = replace(sk, config=config, units=tuple(u for u in sk.units if u.name in keep),
                    groups=tuple(replace(g, units=tuple(x for x in g.units if x in keep)) for g in sk.groups))
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
    def from_json(cls, d: dict) -> "SimulatedCosts":
        point = lambda p: _Point(int(p["tokens"]), {k: int(v) for k, v in p["act"].items()},  # noqa: E731
                                 {k: float(v) for k, v in p["kv_per_token"].items()})
        return cls(point(d["a"]), point(d["b"]), int(d["image_tokens"]))

    def profile(self, sk: Skeleton, workload: Workload) -> Profile:
        from fitmap.profile import peak_cached_tokens

        tc = text_config(sk.config)
        seq = workload.prompt + self.image_tokens + workload.new
        tokens = workload.batch * (workload.prompt + self.image_tokens)
        costs = []
        for u in sk.units:
            act = _linear(self.a.tokens, self.a.act[u.name], self.b.tokens, self.b.act[u.name], tokens)
            kv = 0
            if u.layer is not None:
                kv = int(self.a.kv_per_token[u.name] * workload.batch
                         * peak_cached_tokens(tc, u.layer, seq, seq - workload.new))
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
