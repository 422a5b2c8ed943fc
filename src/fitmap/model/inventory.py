"""Stage 1 — Inventory: what a model is made of, read from headers only.

MODEL is a local directory, a Hugging Face id found in the local cache (offline),
or a catalog name (full-size public configs, no weights). For checkpoints, tensor
names, dtypes, shapes and exact byte counts come from the safetensors headers
(8-byte little-endian length + JSON), so quantized and packed tensors count right;
no tensor data is read.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from fitmap.errors import BadInput, CheckpointError

# safetensors dtype tag -> bytes per element
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F4": 1,
    "F6_E2M3": 1,
    "F6_E3M2": 1,
}
FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}
TAG_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors tag: BF16, F32, F8_E4M3, I32 ...
    shape: tuple[int, ...]
    nbytes: int
    file: str  # file name inside the model directory
    offset: int = -1  # safetensors: byte offset of the data in the file (-1: not known)


@dataclass(frozen=True)
class Inventory:
    """Everything known about a model before building it."""

    name: str  # what the user typed
    source: str  # "directory" | "hf-cache" | "catalog" | "config" (no weights)
    config: Mapping  # config.json as a dict
    path: Path | None = None  # model directory (None for catalog)
    weight_format: str = "none"  # "safetensors" | "bin" | "none"
    tensors: Mapping[str, TensorInfo] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    task: str = "causal-lm"  # "causal-lm" | "image-text-to-text"
    catalog_dtype: str | None = None  # catalog: storage dtype of the weights
    fp8_linear: bool = False  # catalog: Linear weights stored as fp8

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def bytes_by_dtype(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for t in self.tensors.values():
            out[t.dtype] += t.nbytes
        return dict(out)

    def checkpoint_float_dtype(self) -> str | None:
        """The torch dtype name most float bytes are stored in (None when unknown)."""
        floats = {k: v for k, v in self.bytes_by_dtype().items() if k in FLOAT_TAGS}
        if not floats:
            return None
        return TAG_TO_TORCH[max(floats, key=floats.__getitem__)]


# --------------------------------------------------------------------------- resolution
def inventory(model: str | Path) -> Inventory:
    """Resolve MODEL (directory, cached HF id, catalog name) and read its headers."""
    text = str(model)
    if not text.strip():
        from fitmap.model.catalog_models import catalog_names

        raise BadInput(
            "the model is empty; give a model directory, a Hugging Face id in the local cache or a "
            f"catalog name ({', '.join(catalog_names()[:4])}, ...)"
        )
    path = Path(text).expanduser()
    if path.is_dir():
        return from_directory(path, text, "directory")
    if path.exists():
        raise BadInput(f"{text} is a file; MODEL must be a model directory, a cached Hugging Face id or a catalog name")
    cached = _hf_cache_dir(text)
    if cached is not None:
        return from_directory(cached, text, "hf-cache")
    from fitmap.model.catalog_models import catalog_entry  # raises with suggestions

    entry = catalog_entry(text)
    return Inventory(
        name=text,
        source="catalog",
        config=entry.config,
        task=entry.task,
        catalog_dtype=entry.weight_dtype,
        fp8_linear=entry.fp8_linear,
    )


def _hf_cache_dir(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (or not a valid id): fall through to the catalog
        return None


def from_directory(path: Path, name: str, source: str) -> Inventory:
    """A model directory; one with config.json and no weights at all (what a user has before
    downloading) is planned from the config's shapes, as a catalog entry is (``source`` "config")."""
    config = read_config(path)
    if not has_weights(path):
        return Inventory(name=name, source="config", config=config, path=path, task=guess_task(config))
    fmt, files, tensors = read_weights(path)
    return Inventory(
        name=name,
        source=source,
        config=config,
        path=path,
        weight_format=fmt,
        tensors=tensors,
        files=files,
        task=guess_task(config),
    )


def has_weights(path: Path) -> bool:
    """Any weight file (or index) at all in ``path``."""
    return any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists() or bool(_bin_files(path))


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} has no config.json; a model directory needs config.json and its weights")
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e}); restore it from the model's repository") from None
    if not isinstance(data, dict) or ("model_type" not in data and "AutoConfig" not in _auto_map(data)):
        raise CheckpointError(
            f"{cfg} has no 'model_type' (and no auto_map config class); it is not a transformers config"
        )
    return data


def _auto_map(data: dict) -> dict:
    """The config's ``auto_map`` (remote code: CogVLM's config has no ``model_type``, only this)."""
    auto = data.get("auto_map")
    return auto if isinstance(auto, dict) else {}


def guess_task(config: Mapping) -> str:
    """Vision-language models carry a ``vision_config``, or name an architecture transformers files
    under image-text-to-text (Emu3 and Chameleon keep an image tokenizer under ``vq_config``, Fuyu
    embeds patches in its decoder); everything else is a causal LM."""
    if "vision_config" in config:
        return "image-text-to-text"
    arch = config.get("architectures")
    return "image-text-to-text" if set(arch or ()) & _image_text_classes() else "causal-lm"


@lru_cache(maxsize=1)
def _image_text_classes() -> frozenset[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as names
    except ImportError:  # an older transformers: only vision_config says so
        return frozenset()
    return frozenset(c for v in names.values() for c in ([v] if isinstance(v, str) else v))


# --------------------------------------------------------------------------- weights
def read_weights(path: Path) -> tuple[str, tuple[str, ...], dict[str, TensorInfo]]:
    """(format, files, tensors) of the weights in ``path``; safetensors preferred."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        files = _shards_from_index(index)
    elif single.is_file():
        files = ("model.safetensors",)
    else:
        files = tuple(sorted(p.name for p in path.glob("*.safetensors")))  # a non-file is reported by name
    if files:
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            tensors.update(read_safetensors_header(path / f))
        return "safetensors", files, tensors
    bins = _bin_files(path)
    if bins:
        return "bin", bins, _read_bin(path, bins)
    raise CheckpointError(
        f"{path} has no weights: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin. Download the weights, or plan the architecture with a catalog name"
    )


def _shards_from_index(index: Path) -> tuple[str, ...]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and "\0" not in v for v in weight_map.values()
        ):
            raise TypeError  # a file name with a NUL byte names no file
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(
            f"{index} is not a valid index (needs a 'weight_map' of tensor name -> shard file name); re-download it"
        ) from None
    files = tuple(sorted(set(weight_map.values())))
    root = index.parent.resolve()
    outside = [f for f in files if not f or Path(f).is_absolute() or root not in (root / f).resolve().parents]
    if outside:
        raise CheckpointError(
            f"{index} names shard(s) outside {index.parent}: {', '.join(map(repr, outside[:3]))}; "
            "an index names files of its own directory: re-download it"
        )
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{index.name} names {len(missing)} shard(s) that are not in {index.parent}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; download the missing files"
        )
    return files


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one safetensors file, validated against the file's size."""
    if not file.is_file():
        what = (
            "a broken link (an interrupted download?)"
            if file.is_symlink()
            else ("a directory" if file.is_dir() else "missing")
        )
        raise CheckpointError(f"{file} is {what}, not a safetensors file; re-download it")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is truncated ({size} bytes): not a safetensors file; re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{file} is corrupt or truncated: its 8-byte length field says the header is {n} bytes, which "
                f"with the length field needs {8 + n} bytes, and the file has {size}; re-download it"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(
            f"{file} has an unreadable header (not JSON); the file is corrupt, re-download it"
        ) from None
    if not isinstance(header, dict):
        found = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
            type(header), "null"
        )
        raise CheckpointError(
            f"{file} has a header that is {found}, not a JSON object of tensor entries; the file "
            "is corrupt, re-download it"
        )
    header.pop("__metadata__", None)
    if not header:
        raise CheckpointError(f"{file} holds no tensors; the file is incomplete, re-download it")
    return {name: _tensor_info(file, name, spec, size - 8 - n, 8 + n) for name, spec in header.items()}


def _count(x: object) -> bool:
    """A JSON whole number that can be a size or an offset (bools are ints in Python)."""
    return type(x) is int and x >= 0


def _tensor_info(file: Path, name: str, spec: object, data_size: int, data_start: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]  # type: ignore[index]
        if not (isinstance(dtype, str) and all(_count(x) for x in shape + (begin, end))):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry; re-download the file") from None
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
    if end > data_size or begin > end:
        raise CheckpointError(
            f"{file} is truncated: tensor {name!r} ends at byte {end} of the data section, "
            f"which has {data_size} bytes; re-download the file"
        )
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPE_BYTES[dtype] != end - begin and dtype not in ("F4", "F6_E2M3", "F6_E3M2"):
        raise CheckpointError(
            f"{file}: tensor {name!r} has shape {list(shape)} {dtype} ({numel * DTYPE_BYTES[dtype]} bytes) "
            f"but {end - begin} bytes of data; the file is corrupt"
        )
    return TensorInfo(name, dtype, shape, end - begin, file.name, data_start + begin)


def _bin_files(path: Path) -> tuple[str, ...]:
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            return tuple(sorted(set(json.loads(index.read_text())["weight_map"].values())))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is not a valid index; re-download it") from None
    return ("pytorch_model.bin",) if (path / "pytorch_model.bin").is_file() else ()


_TORCH_TO_TAG = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def _read_bin(path: Path, files: tuple[str, ...]) -> dict[str, TensorInfo]:
    """Shapes and dtypes of a pickled checkpoint, mmap'd (pages are not read)."""
    import torch

    out: dict[str, TensorInfo] = {}
    for f in files:
        if not (path / f).is_file():
            raise CheckpointError(f"{path / f} is named in the index but missing; download it")
        try:
            sd = torch.load(path / f, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"{path / f} cannot be read as a PyTorch checkpoint ({type(e).__name__}); re-download it"
            ) from None
        for k, t in sd.items():
            tag = _TORCH_TO_TAG.get(str(t.dtype).removeprefix("torch."), "F32")
            out[k] = TensorInfo(k, tag, tuple(t.shape), t.numel() * t.element_size(), f)
    return out
