"""Stage 5 — Simulation: run the real model code on fake devices, no weights, no GPU.

The model is built under ``FakeTensorMode``; GPU *i* becomes the fake device
``meta:i`` (the CPU stays ``cpu``), every unit is placed as the plan says, the same
boundary hooks the runtime uses are attached (:mod:`fitmap.dispatch.hooks`, plus the
plan's repairs from :mod:`fitmap.dispatch.repairs`), and then:

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

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from fitmap.dispatch import hooks, repairs
from fitmap.model import compat
from fitmap.model.build import build_model, empty_weights
from fitmap.model.modules import generation_owner, input_embeddings
from fitmap.model.skeleton import Skeleton
from fitmap.planning.plan import Plan, Repair
from fitmap.planning.workload import Workload
from fitmap.simulation import hybrid
from fitmap.simulation.cuda_calls import cuda_calls_on_fakes
from fitmap.simulation.fake import (
    buffers_where_they_run,
    execution_placement,
    fake_device,
    gpu_attention_kernels,
    no_grad_fake,
    place_parameters,
    plan_device,
    retie,
    tensor_types_as_on_a_gpu,
)
from fitmap.simulation.memory import (
    DevicePeak,
    Handles,
    MemoryTracker,
    NoHandle,
    Simulation,
    enter_module,
    enter_unit,
    leave_module,
    leave_unit,
)
from fitmap.simulation.steps import (
    cache_bytes,
    decode_inputs,
    grow_cache,
    prefill_inputs,
    set_image_token,
)

# when a unit first ran (inputs, image features, masks made above the units, earlier layers' KV)


# --------------------------------------------------------------------------- inputs
def make_inputs(
    config,
    workload: Workload,
    device: torch.device,
    task: str,
    trust_remote_code: bool = False,
    model: nn.Module | None = None,
) -> tuple[dict, int]:
    """Model inputs shaped as the processor makes them; (kwargs, image tokens per sequence).
    ``model`` (placed) counts its own image features where nothing else does."""
    b = workload.batch
    if task == "image-text-to-text" and not workload.images and model is not None and _requires_images(model):
        workload = replace(workload, images=(_native_size(config),))  # BLIP-2: no text-only forward
    if task != "image-text-to-text" or not workload.images:
        ids = torch.ones(b, max(workload.prompt, 1), dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0
    from fitmap.simulation.vision_inputs import vision_inputs

    return vision_inputs(config, workload, device, trust_remote_code=trust_remote_code, model=model)


def _requires_images(model: nn.Module) -> bool:
    """Does the model's forward require ``pixel_values`` (BLIP-2, InstructBLIP)?"""
    import inspect

    try:
        param = inspect.signature(model.forward).parameters.get("pixel_values")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def _native_size(config) -> tuple[int, int]:
    """One image at the vision tower's own square (224 where the config gives none)."""
    from fitmap.model.configs import vision_config

    side = getattr(vision_config(config), "image_size", None) or 224
    side = int(side[0] if isinstance(side, (list, tuple)) else side)
    return side, side


# --------------------------------------------------------------------------- running
@dataclass
class _Run:
    model: nn.Module
    tracker: MemoryTracker
    input_device: torch.device
    unit_device: dict[str, torch.device]
    weights: Counter[str] = field(default_factory=Counter)
    trust_remote_code: bool = False


def simulate(
    config,
    task: str,
    sk: Skeleton,
    plan: Plan,
    workload: Workload | None = None,
    device_map: Mapping[str, int | str] | None = None,
    plan_repairs: tuple[Repair, ...] | None = None,
    trust_remote_code: bool = False,
) -> Simulation:
    """Replay ``plan`` (or ``device_map`` with ``plan``'s execution device) on fake devices."""
    workload = workload or plan.workload
    fixes = plan.repairs if plan_repairs is None else plan_repairs
    dm = dict(device_map if device_map is not None else plan.device_map)
    placement = execution_placement(plan, dm)
    offloaded = [u for u, d in dm.items() if str(d) in ("cpu", "disk") and plan.execution_device != "cpu"]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = MemoryTracker()
    dtype = getattr(torch, sk.dtype)
    with empty_weights(real_buffers=True):  # __init__ computes for real (InternViT's .item())
        model = build_model(config, task, dtype, trust_remote_code).eval()
    with (
        no_grad_fake(mode),
        hybrid.propagation(mode),
        gpu_attention_kernels(),
        cuda_calls_on_fakes(),
        tensor_types_as_on_a_gpu(model),
    ):
        unit_device = {u: fake_device(d) for u, d in placement.items()}
        place_parameters(model, unit_device | {u: torch.device("cpu") for u in offloaded})
        buffers_where_they_run(model, offloaded, unit_device)
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


def _clear_hf_device_hints(model: nn.Module) -> None:
    """transformers caches ``hf_device_map``; a fake placement must not leave one behind."""
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map


def _input_device(model: nn.Module) -> torch.device:
    return input_embeddings(model).weight.device


def _instrument(run: _Run, sk: Skeleton, fixes: tuple[Repair, ...], every_key: bool = False) -> list:
    t = run.tracker
    t.unit_of = {u.name: u.name for u in sk.units}
    paths = {id(m): p for p, m in run.model.named_modules()}
    for path, m in run.model.named_modules():
        for p in m.parameters(recurse=False):
            t.param_owner.setdefault(p.untyped_storage()._cdata, []).append(path)
    handles: list = []
    for path, m in run.model.named_modules():
        handles.append(m.register_forward_pre_hook(enter_module(t, path)))
        handles.append(m.register_forward_hook(leave_module(t, path)))
    for u in sk.units:
        if u.name in paths.values() and u.name in run.unit_device:
            m = run.model.get_submodule(u.name)
            handles.append(m.register_forward_pre_hook(enter_unit(t, u.name, plan_device(run.unit_device[u.name]))))
            handles.append(m.register_forward_hook(leave_unit(t)))
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
        return NoHandle()
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

    return Handles([module.register_forward_pre_hook(fetch), module.register_forward_hook(release)])


def _simulate_steps(run: _Run, config, task: str, sk: Skeleton, workload: Workload) -> Simulation:
    t = run.tracker
    for p in list(run.model.parameters()) + list(run.model.buffers()):
        t.track(p)
    weights = Counter(t.current)
    t.weights = weights
    inputs, image_tokens = make_inputs(config, workload, run.input_device, task, run.trust_remote_code, run.model)
    t.entry.clear()  # the model may have counted its image features: units are entered anew below
    stage = "prefill"
    model = run.model
    decoder = generation_owner(model)
    set_image_token(model, inputs)
    ids = inputs.pop("_input_ids", None)
    text = {"input_ids": ids} if ids is not None else inputs
    for value in (*inputs.values(), ids):  # a real run holds its inputs (pixel values too) until the answer
        if isinstance(value, torch.Tensor):
            t.track(value)
    try:
        with t:
            images = ids is not None or "pixel_values" in inputs or "images" in inputs
            first = model if decoder is model or images else decoder
            out = first(**prefill_inputs(first, inputs))
            cache = compat.cache_of(out)
            if images and not image_tokens:  # features the model put before the text itself (GIT)
                image_tokens = _prepended(cache, text["input_ids"].shape[1])
            stage = "decode"
            full = workload.prompt + image_tokens + workload.new - 1
            cache = grow_cache(cache, full, text["input_ids"].shape[1])
            del out
            step = decoder(**decode_inputs(decoder, text, cache, full))
            stage = "next token"
            _append_next_token(t, text["input_ids"], step)
            stage = "done"
            kv = cache_bytes(cache)
    except RuntimeError:
        if t.mismatch is None:
            raise
        return Simulation((), {}, {}, t.mismatch, image_tokens, stage)
    peaks = tuple(
        DevicePeak(d, weights[d], sum(b for (dd, _), b in kv.items() if dd == d), t.peak[d])
        for d in sorted(set(t.peak) | set(weights), key=_order)
    )
    unit_kv = {
        u.name: kv.get((plan_device(run.unit_device[u.name]), u.layer), 0)
        for u in sk.units
        if u.layer is not None and u.name in run.unit_device
    }
    return Simulation(peaks, dict(t.unit_peak), unit_kv, None, image_tokens, stage, dict(t.entry))


def _prepended(cache: Any, text: int) -> int:
    """Positions the prefill cached beyond the text it was given: image features a model prepends."""
    length = getattr(cache, "get_seq_length", None)
    return max(0, int(length()) - text) if callable(length) else 0


GENERATE_APPENDS = "transformers' generate(): input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)"


def _append_next_token(t: MemoryTracker, ids: torch.Tensor, output: Any) -> None:
    """What ``generate``'s loop does between two steps: the greedy token taken from the last logits
    of the module it decodes with, appended to the ids on the input device (transformers 4.x takes the
    logits where that module left them; a mismatch there is named as generate's line)."""
    logits = output["logits"] if isinstance(output, dict) else output[0]
    last = logits[:, -1, :]
    if compat.generate_moves_logits():
        last = last.to(ids.device)
    try:
        torch.cat([ids, last.argmax(-1)[:, None]], dim=-1)
    except RuntimeError:
        if t.mismatch is not None:
            t.mismatch = replace(t.mismatch, module="", unit=None, code=GENERATE_APPENDS)
        raise


def _order(device: str) -> tuple[int, int]:
    return (0, int(device)) if device.isdigit() else (1, 0)
