"""Routed experts computed on the CPU per routed expert: an experts module whose forward is given, at each call,
only the experts its tokens are routed to.

Four sources of those experts' weights:

* :class:`Packed` — MXFP4 experts (gpt-oss as released) the plan computes on the CPU (``cpu-compute``):
  RAM holds the checkpoint's packed bytes (where transformers, without the format's GPU kernels, would
  unpack every expert to bf16 on load: gpt-oss-120b's 57 GiB of experts would take 217 GiB), and a
  forward unpacks its routed experts (:func:`fitmap.model.mxfp4.unpack`).
* :class:`Stored` — other formats transformers unpacks on load (FP8 with block scales, DeepSeek-V3 as
  released), ``cpu-compute``: the checkpoint's per-expert tensors held as stored, a forward builds its routed
  experts with transformers' own converter (its dequantize operation first).
* :class:`FromDisk` — experts the plan leaves on disk (``disk-compute``): a forward reads its routed
  experts' rows from the checkpoint files (a slice of a fused tensor, or the per-expert tensors
  transformers would merge, merged by transformers' own converter), not the whole layer.
* :class:`Resident` — experts in RAM as the model holds them, for a module whose own forward computes
  every expert (Llama 4's, given one row block per expert): narrowed to the routed ones.

:func:`attach` hooks the module: before each forward the routed experts are fetched into compact
tensors and the module's own forward runs with them, its experts renumbered 0..k-1 (the model's code,
activation and weighting stay transformers'); after it, everything is put back.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from fitmap.errors import BadInput
from fitmap.model.inventory import TensorInfo
from fitmap.model.mxfp4 import converts_mxfp4, unpack
from fitmap.planning.experts import CPU_COMPUTE, DISK_COMPUTE
from fitmap.runtime import diskread
from fitmap.runtime.checkpoint import Checkpoint

_INDEX_NAMES = ("top_k_index", "router_indices", "selected_experts")


class Source(Protocol):
    fetched: int  # experts fetched so far (for tests and reports)

    @property
    def names(self) -> Collection[str]:
        """The module's parameters it supplies."""
        ...

    def fetch(self, name: str, chosen: torch.Tensor) -> torch.Tensor:
        """Parameter ``name`` of the experts ``chosen`` (sorted ids), stacked in that order."""
        ...


@dataclass
class Packed:
    """MXFP4 weights in RAM: parameter name -> (blocks, scales), and the dtype they unpack to."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dtype: torch.dtype
    fetched: int = 0

    @property
    def names(self) -> Collection[str]:
        return self.weights.keys()

    def fetch(self, name: str, chosen: torch.Tensor) -> torch.Tensor:
        blocks, scales = self.weights[name]
        return unpack(blocks.index_select(0, chosen), scales.index_select(0, chosen), self.dtype)


@dataclass
class Resident:
    """No weights of its own: the module's parameters are in memory, narrowed to the routed experts."""

    fetched: int = 0

    @property
    def names(self) -> Collection[str]:
        return ()

    def fetch(self, name: str, chosen: torch.Tensor) -> torch.Tensor:
        raise KeyError(name)


@dataclass
class FromDisk:
    """Weights read from the checkpoint per forward: parameter name -> model key, over ``ckpt``."""

    ckpt: Checkpoint
    keys: dict[str, str]
    fetched: int = 0
    read_bytes: int = 0  # bytes read from the files so far

    @property
    def names(self) -> Collection[str]:
        return self.keys.keys()

    def fetch(self, name: str, chosen: torch.Tensor) -> torch.Tensor:
        key, rows = self.keys[name], chosen.tolist()
        merge = self.ckpt.merged.get(key)
        if merge is None:  # stored as the model holds it: the chosen experts' rows
            (t,) = self._read([(self.ckpt.where[key][1], self.ckpt.infos.get(key), rows)])
            return t.to(self.ckpt.dtypes[key])
        if converts_mxfp4(merge.converter):
            wanted = [(keys[0], self.ckpt.parts.get(keys[0]), rows) for _, keys in merge.sources]
            parts = dict(zip([p for p, _ in merge.sources], self._read(wanted)))
            blocks = next(t for p, t in parts.items() if p.endswith("_blocks"))
            scales = next(t for p, t in parts.items() if p.endswith("_scales"))
            return unpack(blocks, scales, self.ckpt.dtypes[key])
        # stored per expert, merged on load by transformers' converter: only the chosen experts' tensors
        sources = tuple((p, tuple(keys[i] for i in rows)) for p, keys in merge.sources)
        names = [k for _, keys in sources for k in keys]
        got = dict(zip(names, self._read([(k, self.ckpt.parts.get(k), None) for k in names])))
        return replace(merge, sources=sources).build(got.__getitem__).to(self.ckpt.dtypes[key])

    def _read(self, wanted: Sequence[tuple[str, TensorInfo | None, list[int] | None]]) -> list[torch.Tensor]:
        """Checkpoint tensors (name, its header entry, the rows wanted or None for all), read at once: positioned
        reads on a pool of threads (a disk serves several at a time) where the header gives the offsets."""
        infos = [i for _, i, _ in wanted]
        if (
            self.ckpt.format != "safetensors"
            or not diskread.readable([i for i in infos if i is not None])
            or None in infos
        ):
            out = [self._mapped(name, rows) for name, _, rows in wanted]
        else:
            out, reads = [], []
            for _, info, rows in wanted:
                assert info is not None
                row = info.nbytes // max(info.shape[0], 1)
                ranges = [(info.offset, info.nbytes)] if rows is None else [(info.offset + r * row, row) for r in rows]
                data = torch.empty(sum(n for _, n in ranges), dtype=torch.uint8)
                view, at = memoryview(data.numpy()), 0  # type: ignore[arg-type]  # ndarray is a buffer
                for offset, n in ranges:
                    reads.append(
                        _READERS.submit(diskread.read_into, self.ckpt.directory / info.file, offset, view[at : at + n])
                    )
                    at += n
                shape = info.shape if rows is None else (len(rows), *info.shape[1:])
                out.append(data.view(diskread.DTYPES[info.dtype]).view(shape))
            for r in reads:
                r.result()
        self.read_bytes += sum(t.nbytes for t in out)
        return out

    def _mapped(self, name: str, rows: list[int] | None) -> torch.Tensor:
        file = self.ckpt.files.get(name) or next(f for f, n in self.ckpt.where.values() if n == name)
        return self.ckpt._opened(file)(name).clone() if rows is None else self.ckpt.rows(file, name, rows)


@dataclass
class Stored(FromDisk):
    """Weights held in RAM as the checkpoint stores them (FP8 with block scales, one tensor per expert), built
    per forward for the routed experts by transformers' own converter, as :class:`FromDisk` builds them."""

    held: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint key -> its tensor

    def _read(self, wanted: Sequence[tuple[str, TensorInfo | None, list[int] | None]]) -> list[torch.Tensor]:
        out = [self.held[n] if rows is None else self.held[n][rows] for n, _, rows in wanted]
        self.read_bytes += sum(t.nbytes for t in out)
        return out


_READERS = ThreadPoolExecutor(8, thread_name_prefix="fitmap-experts")  # reads in flight for routed experts


def attach(module: nn.Module, source: Source) -> list[Any]:
    """Hook ``module`` (an experts module with ``num_experts`` and expert-indexed parameters) so that each
    forward runs with only its routed experts, fetched from ``source`` (those it does not supply, when in
    memory, narrowed by index). Two calling conventions: ``(hidden_states, index, weights)`` (Mixtral,
    Qwen3-MoE, DeepSeek-V3, gpt-oss), and Llama 4's ``(hidden_states)`` with one row block per expert,
    zero for an expert no token is routed to (its forward then computes every expert densely)."""
    saved: dict[str, Any] = {}

    def before(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        count = int(mod.num_experts)  # type: ignore[arg-type]
        saved.clear()
        saved["num_experts"] = count
        index = _routes(args, kwargs)
        if index is None:  # one row block per expert, routing weights applied: the blocks not all zero
            hidden = (args[0] if args else kwargs["hidden_states"]).view(count, -1, _width(args, kwargs))
            chosen = torch.nonzero(hidden.flatten(1).ne(0).any(1)).flatten().to("cpu")
            chosen = chosen if len(chosen) else torch.zeros(1, dtype=torch.long)
            saved["dense"] = (chosen, hidden.shape)
            rows = hidden.index_select(0, chosen.to(hidden.device)).reshape(-1, hidden.shape[-1])
            args, kwargs = ((rows, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": rows})
        else:
            routed = (index >= 0) & (index < count)  # transformers marks routes to skip with ids out of range
            chosen = torch.unique(index[routed].to("cpu"))
            renumber = torch.full((count + 1,), len(chosen), dtype=index.dtype)
            renumber[chosen] = torch.arange(len(chosen), dtype=index.dtype)
            args, kwargs = _with_routes(args, kwargs, renumber.to(index.device)[torch.where(routed, index, count)])
        for name, p in list(mod._parameters.items()):
            if p is None or (name not in source.names and (p.is_meta or p.dim() == 0 or p.shape[0] != count)):
                continue  # not indexed by expert
            saved[name] = p
            narrowed = source.fetch(name, chosen) if name in source.names else p.index_select(0, chosen.to(p.device))
            mod._parameters[name] = nn.Parameter(narrowed, requires_grad=False)
        source.fetched += len(chosen)
        setattr(mod, "num_experts", len(chosen))  # noqa: B010 (an attribute of the model's class)
        return args, kwargs

    def after(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        setattr(mod, "num_experts", saved.pop("num_experts", mod.num_experts))  # noqa: B010
        dense = saved.pop("dense", None)
        for name, p in saved.items():
            mod._parameters[name] = p
        saved.clear()
        if dense is not None and isinstance(output, torch.Tensor):  # every expert's row block again
            chosen, shape = dense
            full = output.new_zeros(shape[0], shape[1], output.shape[-1])
            full[chosen.to(output.device)] = output.view(len(chosen), shape[1], -1)
            return full.view(-1, output.shape[-1])
        return output

    return [
        module.register_forward_pre_hook(before, with_kwargs=True),
        module.register_forward_hook(after, with_kwargs=True, always_call=True),
    ]


def dense(module: nn.Module) -> bool:
    """True for an experts module called with the hidden states alone, one row block per expert (Llama 4):
    without :func:`attach` its forward computes every expert, routed to or not."""
    import inspect

    try:
        params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
    except (TypeError, ValueError):
        return False
    return len(params) == 1


def _width(args: tuple, kwargs: dict) -> int:
    return int((args[0] if args else kwargs["hidden_states"]).shape[-1])


def _routes(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The expert index tensor of an experts forward ``(hidden_states, index, weights)``, by keyword or
    position; None for a forward given the hidden states alone."""
    for name in _INDEX_NAMES:
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    if len(args) > 1 and isinstance(args[1], torch.Tensor) and not args[1].is_floating_point():
        return args[1]
    return None


def _with_routes(args: tuple, kwargs: dict, index: torch.Tensor) -> tuple[tuple, dict]:
    for name in _INDEX_NAMES:
        if isinstance(kwargs.get(name), torch.Tensor):
            return args, {**kwargs, name: index}
    return (args[0], index, *args[2:]), kwargs


def dequantizes(converter: Any) -> bool:
    """True for a weight converter that unpacks a quantized format on load (transformers' ``Mxfp4Dequantize``,
    ``Fp8Dequantize``, ...: what it does without the format's kernels)."""
    return any(type(op).__name__.endswith("Dequantize") for op in getattr(converter, "operations", ()))


def kept_keys(ckpt: Checkpoint, experts: Collection[str]) -> list[str]:
    """The model keys of ``ckpt`` that the experts modules at ``experts`` keep as stored: those transformers
    would unpack from a quantized format while loading (MXFP4, FP8)."""
    return [k for k, m in ckpt.merged.items() if k.rpartition(".")[0] in experts and dequantizes(m.converter)]


def keep(ckpt: Checkpoint, keys: list[str]) -> tuple[dict[str, Source], int]:
    """The quantized weights at ``keys`` (:func:`kept_keys`) read as stored: (experts module path -> its source,
    bytes read). MXFP4 as :class:`Packed`; others (FP8's weights with their block scales) as :class:`Stored`,
    built per forward by transformers' own converter. The model's dense parameters for them stay on meta."""
    read = ckpt._part_reader()
    out: dict[str, Source] = {}
    done = 0
    for key in keys:
        path, _, name = key.rpartition(".")
        merge = ckpt.merged[key]
        if converts_mxfp4(merge.converter):
            parts = {pattern: read(names[0]) for pattern, names in merge.sources}
            blocks = next(t for p, t in parts.items() if p.endswith("_blocks")).contiguous()
            scales = next(t for p, t in parts.items() if p.endswith("_scales")).contiguous()
            packed = out.setdefault(path, Packed({}, ckpt.dtypes[key]))
            assert isinstance(packed, Packed)
            packed.weights[name] = (blocks, scales)
            done += blocks.nbytes + scales.nbytes
            continue
        stored = out.setdefault(path, Stored(ckpt, {}, held={}))
        assert isinstance(stored, Stored)
        stored.keys[name] = key
        for _, names in merge.sources:
            for n in names:
                stored.held[n] = read(n)
                done += stored.held[n].nbytes
    return out, done


def from_disk(model: nn.Module, ckpt: Checkpoint, experts: Collection[str]) -> tuple[dict[str, FromDisk], list[str]]:
    """For each experts module path in ``experts``, a :class:`FromDisk` over its expert-indexed parameters;
    and the model keys they read (left on meta by the loader)."""
    out: dict[str, FromDisk] = {}
    keys: list[str] = []
    for path in experts:
        module = model.get_submodule(path)
        count = int(getattr(module, "num_experts", 0) or 0)
        mine = {
            n: f"{path}.{n}"
            for n, p in module.named_parameters(recurse=False)
            if p.dim() > 0 and p.shape[0] == count and (f"{path}.{n}" in ckpt.where or f"{path}.{n}" in ckpt.merged)
        }
        if not mine:
            raise BadInput(
                f"the plan puts {path} on {DISK_COMPUTE}, which is for a MoE experts module holding every expert's "
                f"weights in tensors indexed by expert (transformers' fused experts); {type(module).__name__} is "
                f"not one: put it on 'disk' or 'cpu', or re-plan with fitmap plan"
            )
        out[path] = FromDisk(ckpt, mine)
        keys += mine.values()
    return out, keys


def sources(
    model: nn.Module, ckpt: Checkpoint, device_map: Mapping[str, int | str]
) -> tuple[dict[str, Source], list[str], int]:
    """The experts modules a plan computes per routed expert: MXFP4 ones in RAM (``cpu-compute``, read packed
    now) and those left on disk (``disk-compute``). Returns (module path -> its source, the model keys the
    loader leaves on meta for them, bytes read now)."""
    in_ram = {n for n, v in device_map.items() if v == CPU_COMPUTE}
    kept = kept_keys(ckpt, in_ram)
    packs, nbytes = keep(ckpt, kept)
    readers, left = from_disk(model, ckpt, [n for n, v in device_map.items() if v == DISK_COMPUTE])
    resident: dict[str, Source] = {  # Llama 4's experts in RAM: only the routed ones read, not all computed
        n: Resident() for n in in_ram if n not in packs and dense(model.get_submodule(n))
    }
    return {**resident, **packs, **readers}, kept + left, nbytes
