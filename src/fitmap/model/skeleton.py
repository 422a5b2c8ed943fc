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

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import cast

import torch
from torch import nn

from fitmap.errors import BadInput, CheckpointError
from fitmap.model import quant
from fitmap.model.build import build_model, empty_weights, is_remote, load_config
from fitmap.model.inventory import DTYPE_BYTES, Inventory, TensorInfo
from fitmap.model.keys import key_mapper, quantized_keys, split_targets
from fitmap.model.modules import has_state, input_embeddings, tied_parameters


@dataclass(frozen=True)
class Unit:
    name: str  # module path (or parameter path) used as device_map key
    kind: str  # "block" | "vision" | "input" | "output" | "other"
    params: tuple[str, ...]  # state-dict names it owns (parameters and persistent buffers)
    numel: int  # elements of its floating parameters
    weight_bytes: int  # bytes at the planned dtype (exact header bytes when known)
    layer: int | None = None  # index of the text decoder layer (holds KV cache)
    experts: str | None = None  # a MoE block's routed experts module (path), which may run where it lives
    expert_bytes: int = 0  # of weight_bytes, those of ``experts``


@dataclass(frozen=True)
class Group:
    name: str  # "input", "output", "tied", "pin:<device>"
    units: tuple[str, ...]


@dataclass(frozen=True)
class Skeleton:
    model_class: str
    dtype: str  # torch dtype name the plan uses for floating weights
    units: tuple[Unit, ...]  # in execution order
    groups: tuple[Group, ...]
    tied: tuple[tuple[str, ...], ...]  # parameter names sharing one storage
    no_split: tuple[str, ...]  # class names treated as no-split
    text_layers: str  # path of the text decoder's ModuleList
    config: object = field(repr=False, compare=False, default=None)  # the PretrainedConfig
    quantize: str | None = None  # quantized while loading (--quantize), sized so
    resident_only: bool = False  # quantized weights: never streamed per forward (no offload tiers)

    def unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)

    @property
    def weight_bytes(self) -> int:
        return sum(u.weight_bytes for u in self.units)


# --------------------------------------------------------------------------- units
def skeleton(
    inv: Inventory,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    model: nn.Module | None = None,
    quantize: str | None = None,
) -> Skeleton:
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
    if model is None and not is_remote(type(config)) and not quantized:
        from fitmap import cache

        cache_key = cache.key(inv, str(dtype).removeprefix("torch."))
        saved = cache.load_skeleton(cache_key)
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
    qbytes = (
        quant.planned_bytes(model, quantize, dtype)
        if quantize
        else {k: inv.tensors[k].nbytes for k in quantized_keys(model) if k in inv.tensors}
    )  # saved quantized: all parts
    if quant.declared(config) is not None and quant.of(model) is None:
        # no quantizer here: a catalog entry / config alone is sized as released; a checkpoint by its headers,
        # each packed weight's parts (qweight, qzeros, scales, ...) counted to the module's weight
        qbytes |= quant.released_bytes(model, config) if not inv.tensors else _packed_parts(model, inv)
    if quant.dequantizes(model):  # the quantizer unpacks on this machine (gpt-oss MXFP4 without its kernels)
        params = dict(model.named_parameters())
        qbytes |= {
            k: params[k].numel() * dtype.itemsize
            for k, t in inv.tensors.items()
            if k in params and t.shape == () and t.dtype not in ("F32", "F16", "BF16", "F64")
        }
    units = _make_units(model, unit_paths, layers_path, inv, dtype, qbytes)
    if inv.tensors and (quant.of(model) is not None or quant.declared(config) is None):
        check_against_checkpoint(model, inv)  # a packed layout fitmap could not build is sized as stored
    units = by_stage(classify(execution_order(units), _anchors(model, layers_path), towers(model, layers_path)))
    groups = colocation_groups(units, tied)
    sk = Skeleton(
        type(model).__name__,
        str(dtype).removeprefix("torch."),
        tuple(units),
        groups,
        tied,
        tuple(sorted(no_split)),
        layers_path,
        config,
        quantize,
        quantized,
    )
    if cache_key is not None:
        from fitmap import cache

        cache.save_skeleton(cache_key, _to_json(sk))
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
    return {
        "model_class": sk.model_class,
        "dtype": sk.dtype,
        "text_layers": sk.text_layers,
        "attn_implementation": _attn_of(sk.config),
        "units": [
            [u.name, u.kind, list(u.params), u.numel, u.weight_bytes, u.layer, u.experts, u.expert_bytes]
            for u in sk.units
        ],
        "groups": [[g.name, list(g.units)] for g in sk.groups],
        "tied": [list(t) for t in sk.tied],
        "no_split": list(sk.no_split),
    }


def _attn_of(config) -> str | None:
    from fitmap.model.configs import text_config

    try:
        return getattr(text_config(config), "_attn_implementation", None)
    except Exception:
        return None


def _from_json(d: dict, config) -> Skeleton:
    attn = d.get("attn_implementation")
    if attn is not None and _attn_of(config) != attn:
        from fitmap.model.configs import text_config

        for c in {id(config): config, id(tc := object.__getattribute__(text_config(config), "_config")): tc}.values():
            c._attn_implementation = attn
    units = tuple(
        Unit(n, k, tuple(p), int(e), int(b), None if layer is None else int(layer), experts, int(eb))
        for n, k, p, e, b, layer, experts, eb in d["units"]
    )
    return Skeleton(
        d["model_class"],
        d["dtype"],
        units,
        tuple(Group(n, tuple(u)) for n, u in d["groups"]),
        tuple(tuple(t) for t in d["tied"]),
        tuple(d["no_split"]),
        d["text_layers"],
        config,
    )


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
    for target, siblings in split_targets(model, list(inv.tensors)).items():  # q, k, v from one in_proj
        for sibling in siblings:  # present; their bytes are counted in the first target's
            renamed.setdefault(sibling, replace(renamed[target], name=sibling, shape=(), nbytes=0))
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
    embed = input_embeddings(model)
    embed_path = next(p for p, m in model.named_modules() if m is embed)
    parent = embed_path.rpartition(".")[0]
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    siblings = [(p, m) for p, m in lists if p.rpartition(".")[0] == parent] or lists
    path, _ = max(siblings, key=lambda pm: sum(x.numel() for x in pm[1].parameters()))
    return path


def share_parameter(model: nn.Module, names: tuple[str, ...], param: nn.Parameter) -> None:
    """Make every parameter name in ``names`` refer to ``param`` (re-tying after placement)."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = param


def _make_units(
    model: nn.Module, paths: list[str], layers_path: str, inv: Inventory, dtype: torch.dtype, quantized: dict[str, int]
) -> list[Unit]:
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
        tensors = [params[n] if n in params else buffers[n] for n in names]
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
        if path.startswith(layer_prefix) and path[len(layer_prefix) :].split(".")[0].isdigit():
            layer = int(path[len(layer_prefix) :].split(".")[0])
        kind = "block" if layer is not None else "other"
        experts = routed_experts(model, path) if layer is not None else None
        expert_bytes = (
            sum(
                quantized[n] if n in quantized else _tensor_bytes(n, params[n], inv, dtype)
                for n in names
                if n in params and n.startswith(experts + ".")
            )
            if experts
            else 0
        )
        units.append(Unit(path, kind, owned, numel, nbytes, layer, experts, expert_bytes))
    return units


def routed_experts(model: nn.Module, block: str) -> str | None:
    """The routed experts of a MoE decoder block: the module named ``experts`` under it that holds
    weights (transformers 5's fused 3-D experts, or a list of expert MLPs in remote code); shared
    experts are not routed and stay with the block."""
    for path, m in model.get_submodule(block).named_modules(prefix=block):
        if path.rsplit(".", 1)[-1] == "experts" and any(True for _ in m.parameters()):
            return path
    return None


LARGE_COMPUTED_BUFFER = 1 << 20
"""A non-persistent buffer this large (1 MiB) counts in its unit's bytes; smaller ones do not."""


def _tensor_bytes(name: str, t: torch.Tensor, inv: Inventory, dtype: torch.dtype) -> int:
    info = inv.tensors.get(name)
    if info is not None and (info.dtype not in ("F32", "F16", "BF16", "F64") or _same(info.dtype, dtype)):
        return info.nbytes  # exact: quantized/packed tensors and unchanged dtypes
    if not t.is_floating_point():
        return t.numel() * t.element_size()
    if (
        inv.fp8_linear
        and t.dim() == 2
        and name.endswith(("proj.weight", "experts.weight"))
        or (inv.fp8_linear and t.dim() == 3)
    ):
        # fp8 storage plus one fp32 scale per 128x128 block
        blocks = -(-t.shape[-2] // 128) * -(-t.shape[-1] // 128) * (t.numel() // (t.shape[-2] * t.shape[-1]))
        return t.numel() + 4 * blocks
    return t.numel() * dtype.itemsize


def _same(tag: str, dtype: torch.dtype) -> bool:
    return DTYPE_BYTES[tag] == dtype.itemsize and {
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "F64": "float64",
    }[tag] == str(dtype).removeprefix("torch.")


def check_against_checkpoint(model: nn.Module, inv: Inventory) -> None:
    """A config that does not describe the tensors fails here, before any load."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [
        f"{k}: config gives {list(expected[k])}, checkpoint has {list(t.shape)}"
        for k, t in inv.tensors.items()
        if k in expected and t.shape and tuple(t.shape) != expected[k]
    ]
    if wrong:
        raise CheckpointError(
            f"config.json in {inv.path} does not match the weights ({len(wrong)} tensor(s) differ), e.g. "
            + "; ".join(wrong[:3])
            + ". Use the config.json that came with these weights"
        )
    missing = _missing_parameters(model, inv)
    if missing:
        raise CheckpointError(
            f"the weights in {inv.path} lack {len(missing)} parameter(s) that config.json describes (e.g. "
            f"{', '.join(missing[:3])}): config.json and the weights disagree. Check num_hidden_layers and the "
            "other sizes in config.json, or download the missing shards"
        )


def _missing_parameters(model: nn.Module, inv: Inventory) -> list[str]:
    """Parameters no checkpoint tensor provides (a tied copy is stored once, under any of its names)."""
    have = set(inv.tensors)
    tied = {n: group for group in tied_parameters(model) for n in group}
    return sorted(
        n
        for n, _ in model.named_parameters(remove_duplicate=False)
        if n not in have and not any(t in have for t in tied.get(n, ()))
    )


def execution_order(units: list[Unit]) -> list[Unit]:
    """Registration order, except that text decoder blocks run in layer order."""
    blocks = iter(sorted((u for u in units if u.layer is not None), key=lambda u: cast(int, u.layer)))  # layer is set
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
    embed: str  # path of get_input_embeddings()
    text_model: str  # its parent: the text model
    head: str | None  # path of get_output_embeddings()


def _anchors(model: nn.Module, layers_path: str) -> _Anchors:
    """The text model is the nearest module holding both the input embeddings and the
    text blocks (ChatGLM nests its embedding one level deeper than its layers)."""
    paths = {id(m): p for p, m in model.named_modules()}
    embed = paths[id(input_embeddings(model))]
    has_head = hasattr(model, "get_output_embeddings")
    out = model.get_output_embeddings() if has_head else None  # type: ignore[operator]  # a PreTrainedModel method
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
            kind = "input"  # embeddings and parameterless helpers (rotary) feed the first block
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
