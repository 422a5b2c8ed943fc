"""Buffers no checkpoint carries (rotary ``inv_freq``, embedding scales, remote code's tables made
in ``__init__``): kept as ``__init__`` computed them, or computed by the model's own
``_init_weights`` on their device; and the proof after a load that no tensor is left on ``meta``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fitmap.errors import MissingWeights
from fitmap.model import compat
from fitmap.runtime.checkpoint import Checkpoint, named_tensors
from fitmap.sizes import GiB

PROGRESS_MIN_BYTES = GiB // 4  # smaller loads take well under a second: no bar
MAX_READERS = 4  # shards read at once


# --------------------------------------------------------------------------- buffers
def compute_buffers(model: nn.Module, ckpt: Checkpoint, targets: Mapping[str, torch.device | None]) -> None:
    """Buffers the checkpoint does not carry: the values the model's ``__init__`` computed
    (kept by ``empty_weights``), else computed by its ``_init_weights`` on their device."""
    owners: dict[str, list[str]] = {}
    for key, b in list(model.named_buffers(remove_duplicate=False)):
        if key in targets and targets[key] is None and key not in ckpt.where:
            continue  # a unit another process runs (see load_targets): it computes its own
        if b.is_meta and key not in ckpt.where:
            path, _, attr = key.rpartition(".")
            module = model.get_submodule(path)
            computed = module.__dict__.get("_fitmap_init_buffers", {}).get(attr)
            if computed is not None and computed.shape == b.shape:
                module._buffers[attr] = computed.to(targets[key] or "cpu")
                continue
            module._buffers[attr] = _sentinel_like(b, targets[key])
            owners.setdefault(path, []).append(key)
    for module in model.modules():
        module.__dict__.pop("_fitmap_init_buffers", None)
    for path in owners:
        _init_module(model, path)
    not_computed = [k for keys in owners.values() for k in keys if _still_sentinel(model.get_buffer(k))]
    if not_computed:
        raise MissingWeights(
            f"{len(not_computed)} buffer(s) are neither in the checkpoint nor computed by the "
            f"model's _init_weights: {', '.join(not_computed[:8])}; this model class is not "
            "supported by fitmap load yet"
        )


def _sentinel_like(b: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    if b.is_floating_point():
        return torch.full(b.shape, float("nan"), dtype=b.dtype, device=device)
    if b.dtype == torch.bool:
        return torch.zeros(b.shape, dtype=b.dtype, device=device)
    return torch.full(b.shape, torch.iinfo(b.dtype).min, dtype=b.dtype, device=device)


def _still_sentinel(b: torch.Tensor) -> bool:
    if b.numel() == 0 or b.dtype == torch.bool:
        return False
    if b.is_floating_point():
        return bool(torch.isnan(b).all())
    return bool((b == torch.iinfo(b.dtype).min).all())


def _init_module(model: nn.Module, path: str) -> None:
    """Run the nearest PreTrainedModel's ``_init_weights`` on one module; its loaded tensors
    keep their values (flagged for transformers 5's guard, and restored afterwards on any version)."""
    from transformers import PreTrainedModel

    owner = model.get_submodule(path)
    parts = path.split(".")
    prefixes = (".".join(parts[:i]) for i in range(len(parts), -1, -1))
    pretrained = next((m for m in map(model.get_submodule, prefixes) if isinstance(m, PreTrainedModel)), None)
    if pretrained is None:
        return
    loaded = list(owner.parameters(recurse=False)) + [b for b in owner.buffers(recurse=False) if not _still_sentinel(b)]
    kept = [(t, t.detach().clone()) for t in loaded if not t.is_meta]
    for t in loaded:
        # transformers' init functions skip these: loaded weights stay
        t._is_hf_initialized = True  # type: ignore[union-attr]  # transformers' own marker on the tensor
    with torch.no_grad(), compat.init_guard():
        pretrained._init_weights(owner)
        for t, value in kept:
            t.copy_(value)


def check_materialized(model: nn.Module, targets: Mapping[str, torch.device | None]) -> None:
    """No parameter or buffer may remain on ``meta``, except disk units' streamed weights."""
    left = [n for n, t in named_tensors(model) if t.is_meta and targets[n] is not None]
    if left:
        raise MissingWeights(
            f"{len(left)} tensor(s) have no data after loading: {', '.join(left[:8])}; "
            "the checkpoint does not provide them. Re-download it, or report this model to fitmap"
        )
