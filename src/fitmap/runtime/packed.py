"""MXFP4 experts computed packed on the CPU: RAM holds the checkpoint's bytes, a token unpacks only the
experts it is routed to.

gpt-oss is released with its routed experts in MXFP4: per weight row, 32-value blocks of 4-bit e2m1 codes
(``*_blocks``, two a byte) and one power-of-two exponent a block (``*_scales``, uint8, bias 127). Without
the format's GPU kernels transformers unpacks every expert to bf16 while loading, which makes
gpt-oss-120b's 57 GiB of experts 217 GiB. For an experts module the plan computes on the CPU
(``cpu-compute``), the loader keeps the packed bytes instead (:func:`keep`), and at each forward
:class:`Packed` unpacks the experts the batch's tokens are routed to, into compact tensors the module's
own forward runs with (its experts renumbered 0..k-1): the model's code, activation and weighting stay
transformers'. Unpacking is a table look-up per byte (two values at once) and a power-of-two scale per
block, equal to transformers' ``convert_moe_packed_tensors`` value for value.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fitmap.model.mxfp4 import converts_mxfp4, unpack
from fitmap.runtime.checkpoint import Checkpoint

_INDEX_NAMES = ("top_k_index", "router_indices", "selected_experts")


@dataclass
class Packed:
    """An experts module's packed weights: parameter name -> (blocks, scales), and the dtype they unpack
    to. Hooked on the module (:meth:`attach`): before each forward the routed experts are unpacked and
    the module's expert-indexed tensors narrowed to them; after it, everything is put back."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dtype: torch.dtype
    unpacked: int = 0  # experts unpacked so far (for tests and reports)

    def attach(self, module: nn.Module) -> list[Any]:
        saved: dict[str, Any] = {}

        def before(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            count = int(mod.num_experts)  # type: ignore[arg-type]
            args, kwargs, index = _routes(args, kwargs)
            routed = (index >= 0) & (index < count)  # transformers marks routes to skip with ids out of range
            chosen = torch.unique(index[routed].to("cpu"))
            renumber = torch.full((count + 1,), len(chosen), dtype=index.dtype)
            renumber[chosen] = torch.arange(len(chosen), dtype=index.dtype)
            saved.clear()
            saved["num_experts"] = count
            for name, p in list(mod._parameters.items()):
                if p is None or (name not in self.weights and (p.is_meta or p.dim() == 0 or p.shape[0] != count)):
                    continue  # not indexed by expert
                saved[name] = p
                mod._parameters[name] = nn.Parameter(self._narrowed(name, p, chosen), requires_grad=False)
            self.unpacked += len(chosen)
            setattr(mod, "num_experts", len(chosen))  # noqa: B010 (an attribute of the model's class)
            renamed = renumber.to(index.device)[torch.where(routed, index, count)]
            return _with_routes(args, kwargs, renamed)

        def after(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            setattr(mod, "num_experts", saved.pop("num_experts", mod.num_experts))  # noqa: B010
            for name, p in saved.items():
                mod._parameters[name] = p
            saved.clear()
            return output

        return [
            module.register_forward_pre_hook(before, with_kwargs=True),
            module.register_forward_hook(after, with_kwargs=True, always_call=True),
        ]

    def _narrowed(self, name: str, p: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        if name not in self.weights:
            return p.index_select(0, chosen.to(p.device))
        blocks, scales = self.weights[name]
        return unpack(blocks.index_select(0, chosen), scales.index_select(0, chosen), self.dtype)

    def nbytes(self) -> int:
        return sum(b.nbytes + s.nbytes for b, s in self.weights.values())


def _routes(args: tuple, kwargs: dict) -> tuple[tuple, dict, torch.Tensor]:
    """The expert index tensor of an experts forward ``(hidden_states, index, weights)``, by keyword or
    position."""
    for name in _INDEX_NAMES:
        if isinstance(kwargs.get(name), torch.Tensor):
            return args, kwargs, kwargs[name]
    if len(args) > 1 and isinstance(args[1], torch.Tensor) and not args[1].is_floating_point():
        return args, kwargs, args[1]
    raise TypeError("an experts module computed packed on the CPU was called without its routing indices")


def _with_routes(args: tuple, kwargs: dict, index: torch.Tensor) -> tuple[tuple, dict]:
    for name in _INDEX_NAMES:
        if isinstance(kwargs.get(name), torch.Tensor):
            return args, {**kwargs, name: index}
    return (args[0], index, *args[2:]), kwargs


def kept_keys(ckpt: Checkpoint, experts: Collection[str]) -> list[str]:
    """The model keys of ``ckpt`` that the experts modules at ``experts`` keep packed: those transformers
    would unpack from MXFP4 while loading."""
    return [k for k, m in ckpt.merged.items() if k.rpartition(".")[0] in experts and converts_mxfp4(m.converter)]


def keep(ckpt: Checkpoint, keys: list[str]) -> tuple[dict[str, Packed], int]:
    """The MXFP4 weights at ``keys`` (:func:`kept_keys`) read packed: (experts module path -> its
    :class:`Packed`, bytes read). The model's dense parameters for them stay on meta."""
    read = ckpt._part_reader()
    out: dict[str, Packed] = {}
    done = 0
    for key in keys:
        path, _, name = key.rpartition(".")
        parts = {pattern: read(names[0]) for pattern, names in ckpt.merged[key].sources}
        blocks = next(t for p, t in parts.items() if p.endswith("_blocks")).contiguous()
        scales = next(t for p, t in parts.items() if p.endswith("_scales")).contiguous()
        out.setdefault(path, Packed({}, ckpt.dtypes[key])).weights[name] = (blocks, scales)
        done += blocks.nbytes + scales.nbytes
    return out, done
