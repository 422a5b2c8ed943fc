"""The checkpoint as the loader reads it: where each model tensor lives (file, key, bytes, dtype),
the tensors transformers' own conversion merges or splits, and reading them in place (views of the
mmap'd page cache where the dtype matches, casts through a bounded window where it does not)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fitmap.errors import CheckpointError, MissingWeights
from fitmap.model import quant
from fitmap.model.inventory import Inventory, TensorInfo
from fitmap.model.keys import Merge, key_mapper, merges, quantized_keys
from fitmap.model.skeleton import tied_parameters
from fitmap.runtime import offload

PAGE = 4096


CAST_WINDOW = 128 << 20  # bytes cast through one mapping before the file is reopened (RSS bound)


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


# --------------------------------------------------------------------------- checkpoint
@dataclass(frozen=True)
class Checkpoint:
    """Where each model tensor lives in the checkpoint files, and how to read it."""

    directory: Path
    format: str  # "safetensors" | "bin"
    where: Mapping[str, tuple[str, str]]  # model key -> (file name, checkpoint key)
    nbytes: Mapping[str, int]  # model key -> bytes on disk
    dtypes: Mapping[str, torch.dtype]  # model key -> dtype the model built it with (floats cast to it)
    converted: tuple[str, ...] = ()  # checkpoint keys that need a merge/split fitmap does not do
    infos: Mapping[str, TensorInfo] = field(default_factory=dict)  # model key -> checkpoint tensor
    unexpected: tuple[str, ...] = ()  # checkpoint keys that belong to no part of the model
    merged: Mapping[str, Merge] = field(default_factory=dict)  # model key -> checkpoint tensors it is built from
    files: Mapping[str, str] = field(default_factory=dict)  # checkpoint key -> file (for merged sources)
    parts: Mapping[str, TensorInfo] = field(default_factory=dict)  # checkpoint key -> tensor (merged sources)

    @classmethod
    def index(cls, inv: Inventory, model: nn.Module, dtype: torch.dtype | None = None) -> Checkpoint:
        """``dtype``: what weights quantized while loading are read at (the plan's)."""
        names, converted = checkpoint_names(model, list(inv.tensors))
        _check_shapes(model, inv, names)
        built = {k: t.dtype for k, t in named_tensors(model)}
        if dtype is not None:
            built |= {k: dtype for k in names if quant.quantizes(model, k)}
        merged = {k: m for k, m in merges(model, list(converted)).items() if k not in names} if converted else {}
        from_merges = {c for m in merged.values() for _, keys in m.sources for c in keys}
        assert inv.path is not None  # a checkpoint on disk: the loader turns path-less inventories away
        return cls(
            inv.path,
            inv.weight_format,
            where={k: (inv.tensors[c].file, c) for k, c in names.items()},
            nbytes={k: inv.tensors[c].nbytes for k, c in names.items()}
            | {k: sum(inv.tensors[c].nbytes for _, keys in m.sources for c in keys) for k, m in merged.items()},
            dtypes={k: built[k] for k in list(names) + list(merged)},
            converted=tuple(c for c in converted if c not in from_merges),
            infos={k: inv.tensors[c] for k, c in names.items()},
            unexpected=_unexpected(model, inv, names, converted),
            merged=merged,
            files={c: inv.tensors[c].file for c in from_merges},
            parts={c: inv.tensors[c] for c in from_merges},
        )

    def files_of(self, keys) -> tuple[tuple[str, ...], int]:
        """The files model tensors ``keys`` are read from, and the bytes read for them."""
        files: set[str] = set()
        nbytes = 0
        for key in keys:
            if key in self.where:
                files.add(self.where[key][0])
            elif key in self.merged:
                files |= {self.files[c] for _, cs in self.merged[key].sources for c in cs if c in self.files}
            nbytes += self.nbytes.get(key, 0)
        return tuple(sorted(files)), nbytes

    def check_complete(self, model: nn.Module) -> None:
        """Every parameter (and persistent buffer we cannot compute) must be in the checkpoint, and
        every checkpoint tensor must belong to the model (else config.json and the weights disagree)."""
        if self.unexpected:
            raise CheckpointError(
                f"{len(self.unexpected)} tensor(s) in {self.directory} belong to no part of {type(model).__name__} "
                f"(e.g. {', '.join(self.unexpected[:3])}): config.json and the weights disagree. Check "
                "num_hidden_layers and the other sizes in config.json against the checkpoint, or re-download it"
            )
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        missing = sorted(n for n in params if n not in self.where and n not in self.merged)
        if not missing:
            return
        hint = ""
        if self.converted:
            hint = (
                f" The checkpoint stores {len(self.converted)} of them in another layout, e.g. "
                f"{', '.join(self.converted[:2])}: transformers merges these on load, a conversion fitmap "
                "does not do yet; load this model with transformers (device_map=plan.device_map)"
            )
        raise MissingWeights(
            f"{len(missing)} weight(s) of {type(model).__name__} are not in {self.directory}: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}.{hint or ' Re-download the checkpoint'}"
        )

    def read(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(model key, CPU tensor at the built dtype) for ``keys``, one file open at a time.

        Same-dtype floating tensors are mmap views with their pages already read
        in (no second copy). Cast tensors are copies; the file is reopened every
        ``CAST_WINDOW`` bytes so the pages read for them leave this process's RSS.
        """
        by_file: dict[str, list[str]] = {}
        for k in keys:
            if k in self.merged:  # built from its parts (per expert), by transformers' converter
                yield k, self.merged[k].build(self._part_reader()).to(self.dtypes[k]).contiguous()
                continue
            by_file.setdefault(self.where[k][0], []).append(k)
        for file, ks in by_file.items():
            get, copied = self._opened(file), 0
            for k in ks:
                t = get(self.where[k][1])
                if _keeps_view(t, self.dtypes[k]):
                    yield k, _touched(t)
                    continue
                copied += t.nbytes
                yield k, t.to(self.dtypes[k]) if t.is_floating_point() else t.clone()
                if copied >= CAST_WINDOW:
                    get, copied = self._opened(file), 0

    def _part_reader(self) -> Callable[[str], torch.Tensor]:
        """Checkpoint key -> tensor, for the parts of merged tensors (files opened once per call site)."""
        getters: dict[str, Callable[[str], torch.Tensor]] = {}

        def read(key: str) -> torch.Tensor:
            file = self.files[key]
            if file not in getters:
                getters[file] = self._opened(file)
            return getters[file](key)

        return read

    def reader(self, keys: Mapping[str, str]) -> Callable[[], offload.Weights]:
        """A disk unit's reader: {relative key: tensor} from {relative key: model key}."""

        def read() -> offload.Weights:
            got = dict(self.read(list(dict.fromkeys(keys.values()))))
            return {rel: got[k] for rel, k in keys.items()}

        return read

    def rows(self, file: str, name: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` (along the first dimension) of checkpoint tensor ``name`` in ``file``, stacked, reading
        only those from a safetensors file (a MoE layer's routed experts out of its fused tensor)."""
        path = self.directory / file
        try:
            if self.format == "safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt", device="cpu") as f:
                    whole = f.get_slice(name)
                    return torch.stack([whole[r] for r in rows]) if rows else whole[0:0]
        except Exception as e:  # safetensors and OS errors alike: the file is the problem
            raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}; re-download the file") from None
        return self._opened(file)(name)[rows]

    def _opened(self, file: str) -> Callable[[str], torch.Tensor]:
        """A getter of tensors from mmap'd ``file``; the mapping lives as long as its tensors."""
        path = self.directory / file
        try:
            if self.format == "safetensors":
                from safetensors import safe_open

                raw = safe_open(str(path), framework="pt", device="cpu").get_tensor
            else:
                raw = torch.load(path, map_location="cpu", mmap=True, weights_only=True).__getitem__
        except Exception as e:  # safetensors, pickle and OS errors alike: the file is the problem
            raise CheckpointError(f"cannot open {path}: {e}; the file is missing or corrupt, re-download it") from None

        def get(name: str) -> torch.Tensor:
            try:
                return raw(name)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}; re-download the file") from None

        return get


def _keeps_view(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Weights already at their dtype stay mmap views; small non-float buffers are copied,
    so they do not keep a whole shard's mapping alive."""
    return t.is_floating_point() and t.dtype == dtype


def _touched(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its mmap'd pages read now, on this thread, not in the first forward."""
    if t.numel():
        flat = t.reshape(-1).view(torch.uint8)
        flat[::PAGE].sum()
        flat[-1:].sum()
    return t


def checkpoint_names(model: nn.Module, ckpt_keys: list[str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """(model key -> checkpoint key, checkpoint keys that need a merge/split conversion).

    Names match as stored or through transformers' own renaming for this model
    (:func:`fitmap.model.keys.key_mapper`; e.g. Qwen2-VL's ``model.layers`` ->
    ``model.language_model.layers``). Converted tensors (Mixtral's per-expert
    ``w1/w3`` fused into ``gate_up_proj``) are not loaded.
    """
    expected = {n for n, _ in named_tensors(model)}
    mapped = key_mapper(model)
    quantized = quantized_keys(model)
    out: dict[str, str] = {}
    converted = []
    for c in ckpt_keys:
        k, conversion = (c, False) if c in expected and c not in quantized else mapped(c)
        if conversion:
            converted.append(c)
        elif k in expected:
            out.setdefault(k, c)
    if quant.dequantizes(model):  # a weight stored with companions (FP8's weight_scale_inv): built from them all
        targets = {mapped(c)[0] for c in converted}
        converted += [out.pop(k) for k in list(out) if k in targets]
    for group in tied_parameters(model):  # a tied copy is stored once, under any of its names
        stored = next((out[n] for n in group if n in out), None)
        if stored is not None:
            out.update({n: stored for n in group})
    return out, tuple(converted)


def _unexpected(
    model: nn.Module, inv: Inventory, names: Mapping[str, str], converted: tuple[str, ...]
) -> tuple[str, ...]:
    """Checkpoint keys no model tensor takes, less those the model class says to ignore
    (``_keys_to_ignore_on_load_unexpected``, e.g. DeepSeek-V3's multi-token-prediction layer)
    and rotary ``inv_freq`` buffers older checkpoints carry."""
    import re

    used = set(names.values()) | set(converted)
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    return tuple(
        sorted(
            k
            for k in inv.tensors
            if k not in used and not k.endswith("rotary_emb.inv_freq") and not any(p.search(k) for p in ignore)
        )
    )


def _check_shapes(model: nn.Module, inv: Inventory, names: Mapping[str, str]) -> None:
    tensors = dict(named_tensors(model))
    wrong = [
        f"{k}: model {list(tensors[k].shape)}, checkpoint {list(inv.tensors[c].shape)}"
        for k, c in names.items()
        if tuple(tensors[k].shape) != tuple(inv.tensors[c].shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{len(wrong)} tensor(s) in {inv.path} do not match config.json, e.g. "
            + "; ".join(wrong[:3])
            + ". Use the config.json that came with these weights"
        )
