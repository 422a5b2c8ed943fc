"""Building a model with no storage: its config (remote code only when the user allows it), the
transformers class for its task, built on ``meta`` (or under a fake mode) at a dtype, with the
model code's own quirks met: TorchScript helpers run as Python, tensor math in ``__init__`` on
real small tensors, huge factory calls made on ``meta``, the model's prints kept quiet."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fitmap.errors import BadInput, CheckpointError, ModelCodeError, remote_code_flag
from fitmap.model import compat
from fitmap.model.inventory import Inventory


# --------------------------------------------------------------------------- building
def load_config(inv: Inventory, trust_remote_code: bool = False):
    """The transformers config of ``inv``; remote code only when the user allows it."""
    import transformers

    remote_code_flag(trust_remote_code)

    if inv.source == "catalog":
        from fitmap.model.catalog_models import build_config, catalog_entry

        return build_config(catalog_entry(inv.name))
    if "auto_map" in inv.config and not trust_remote_code and not _native(inv.config):
        raise BadInput(
            f"{inv.name} ships its own model code (auto_map in config.json); fitmap runs it "
            "only when you pass --trust-remote-code, after reading that code"
        )
    assert inv.path is not None  # only catalog inventories (returned above) have no directory
    from fitmap.model.quant import check_config_json

    check_config_json(inv.config)  # transformers' parsing raises AttributeError on a string quantization_config
    try:
        return transformers.AutoConfig.from_pretrained(inv.path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise CheckpointError(f"{inv.path}/config.json cannot be read by transformers: {_one_line(e)}") from None
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub"):  # transformers 5's strict config validation
            raise CheckpointError(
                f"{inv.path}/config.json is rejected by transformers: {_one_line(e)}; fix "
                "config.json or restore it from the model's repository"
            ) from None
        raise


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (transformers' validation errors span several)."""
    return " ".join(str(e).split())


def _native(config: Mapping) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return config.get("model_type") in CONFIG_MAPPING_NAMES and not config.get("auto_map")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(config, task: str, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """Instantiate the model from ``config`` in the current device context, at ``dtype``.

    The caller chooses the storage: :func:`empty_weights` for planning and loading, a
    FakeTensorMode for simulation. Weights are never initialised from a checkpoint here.
    """
    remote_code_flag(trust_remote_code)
    if trust_remote_code:
        compat.legacy_torch_names()
    errors = []
    with default_dtype(dtype), _python_not_torchscript(), _model_prints():
        for auto in compat.auto_classes(task):
            try:
                model = compat.from_config(auto, config, dtype, trust_remote_code)
            except ValueError as e:  # the Auto class does not know this config
                errors.append(str(e).splitlines()[0])
                continue
            except Exception as e:
                if not is_remote(type(config)):
                    raise
                raise ModelCodeError.from_exception("building the model", e) from None
            compat.ensure_generate(model)
            return model
    raise BadInput(f"transformers cannot build model type {config.model_type!r}: {errors[-1]}")


MODEL_PRINTS = True  # the CLI turns this off unless --verbose


@contextlib.contextmanager
def _model_prints() -> Iterator[None]:
    """What model code prints while it is built, unless the CLI was asked to be quiet."""
    if MODEL_PRINTS:
        yield
        return
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _python_not_torchscript() -> Iterator[None]:
    """Model code's ``@torch.jit.script`` helpers (ChatGLM's rotary) run as the Python they
    were written in: TorchScript cannot take fake tensors ("Unknown device for graph fuser")
    nor the runtime's hooks, and computes the same values. Scripting is off while the model's
    module is imported; helpers scripted before (the module imported earlier) are swapped back."""
    import sys

    from torch.jit import _state

    was = bool(_state._enabled)
    _state.disable()
    try:
        yield
    finally:
        if was:
            _state.enable()
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers_modules") and module is not None:
            for attr, value in list(vars(module).items()):
                original = getattr(value, "_torchdynamo_inline", None)
                if isinstance(value, torch.jit.ScriptFunction) and callable(original):
                    setattr(module, attr, original)


def is_remote(cls: type) -> bool:
    return cls.__module__.startswith("transformers_modules")


@contextlib.contextmanager
def empty_weights(keep_buffers: bool = False, real_buffers: bool = False) -> Iterator[None]:
    """Parameters are registered on ``meta`` while ``__init__`` computes with ordinary CPU
    tensors (InternViT's ``torch.linspace(...).item()``, rotary tables built from
    ``inv_freq``), as accelerate's ``init_empty_weights`` does. Buffers stay real while
    ``__init__`` runs and go to ``meta`` when the context ends; with ``keep_buffers`` their
    values are kept (``module._fitmap_init_buffers``) for the loader, which places them
    instead of recomputing them; with ``real_buffers`` they stay the CPU tensors ``__init__``
    made (the simulator: their values drive index math)."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer
    registered: list[tuple[nn.Module, str]] = []

    def to_meta_parameter(module, name, param):
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def note_buffer(module, name, tensor, persistent=True):
        register_buffer(module, name, tensor, persistent)
        registered.append((module, name))

    nn.Module.register_parameter = to_meta_parameter  # type: ignore[method-assign]  # patched while building
    nn.Module.register_buffer = note_buffer  # type: ignore[method-assign]  # patched while building
    try:
        with contextlib.nullcontext() if keep_buffers else _large_factories_on_meta():
            yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]  # restores the patch
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]  # restores the patch
    if real_buffers:
        return
    for module, name in registered:
        tensor = module._buffers.get(name)
        if tensor is None or tensor.is_meta:
            continue
        if keep_buffers:
            module.__dict__.setdefault("_fitmap_init_buffers", {})[name] = tensor
        module._buffers[name] = tensor.to("meta")


LARGE_FACTORY_NUMEL = 1 << 24
"""A tensor factory call in ``__init__`` this large (16 M values) makes a weight, never a value the
code reads back: it is made on ``meta`` (Llama 4's experts are ``nn.Parameter(torch.zeros(16, 5120,
16384))``, 1.3 GB a layer that accelerate's way of building would allocate, then drop)."""


_FACTORIES = ("empty", "zeros", "ones", "full", "rand", "randn")


@contextlib.contextmanager
def _large_factories_on_meta() -> Iterator[None]:
    originals = {name: getattr(torch, name) for name in _FACTORIES}

    def on_meta(factory):
        def make(*args, **kwargs):
            if factory is originals["full"] or (len(args) == 1 and isinstance(args[0], (tuple, list))):
                size = args[0] if args else kwargs.get("size", ())
            else:
                size = args or kwargs.get("size", ())
            dims = [d for d in size if isinstance(d, int)] if isinstance(size, (tuple, list)) else []
            if (
                len(dims) == len(size)
                and math.prod(dims) >= LARGE_FACTORY_NUMEL
                and kwargs.get("device") in (None, "cpu", torch.device("cpu"))
            ):
                kwargs["device"] = "meta"
            return factory(*args, **kwargs)

        return make

    for name, factory in originals.items():
        setattr(torch, name, on_meta(factory))
    try:
        yield
    finally:
        for name, factory in originals.items():
            setattr(torch, name, factory)


def planned_dtype(inv: Inventory, requested: str | None) -> torch.dtype:
    """``requested`` (torch name) or the checkpoint's own float dtype, else bfloat16."""
    name = requested or inv.checkpoint_float_dtype() or inv.catalog_dtype
    cfg = inv.config.get("text_config", {}) if isinstance(inv.config.get("text_config"), dict) else {}
    name = name or inv.config.get("torch_dtype") or inv.config.get("dtype") or cfg.get("dtype") or "bfloat16"
    if name.startswith("float8"):
        name = "bfloat16"  # fp8 storage: non-Linear weights and compute stay in bf16
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BadInput(f"dtype {name!r} is not a floating torch dtype; use --dtype bf16, fp16 or fp32")
    return dtype


IMAGE_ARGUMENTS = ("pixel_values", "images", "image")
# where remote code takes its images: the forward pass, its own chat(), its own generate()
_IMAGE_METHODS = ("forward", "chat", "generate")


def model_class(config: Any, task: str, trust_remote_code: bool = False) -> type | None:
    """The class ``from_pretrained`` would build for ``config`` (remote code through its ``auto_map``),
    without building it; None when transformers knows none."""
    auto = getattr(config, "auto_map", None)
    if isinstance(auto, dict) and trust_remote_code:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        for key in ("AutoModelForCausalLM", "AutoModel"):
            if isinstance(auto.get(key), str):
                return get_class_from_dynamic_module(auto[key], getattr(config, "_name_or_path", ""))
    for cls in compat.auto_classes(task):
        mapping = getattr(cls, "_model_mapping", None)
        if mapping is None:
            continue
        try:
            return mapping[type(config)]
        except KeyError:
            continue
    return None


def image_arguments(cls: type | None) -> list[str]:
    """``Class.method(argument)`` for each image argument the model's own methods take."""
    if cls is None:
        return []
    found = []
    for method in _IMAGE_METHODS:
        fn = cls.__dict__.get(method)
        if fn is None:
            continue
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            continue
        found += [f"{cls.__name__}.{method}({p})" for p in params if p in IMAGE_ARGUMENTS]
    return found
