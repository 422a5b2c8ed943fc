"""Stage 2 — Skeleton: the model built with no storage, cut into placement units.

A *unit* is what the plan places whole: a no-split block (``_no_split_modules``,
or, when a model declares none, the children of a ModuleList that share a class),
or a maximal module with no unit inside it (embeddings, norms, ``lm_head``), or a
parameter held directly by a module that contains units.

*Co-location groups* are found from the module tree, not from model names:

* input side — the module returned by ``get_input_embeddings()``, its parameterless
  siblings (rotary embeddings compute positions from the ids), and every unit that
  lies outside the text model (vision tower, projector, resampler: image features
  are merged into the text embeddings, so they must meet there);
* output side — the text model's units after its blocks (final norm) and the
  output embeddings (``lm_head``);
* tied weights — parameters shared by identity (``lm_head`` tied to the embedding)
  join their groups.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import nn

from fitmap import compat, quant
from fitmap.hooks import has_state
from fitmap.errors import BadInput, CheckpointError, ModelCodeError, remote_code_flag
from fitmap.inventory import DTYPE_BYTES, Inventory, TensorInfo
from fitmap.keys import key_mapper, quantized_keys


@dataclass(frozen=True)
class Unit:
    name: str                         # module path (or parameter path) used as device_map key
    kind: str                         # "block" | "vision" | "input" | "output" | "other"
    params: tuple[str, ...]           # state-dict names it owns (parameters and persistent buffers)
    numel: int                        # elements of its floating parameters
    weight_bytes: int                 # bytes at the planned dtype (exact header bytes when known)
    layer: int | None = None          # index of the text decoder layer (holds KV cache)


@dataclass(frozen=True)
class Group:
    name: str                         # "input", "output", "tied", "pin:<device>"
    units: tuple[str, ...]


@dataclass(frozen=True)
class Skeleton:
    model_class: str
    dtype: str                        # torch dtype name the plan uses for floating weights
    units: tuple[Unit, ...]           # in execution order
    groups: tuple[Group, ...]
    tied: tuple[tuple[str, ...], ...]  # parameter names sharing one storage
    no_split: tuple[str, ...]         # class names treated as no-split
    text_layers: str                  # path of the text decoder's ModuleList
    config: object = field(repr=False, compare=False, default=None)  # the PretrainedConfig
    quantize: str | None = None       # quantized while loading (--quantize), sized so
    resident_only: bool = False       # quantized weights: never streamed per forward (no offload tiers)

    def unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)

    @property
    def weight_bytes(self) -> int:
        return sum(u.weight_bytes for u in self.units)


# --------------------------------------------------------------------------- building
def load_config(inv: Inventory, trust_remote_code: bool = False):
    """The transformers config of ``inv``; remote code only when the user allows it."""
    import transformers

    remote_code_flag(trust_remote_code)

    if inv.source == "catalog":
        from fitmap.catalog_models import build_config, catalog_entry

        return build_config(catalog_entry(inv.name))
    if "auto_map" in inv.config and not trust_remote_code and not _native(inv.config):
        raise BadInput(
            f"{inv.name} ships its own model code (auto_map in config.json); fitmap runs it "
            "only when you pass --trust-remote-code, after reading that code"
        )
    try:
        return transformers.AutoConfig.from_pretrained(inv.path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise CheckpointError(f"{inv.path}/config.json cannot be read by transformers: {_one_line(e)}") from None
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub"):   # transformers 5's strict config validation
            raise CheckpointError(f"{inv.path}/config.json is rejected by transformers: {_one_line(e)}; fix "
                                  "config.json or restore it from the model's repository") from None
        raise


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (transformers' validation errors span several)."""
    return " ".join(str(e).split())


def _native(config: dict) -> bool:
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
                if not _remote(type(config)):
                    raise
                raise ModelCodeError.from_exception("building the model", e) from None
            compat.ensure_generate(model)
            return model
    raise BadInput(f"transformers cannot build model type {config.model_type!r}: {errors[-1]}")


MODEL_PRINTS = True   # the CLI turns this off unless --verbose


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


def _remote(cls: type) -> bool:
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

    nn.Module.register_parameter, nn.Module.register_buffer = to_meta_parameter, note_buffer
    try:
        with contextlib.nullcontext() if keep_buffers else _large_factories_on_meta():
            yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
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
            if (len(dims) == len(size) and math.prod(dims) >= LARGE_FACTORY_NUMEL
                    and kwargs.get("device") in (None, "cpu", torch.device("cpu"))):
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


# --------------------------------------------------------------------------- units
def skeleton(inv: Inventory, dtype: torch.dtype, trust_remote_code: bool = False,
             model: nn.Module | None = None, quantize: str | None = None) -> Skeleton:
    """Build ``inv``'s model on meta (unless given) and find units, order and groups.

    Quantized models (a checkpoint saved quantized, or ``quantize``) are built with
    transformers' quantizer applied, so units are sized as they will be loaded; where the
    quantizer's library is missing, a saved-quantized checkpoint is sized from its headers.
    """
    config = load_config(inv, trust_remote_code)
    cache_key = None
    saved = quant.declared(config)
    if quantize is not None and saved is not None:
        raise BadInput(f"{inv.name} is already quantized ({saved.get('quant_method')}); drop --quantize {quantize}")
    quantized = quantize is not None or saved is not None
    if model is None and not _remote(type(config)) and not quantized:
        from fitmap import costcache

        cache_key = costcache.key(inv, str(dtype).removeprefix("torch."))
        saved = costcache.load_skeleton(cache_key)
        if saved is not None:
            try:
                return _from_json(saved, config)
            except (KeyError, TypeError, ValueError):
                pass
    if model is None:
        with empty_weights():
            model = build_model(config, inv.task, dtype, trust_remote_code)
        if quant.declared(config) is not None:
            _quantized(model, config, dtype, released=not inv.tensors)
    no_split = no_split_classes(model)
    unit_paths = find_units(model, no_split)
    layers_path = text_layers_path(model)
    tied = tied_parameters(model)
    inv = _with_model_keys(inv, model)
    qbytes = quant.planned_bytes(model, quantize, dtype) if quantize else {
        k: inv.tensors[k].nbytes for k in quantized_keys(model) if k in inv.tensors}   # saved quantized: all parts
    if quant.declared(config) is not None and quant.of(model) is None:
        # no quantizer here: a catalog entry / config alone is sized as released; a checkpoint by its headers,
        # each packed weight's parts (qweight, qzeros, scales, ...) counted to the module's weight
        qbytes |= quant.released_bytes(model, config) if not inv.tensors else _packed_parts(model, inv)
    if quant.dequantizes(model):   # the quantizer unpacks on this machine (gpt-oss MXFP4 without its kernels)
        params = dict(model.named_parameters())
        qbytes |= {k: params[k].numel() * dtype.itemsize for k, t in inv.tensors.items()
                   if k in params and t.shape == () and t.dtype not in ("F32", "F16", "BF16", "F64")}
    units = _make_units(model, unit_paths, layers_path, inv, dtype, qbytes)
    if inv.tensors and (quant.of(model) is not None or quant.declared(config) is None):
        check_against_checkpoint(model, inv)   # a packed layout fitmap could not build is sized as stored
    units = by_stage(classify(execution_order(units), _anchors(model, layers_path), towers(model, layers_path)))
    groups = colocation_groups(units, tied)
    sk = Skeleton(type(model).__name__, str(dtype).removeprefix("torch."), tuple(units), groups,
                  tied, tuple(sorted(no_split)), layers_path, config, quantize, quantized)
    if cache_key is not None:
        from fitmap import costcache

        costcache.save_skeleton(cache_key, _to_json(sk))
    return sk


def _quantized(model: nn.Module, config, dtype: torch.dtype, released: bool = False) -> None:
    """A checkpoint saved quantized: its quantizer applied, so tensors match the headers; where
    the quantizer's library is missing here, it is planned from its header bytes instead (loading
    it will say what to install). ``released``: no headers (a catalog entry, a config alone): sized
    in the released layout, whatever this machine would do with it."""
    if released:
        q = quant.released(config)
        if q is not None:
            try:
                quant.prepare(model, q, dtype, keep_format=True)
            except (ImportError, ValueError, RuntimeError):
                pass
        return
    try:
        q = quant.quantizer(config, None, dtype, "plan")
    except BadInput:
        return
    quant.prepare(model, q, dtype)


def _packed_parts(model: nn.Module, inv: Inventory) -> dict[str, int]:
    """``X.weight`` -> bytes of the checkpoint tensors under ``X.`` that are no parameter of the model
    (a quantized Linear stored as ``X.qweight``, ``X.scales``, ...), for weights the checkpoint lacks."""
    params = dict(model.named_parameters())
    state = set(model.state_dict())
    parts: dict[str, int] = {}
    for key, info in inv.tensors.items():
        if key in state:
            continue
        owner = key.rpartition(".")[0] + ".weight"
        if owner in params and owner not in inv.tensors:
            parts[owner] = parts.get(owner, 0) + info.nbytes
    return parts


def _to_json(sk: Skeleton) -> dict:
    """What planning reads of a skeleton (the model itself is not kept: it is built again to load or simulate),
    and the attention implementation building the model set on its config (Gemma-2: eager)."""
    return {"model_class": sk.model_class, "dtype": sk.dtype, "text_layers": sk.text_layers,
            "attn_implementation": _attn_of(sk.config),
            "units": [[u.name, u.kind, list(u.params), u.numel, u.weight_bytes, u.layer] for u in sk.units],
            "groups": [[g.name, list(g.units)] for g in sk.groups], "tied": [list(t) for t in sk.tied],
            "no_split": list(sk.no_split)}


def _attn_of(config) -> str | None:
    from fitmap.configs import text_config

    try:
        return getattr(text_config(config), "_attn_implementation", None)
    except Exception:
        return None


def _from_json(d: dict, config) -> Skeleton:
    attn = d.get("attn_implementation")
    if attn is not None and _attn_of(config) != attn:
        from fitmap.configs import text_config

        for c in {id(config): config, id(tc := object.__getattribute__(text_config(config), "_config")): tc}.values():
            c._attn_implementation = attn
    units = tuple(Unit(n, k, tuple(p), int(e), int(b), None if layer is None else int(layer))
                  for n, k, p, e, b, layer in d["units"])
    return Skeleton(d["model_class"], d["dtype"], units, tuple(Group(n, tuple(u)) for n, u in d["groups"]),
                    tuple(tuple(t) for t in d["tied"]), tuple(d["no_split"]), d["text_layers"], config)


def _with_model_keys(inv: Inventory, model: nn.Module) -> Inventory:
    """``inv`` with tensors renamed to the model's names; converted (fused) tensors are
    summed into their target so byte counts stay exact."""
    if not inv.tensors:
        return inv
    mapper = key_mapper(model)
    renamed: dict[str, TensorInfo] = {}
    for key, info in inv.tensors.items():
        target, converted = mapper(key)
        if converted and target in renamed:
            prev = renamed[target]
            renamed[target] = replace(prev, shape=(), nbytes=prev.nbytes + info.nbytes)
        else:
            renamed[target] = replace(info, name=target, shape=() if converted else info.shape)
    return replace(inv, tensors=renamed)


def no_split_classes(model: nn.Module) -> set[str]:
    declared: set[str] = set()
    for m in model.modules():
        declared |= set(getattr(m, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    declared &= present
    return declared or _repeated_block_classes(model)


def _repeated_block_classes(model: nn.Module) -> set[str]:
    """Without ``_no_split_modules``: children of a ModuleList that share a class."""
    found: set[str] = set()
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            counts = Counter(type(c).__name__ for c in m)
            found |= {cls for cls, n in counts.items() if n > 1}
    return found


def find_units(model: nn.Module, no_split: set[str]) -> list[str]:
    """Module (or parameter) paths of the placement units, in registration order."""
    contains_unit = _modules_containing_units(model, no_split)
    units: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        if path and (type(module).__name__ in no_split or path not in contains_unit):
            if has_state(module):
                units.append(path)
            return
        for pname, _ in module.named_parameters(recurse=False):
            units.append(f"{path}.{pname}" if path else pname)
        for bname, _ in module.named_buffers(recurse=False):
            units.append(f"{path}.{bname}" if path else bname)
        for cname, child in module.named_children():
            visit(child, f"{path}.{cname}" if path else cname)

    visit(model, "")
    return units


def _modules_containing_units(model: nn.Module, no_split: set[str]) -> set[str]:
    """Paths of modules that have a no-split module strictly below them."""
    out: set[str] = {""}
    for path, m in model.named_modules():
        if path and type(m).__name__ in no_split:
            parts = path.split(".")
            out.update(".".join(parts[:i]) for i in range(len(parts)))
    return out


def text_layers_path(model: nn.Module) -> str:
    """The text decoder's block list: the largest repeated ModuleList next to the input embeddings."""
    embed = model.get_input_embeddings()
    embed_path = next(p for p, m in model.named_modules() if m is embed)
    parent = embed_path.rpartition(".")[0]
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    siblings = [(p, m) for p, m in lists if p.rpartition(".")[0] == parent] or lists
    path, _ = max(siblings, key=lambda pm: sum(x.numel() for x in pm[1].parameters()))
    return path


def tied_parameters(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    by_storage: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(id(p), []).append(name)
    return tuple(tuple(names) for names in by_storage.values() if len(names) > 1)


def share_parameter(model: nn.Module, names: tuple[str, ...], param: nn.Parameter) -> None:
    """Make every parameter name in ``names`` refer to ``param`` (re-tying after placement)."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = param


def _make_units(model: nn.Module, paths: list[str], layers_path: str, inv: Inventory,
                dtype: torch.dtype, quantized: dict[str, int]) -> list[Unit]:
    """Units with their bytes: header bytes where exact, ``quantized`` bytes for weights
    quantized while loading, else elements at ``dtype``."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    persistent = set(model.state_dict().keys())
    layer_prefix = layers_path + "."
    seen: set[int] = set()
    units = []
    for path in paths:
        names = [n for n in list(params) + list(buffers) if n == path or n.startswith(path + ".")]
        owned = tuple(n for n in names if n in persistent)
        tensors = [params.get(n) if n in params else buffers[n] for n in names]
        numel = sum(params[n].numel() for n in names if n in params)
        nbytes = 0
        for n, t in zip(names, tensors):
            if id(t) in seen:
                continue  # a tied parameter counts once
            seen.add(id(t))
            if n in buffers and n not in persistent:
                # computed, not loaded: rotary inv_freq is noise, but remote code keeps tables per layer
                # (InternLM2's cos/sin caches: 2 x 32768 x 128 values in every layer; MiniCPM-V's
                # resampler position table), resident on the unit's device
                size = t.numel() * t.element_size()
                nbytes += size if size >= LARGE_COMPUTED_BUFFER else 0
                continue
            nbytes += quantized[n] if n in quantized else _tensor_bytes(n, t, inv, dtype)
        layer = None
        if path.startswith(layer_prefix) and path[len(layer_prefix):].split(".")[0].isdigit():
            layer = int(path[len(layer_prefix):].split(".")[0])
        kind = "block" if layer is not None else "other"
        units.append(Unit(path, kind, owned, numel, nbytes, layer))
    return units


LARGE_COMPUTED_BUFFER = 1 << 20
"""A non-persistent buffer this large (1 MiB) counts in its unit's bytes; smaller ones do not."""


def _tensor_bytes(name: str, t: torch.Tensor, inv: Inventory, dtype: torch.dtype) -> int:
    info = inv.tensors.get(name)
    if info is not None and (info.dtype not in ("F32", "F16", "BF16", "F64") or _same(info.dtype, dtype)):
        return info.nbytes  # exact: quantized/packed tensors and unchanged dtypes
    if not t.is_floating_point():
        return t.numel() * t.element_size()
    if inv.fp8_linear and t.dim() == 2 and name.endswith(("proj.weight", "experts.weight")) or (
        inv.fp8_linear and t.dim() == 3
    ):
        # fp8 storage plus one fp32 scale per 128x128 block
        blocks = -(-t.shape[-2] // 128) * -(-t.shape[-1] // 128) * (t.numel() // (t.shape[-2] * t.shape[-1]))
        return t.numel() + 4 * blocks
    return t.numel() * dtype.itemsize


def _same(tag: str, dtype: torch.dtype) -> bool:
    return DTYPE_BYTES[tag] == dtype.itemsize and {"F32": "float32", "F16": "float16", "BF16": "bfloat16",
                                                  "F64": "float64"}[tag] == str(dtype).removeprefix("torch.")


def check_against_checkpoint(model: nn.Module, inv: Inventory) -> None:
    """A config that does not describe the tensors fails here, before any load."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [
        f"{k}: config gives {list(expected[k])}, checkpoint has {list(t.shape)}"
        for k, t in inv.tensors.items() if k in expected and t.shape and tuple(t.shape) != expected[k]
    ]
    if wrong:
        raise CheckpointError(
            f"config.json in {inv.path} does not match the weights ({len(wrong)} tensor(s) differ), e.g. "
            + "; ".join(wrong[:3]) + ". Use the config.json that came with these weights"
        )
    missing = _missing_parameters(model, inv)
    if missing:
        raise CheckpointError(
            f"the weights in {inv.path} lack {len(missing)} parameter(s) that config.json describes (e.g. "
            f"{', '.join(missing[:3])}): config.json and the weights disagree. Check num_hidden_layers and the "
            "other sizes in config.json, or download the missing shards")


def _missing_parameters(model: nn.Module, inv: Inventory) -> list[str]:
    """Parameters no checkpoint tensor provides (a tied copy is stored once, under any of its names)."""
    have = set(inv.tensors)
    tied = {n: group for group in tied_parameters(model) for n in group}
    return sorted(n for n, _ in model.named_parameters(remove_duplicate=False)
                  if n not in have and not any(t in have for t in tied.get(n, ())))


def execution_order(units: list[Unit]) -> list[Unit]:
    """Registration order, except that text decoder blocks run in layer order."""
    blocks = iter(sorted((u for u in units if u.layer is not None), key=lambda u: u.layer))
    return [next(blocks) if u.layer is not None else u for u in units]


_STAGE = {"vision": 0, "input": 1, "block": 2, "other": 2, "output": 3}


def by_stage(units: list[Unit]) -> list[Unit]:
    """Execution order: the input side (vision tower, embeddings, rotary) runs before the
    first block and the output side after the last, whatever order they were registered in."""
    index = {u.name: i for i, u in enumerate(units)}
    return sorted(units, key=lambda u: (_STAGE[u.kind], index[u.name]))


# --------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class _Anchors:
    embed: str          # path of get_input_embeddings()
    text_model: str     # its parent: the text model
    head: str | None    # path of get_output_embeddings()


def _anchors(model: nn.Module, layers_path: str) -> _Anchors:
    """The text model is the nearest module holding both the input embeddings and the
    text blocks (ChatGLM nests its embedding one level deeper than its layers)."""
    paths = {id(m): p for p, m in model.named_modules()}
    embed = paths[id(model.get_input_embeddings())]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    common = []
    for a, b in zip(embed.split("."), layers_path.split(".")):
        if a != b:
            break
        common.append(a)
    return _Anchors(embed, ".".join(common), paths.get(id(out)) if out is not None else None)


def towers(model: nn.Module, layers_path: str) -> tuple[str, ...]:
    """Encoders beside the text model (vision, audio): the outermost modules that hold a list of
    repeated blocks other than the text layers and do not hold the text layers. Wherever they
    are registered (CogVLM registers ``model.vision`` after ``model.layers``), they feed the
    input side."""
    text = layers_path + "."
    found: list[str] = []
    for path, m in model.named_modules():
        if not path or path == layers_path or path.startswith(text) or text.startswith(path + "."):
            continue
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            parts = path.split(".")
            # the outermost ancestor that does not contain the text layers
            for i in range(1, len(parts) + 1):
                top = ".".join(parts[:i])
                if not text.startswith(top + "."):
                    break
            if not any(top == f or top.startswith(f + ".") for f in found):
                found.append(top)
    return tuple(found)


def classify(units: list[Unit], a: _Anchors, encoders: tuple[str, ...] = ()) -> list[Unit]:
    """Set each unit's kind: block, vision, input, output or other."""
    blocks = [i for i, u in enumerate(units) if u.layer is not None]
    first, last = (blocks[0], blocks[-1]) if blocks else (len(units), -1)
    out = []
    for i, u in enumerate(units):
        inside_text = not a.text_model or _under(u.name, a.text_model)
        if u.layer is not None:
            kind = "block"
        elif _under(u.name, a.head):
            kind = "output"
        elif not inside_text or any(_under(u.name, e) for e in encoders):
            kind = "vision"
        elif _under(u.name, a.embed) or u.numel == 0 or i < first:
            kind = "input"   # embeddings and parameterless helpers (rotary) feed the first block
        elif i > last:
            kind = "output"
        else:
            kind = "other"
        out.append(replace(u, kind=kind))
    return out


def colocation_groups(units: list[Unit], tied: tuple[tuple[str, ...], ...]) -> tuple[Group, ...]:
    inputs = tuple(u.name for u in units if u.kind in ("vision", "input"))
    outputs = tuple(u.name for u in units if u.kind == "output")
    groups = [Group("input", inputs), Group("output", outputs)]
    for names in tied:
        owners = tuple(dict.fromkeys(_owner(n, units) for n in names))
        if len(owners) > 1:
            groups.append(Group("tied", owners))
    return tuple(g for g in groups if g.units)


def _under(name: str, prefix: str | None) -> bool:
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def _owner(param: str, units: list[Unit]) -> str:
    return next(u.name for u in units if param == u.name or param.startswith(u.name + "."))
