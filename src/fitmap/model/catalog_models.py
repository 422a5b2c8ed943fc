"""The built-in catalog: full-size public architectures, planned with no download.

Each model is a JSON file in the ``catalog/`` data folder holding the model's
public ``config.json`` values as published on the Hugging Face Hub (in the
transformers-native format, so no remote code is needed), and
``catalog/index.json`` says where it comes from, what it does, its public
parameter count and how its checkpoint stores weights. The files are read with
:mod:`importlib.resources`, so an installed package works the same as a
source tree. Nothing here touches the network.
"""

from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from fitmap.errors import BadInput
from fitmap.model.configs import IMAGE_PROCESSOR_ATTR

_FOLDER = "catalog"
_INDEX = "index.json"


@dataclass(frozen=True)
class CatalogEntry:
    """One catalog model.

    ``params_billion`` is the public parameter count in billions (1e9).
    ``weight_dtype`` is the checkpoint's storage dtype name (``"bfloat16"``,
    ``"float16"``; ``"float8_e4m3fn"`` when ``fp8_linear`` says the Linear weights
    are stored in FP8). ``config`` is the Hub ``config.json`` as a dict; each
    :func:`catalog_entry` call returns a fresh copy, so callers may change it.
    """

    name: str
    hf_id: str
    task: str
    params_billion: float
    weight_dtype: str
    fp8_linear: bool
    config: dict[str, Any]
    notes: str = ""
    image_processor: dict[str, Any] | None = None  # its preprocessor_config.json values that size images


@cache
def _read_json(filename: str) -> Any:
    """Parse one file of the catalog folder (cached; callers copy what they hand out)."""
    # One joinpath step at a time: a namespace package's MultiplexedPath takes one.
    path = resources.files("fitmap.model").joinpath(_FOLDER).joinpath(filename)
    return json.loads(path.read_text(encoding="utf-8"))


def _index() -> dict[str, dict[str, Any]]:
    return _read_json(_INDEX)


def catalog_names() -> list[str]:
    """All catalog model names, in catalog order."""
    return list(_index())


def is_catalog_name(name: str) -> bool:
    """True if ``name`` is exactly a catalog model name."""
    return name in _index()


def catalog_entry(name: str) -> CatalogEntry:
    """The catalog model called ``name``; :class:`BadInput` naming close matches if unknown."""
    meta = _index().get(name)
    if meta is None:
        raise BadInput(_unknown_name_message(name))
    return CatalogEntry(
        name=name,
        hf_id=meta["hf_id"],
        task=meta["task"],
        params_billion=float(meta["params_billion"]),
        weight_dtype=meta["weight_dtype"],
        fp8_linear=bool(meta["fp8_linear"]),
        config=copy.deepcopy(_read_json(f"{meta.get('config_from', name)}.json")),  # a release of the same shapes
        notes=meta.get("notes", ""),
        image_processor=copy.deepcopy(meta.get("image_processor")),
    )


def build_config(entry: CatalogEntry) -> PretrainedConfig:
    """The transformers config for the entry's ``model_type``, filled with its stored values.

    Works offline: the config is built from the stored dict, never fetched.
    """
    # Config classes may rewrite nested dicts in place (rope_scaling, vision_config).
    values = copy.deepcopy(entry.config)
    config = AutoConfig.for_model(**values)
    if entry.image_processor:
        setattr(config, IMAGE_PROCESSOR_ATTR, copy.deepcopy(entry.image_processor))
    return config


def _unknown_name_message(name: str) -> str:
    names = catalog_names()
    by_lower = {n.lower(): n for n in names}
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=3)]
    hint = f"; did you mean {_one_of(close)}?" if close else "."
    return (
        f"unknown model {name!r}: not a directory, not in the local Hugging Face cache, "
        f"and not a catalog name{hint} Catalog: {', '.join(names)}"
    )


def _one_of(options: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return " or ".join([", ".join(options[:-1]), options[-1]] if len(options) > 1 else options)
