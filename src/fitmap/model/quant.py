"""Quantized weights: checkpoints saved quantized, and quantization while loading.

Both go through transformers' own quantizers (``transformers.quantizers``), the ones
``from_pretrained`` uses: the quantizer replaces the model's ``Linear`` modules on
``meta`` before any weight is read (:func:`prepare`), and its operations turn the
checkpoint's tensors into the quantized parameters while fitmap streams them:

* a checkpoint saved quantized (``quantization_config`` in its config.json, e.g.
  bitsandbytes 4-bit: ``weight`` plus ``weight.absmax``, ``weight.quant_map`` and
  ``weight.quant_state.*``): the quantizer's conversions (``serialized_names`` and its
  ``deserialize`` operation) join with the model's own in :mod:`fitmap.model.keys`, so the
  loader builds each quantized weight from its parts exactly as a merge of per-expert
  tensors is built;
* ``--quantize nf4|int8`` on a full-precision checkpoint: each weight is read at the
  planned dtype, moved to its device and quantized there one tensor at a time by the
  quantizer's ``quantize`` operation (no full-precision copy of the model anywhere).

The plan sizes weights quantized while loading by :func:`planned_bytes` (packed data and
scales); a pre-quantized checkpoint's header bytes are exact already, and with no headers (a
catalog entry, a config alone) :func:`released_bytes` gives the released layout's. Quantized
weights stay resident: transformers does not
offload them either (bitsandbytes' ``llm_int8_enable_fp32_cpu_offload`` keeps offloaded
modules unquantized), so a plan that streams a quantized unit is refused at load.
Needs transformers 5 (its conversion API) and the quantizer's library.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fitmap.errors import BadInput
from fitmap.model import mxfp4

# --quantize names -> transformers quantization configs (bitsandbytes: runs on CUDA and on the CPU)
METHODS = {
    "nf4": "bitsandbytes 4-bit NormalFloat, blocks of 64 with a float32 scale each",
    "int8": "bitsandbytes LLM.int8(): int8 weights with a float32 scale per output row",
}
BNB_4BIT_BLOCK = 64


def method_config(name: str, dtype: torch.dtype):
    """The transformers quantization config ``--quantize name`` stands for."""
    from transformers import BitsAndBytesConfig

    if name == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise BadInput(f"--quantize {name!r} is not known; use one of: {', '.join(METHODS)}")


def declared(config) -> dict | None:
    """The checkpoint's ``quantization_config`` (from config.json, or its text config's), as a dict.
    Raises :class:`BadInput` where it is not one transformers can read (a string, a list, no
    ``quant_method``) or names a method transformers has no quantizer for: planned as plain
    weights, such a checkpoint would be sized and loaded wrong."""
    q, where = getattr(config, "quantization_config", None), "quantization_config"
    if q is None:
        text = getattr(config, "text_config", None)
        q = getattr(text, "quantization_config", None) if text is not None else None
        where = "text_config.quantization_config"
    if q is None:
        return None
    return _readable(q if isinstance(q, dict) or not callable(getattr(q, "to_dict", None)) else q.to_dict(), where)


def check_config_json(d: Mapping) -> None:
    """config.json's ``quantization_config`` (and its text config's) as :func:`declared` takes it,
    checked before transformers parses the file: its config classes call ``.to_dict()`` on it and
    raise AttributeError for a string or a list."""
    if d.get("quantization_config") is not None:
        _readable(d["quantization_config"], "quantization_config")
    text = d.get("text_config")
    if isinstance(text, Mapping) and text.get("quantization_config") is not None:
        _readable(text["quantization_config"], "text_config.quantization_config")


_JSON_KINDS = {"str": "a string", "list": "an array", "int": "a number", "float": "a number", "bool": "a boolean"}


def _readable(q: object, where: str) -> dict:
    if not isinstance(q, dict):
        raise BadInput(
            f"config.json's {where} is {_JSON_KINDS.get(type(q).__name__, type(q).__name__)} ({_short(q)}), "
            "not an object; it should be a dict with quant_method (as transformers saves it), or absent "
            "for full-precision weights"
        )
    _check_method(q, where)
    return q


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def loadable_methods() -> list[str] | None:
    """The ``quant_method`` names transformers has a quantization config for (its own registry,
    ``AUTO_QUANTIZATION_CONFIG_MAPPING``; bitsandbytes' 4- and 8-bit entries as the one
    ``bitsandbytes`` a config.json names); None where this transformers has no registry."""
    try:
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
    except ImportError:
        return None
    return sorted(
        {"bitsandbytes" if k.startswith("bitsandbytes_") else str(k) for k in AUTO_QUANTIZATION_CONFIG_MAPPING}
    )


def _check_method(q: dict, where: str) -> None:
    """``q``'s method as transformers' ``AutoQuantizationConfig.from_dict`` resolves it."""
    if q.get("load_in_4bit") or q.get("load_in_8bit"):
        return  # bitsandbytes, whatever quant_method says (transformers' own rule)
    known = loadable_methods()
    method = q.get("quant_method")
    if method is None:
        raise BadInput(
            f"config.json's {where} has no quant_method; it should name how the weights were quantized"
            + (f" (one of: {', '.join(known)})" if known else "")
        )
    method = getattr(method, "value", method)  # a QuantizationMethod enum
    if known is not None and (not isinstance(method, str) or method not in known):
        import transformers

        raise BadInput(
            f"fitmap does not load quant_method {_short(method)} (it loads: {', '.join(known)}); transformers "
            f"{transformers.__version__} has no quantizer by that name: check {where} in config.json"
        )


def method_of(value: object) -> str | None:
    """``quantize`` as a transformers user passes it -> a key of :data:`METHODS` (or None): the
    strings, a ``transformers.BitsAndBytesConfig`` (``load_in_4bit`` with ``bnb_4bit_quant_type="nf4"``:
    "nf4"; ``load_in_8bit``: "int8") or a dict of its fields. Its compute dtype is the plan's
    dtype; a field fitmap would not honour (double quantization, skipped modules, ...) is refused."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in METHODS:
            raise BadInput(f"quantize must be one of {', '.join(METHODS)}, not {value!r}")
        return value
    from transformers import BitsAndBytesConfig

    choices = f"{', '.join(repr(m) for m in METHODS)}, a transformers.BitsAndBytesConfig or a dict of its fields"
    if isinstance(value, BitsAndBytesConfig):
        cfg = value
    elif isinstance(value, dict):
        fields = set(BitsAndBytesConfig().to_dict())
        unknown = sorted(str(k) for k in value if k not in fields)
        if unknown:
            raise BadInput(
                f"quantize got a dict with field(s) {', '.join(unknown)} that BitsAndBytesConfig does not "
                f"have; give {choices}"
            )
        given = {k: v for k, v in value.items() if not k.startswith("_") and k != "quant_method"}
        if getattr(value.get("quant_method"), "value", value.get("quant_method")) not in (None, "bitsandbytes"):
            raise BadInput(
                f"quantize: fitmap quantizes while loading with bitsandbytes only, not quant_method "
                f"{_short(value['quant_method'])}; give {choices}"
            )
        try:
            cfg = BitsAndBytesConfig(**given)
        except (TypeError, ValueError) as e:
            raise BadInput(f"quantize: {str(e).splitlines()[0][:200]}; give {choices}") from None
    else:
        raise BadInput(f"quantize must be {choices}, not {_short(value)} of type {type(value).__name__}")
    if cfg.load_in_4bit == cfg.load_in_8bit:
        raise BadInput("quantize: the BitsAndBytesConfig must set one of load_in_4bit=True (nf4) or load_in_8bit=True")
    method = "nf4" if cfg.load_in_4bit else "int8"
    if method == "nf4" and cfg.bnb_4bit_quant_type != "nf4":
        raise BadInput(
            f"quantize: fitmap quantizes 4-bit to nf4 only, not bnb_4bit_quant_type {cfg.bnb_4bit_quant_type!r} "
            "(BitsAndBytesConfig's default); set bnb_4bit_quant_type='nf4' or pass quantize='nf4'"
        )
    want = BitsAndBytesConfig(load_in_4bit=method == "nf4", load_in_8bit=method == "int8").to_dict()
    have = cfg.to_dict()
    ignored = {"quant_method", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type"}
    ignored |= {"llm_int8_threshold", "llm_int8_has_fp16_weight"} if method == "nf4" else set()
    ignored |= {k for k in want if k.startswith("bnb_4bit_")} if method == "int8" else set()
    other = [f"{k}={have[k]!r}" for k in want if k not in ignored and have.get(k) != want[k]]
    if other:
        raise BadInput(
            f"quantize: fitmap's {method} does not take {', '.join(other)}; drop it (fitmap quantizes as "
            f"--quantize {method}: {METHODS[method]})"
        )
    return method


def quantizer(config, requested: str | None, dtype: torch.dtype, purpose: str = "load"):
    """The transformers quantizer for this model: the checkpoint's own (pre-quantized), else the
    ``--quantize`` one, else None. Raises :class:`BadInput` with the fix when it cannot run here."""
    saved = declared(config)
    if saved is not None and requested:
        raise BadInput(
            f"this checkpoint is already quantized ({saved.get('quant_method')}); drop --quantize {requested}"
        )
    if saved is None and not requested:
        return None
    try:
        from transformers.quantizers import AutoHfQuantizer
    except ImportError:
        raise BadInput(
            "quantized weights need transformers 5 (its quantizers); pip install -U 'transformers>=5'"
        ) from None
    if not supported_here():
        raise BadInput(
            "quantized weights need transformers 5.x's weight conversions; pip install -U 'transformers>=5,<6'"
        )
    if saved is not None:
        qconfig, method = saved, saved.get("quant_method")
    else:
        assert requested  # neither saved nor requested returned None above
        qconfig, method = method_config(requested, dtype), requested
    try:
        q = AutoHfQuantizer.from_config(qconfig, pre_quantized=saved is not None)
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"fitmap cannot {purpose} {method} weights: {str(e).splitlines()[0][:200]}") from None
    except ImportError as e:  # GPTQ's quantizer needs optimum as it is built
        raise BadInput(f"{method} weights need a library this Python lacks: {str(e).splitlines()[0][:240]}") from None
    try:
        q.validate_environment(device_map=None, weights_only=True)
    except (ImportError, RuntimeError, ValueError) as e:
        raise BadInput(f"{method} weights need a library this Python lacks: {str(e).splitlines()[0][:240]}") from None
    return q


def supported_here() -> bool:
    try:
        from transformers.core_model_loading import WeightConverter  # noqa: F401
        from transformers.quantizers.base import HfQuantizer
    except ImportError:
        return False
    return hasattr(HfQuantizer, "update_weight_conversions")


def released(config):
    """The quantizer for a checkpoint's released layout, not validated against this machine: how a
    catalog entry or a config alone is sized (what transformers keeps where the format's kernels
    are installed: gpt-oss's MXFP4 on a GPU with Triton). None when transformers cannot build it."""
    saved = declared(config)
    if saved is None or not supported_here():
        return None
    try:
        from transformers.quantizers import AutoHfQuantizer

        return AutoHfQuantizer.from_config(saved, pre_quantized=True)
    except (ImportError, ValueError, KeyError, TypeError):
        return None


def released_bytes(model: nn.Module, config) -> dict[str, int]:
    """Parameter name -> bytes in the checkpoint's released quantized layout, for formats whose
    layout follows from the parameter's size alone (MXFP4: 4.25 bits a value), where building
    the quantized modules needs kernels this machine lacks. Which parameters: the quantizer's
    ``serialized_names`` (``gate_up_proj``, ``down_proj``) in modules transformers would convert
    (``modules_to_not_convert`` through its own ``should_convert_module``)."""
    saved = declared(config) or {}
    method = saved.get("quant_method")
    if method in ("gptq", "awq"):
        return _int_packed_bytes(model, saved)
    q = released(config)
    if q is None or method != "mxfp4":
        return {}
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = list(saved.get("modules_to_not_convert") or [])
    out = {}
    for name, p in model.named_parameters():
        path, _, attr = name.rpartition(".")
        if attr in q.serialized_names and should_convert_module(path, skip):
            out[name] = p.numel() // 2 + -(-p.numel() // mxfp4.BLOCK)
    return out


def _int_packed_bytes(model: nn.Module, saved: dict) -> dict[str, int]:
    """GPTQ and AWQ as their checkpoints store each quantized Linear: ``qweight`` (``bits`` a value,
    packed in int32), ``qzeros`` (``bits`` a zero point per group and output, packed in int32),
    ``scales`` (float16 per group and output) and, for GPTQ, ``g_idx`` (int32 per input). Every
    Linear but the output head and ``modules_to_not_convert`` is quantized."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    try:
        bits = int(saved.get("bits") or saved.get("w_bit") or 4)
        group = int(saved.get("group_size") or saved.get("q_group_size") or 128)
    except (TypeError, ValueError):
        raise BadInput(
            f"config.json's quantization_config has bits {_short(saved.get('bits') or saved.get('w_bit'))} and "
            f"group size {_short(saved.get('group_size') or saved.get('q_group_size'))}: both should be integers"
        ) from None
    skip = list(saved.get("modules_to_not_convert") or []) + ["lm_head"]
    out = {}
    for path, module in model.named_modules():
        if type(module) is not nn.Linear or not should_convert_module(path, skip):
            continue
        n_in, n_out = module.in_features, module.out_features
        groups = -(-n_in // group) if group > 0 else 1
        nbytes = n_in * n_out * bits // 8 + groups * n_out * bits // 8 + groups * n_out * 2
        if saved.get("quant_method") == "gptq":
            nbytes += 4 * n_in
        out[f"{path}.weight"] = nbytes  # a bias is its own parameter, counted as such
    return out


def prepare(model: nn.Module, q, dtype: torch.dtype, keep_format: bool = False) -> nn.Module:
    """Replace ``model``'s quantizable modules (on meta) as ``from_pretrained`` does, and remember
    the quantizer on the model (:mod:`fitmap.model.keys` and the loader read it from there).
    ``keep_format``: as on a machine with the format's kernels (transformers' ``use_kernels``), so
    MXFP4 stays packed instead of being unpacked for the CPU."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = logging.getLogger("transformers").level
        logging.getLogger("transformers").setLevel(logging.ERROR)
        _tied_keys_for_quantizer(model)
        try:
            q.preprocess_model(
                model=model, dtype=dtype, device_map=None, checkpoint_files=None, use_kernels=keep_format
            )
        finally:
            logging.getLogger("transformers").setLevel(quiet)
    model.__dict__["_fitmap_quantizer"] = q
    return model


def _tied_keys_for_quantizer(model: nn.Module) -> None:
    """transformers 5's quantizers read ``model.all_tied_weights_keys``, which its ``post_init``
    sets; remote code written for 4.x (InternVL's chat model) never calls it, and planning
    ``--quantize`` for it raised AttributeError. Given from the model's own tied parameters."""
    if "all_tied_weights_keys" in model.__dict__ or hasattr(type(model), "all_tied_weights_keys"):
        return
    from fitmap.model.modules import tied_parameters

    model.__dict__["all_tied_weights_keys"] = {n: names[0] for names in tied_parameters(model) for n in names[1:]}


def of(model: nn.Module):
    """The quantizer :func:`prepare` put on ``model`` (None: full precision)."""
    return model.__dict__.get("_fitmap_quantizer")


def dequantizes(model: nn.Module) -> bool:
    """True when the checkpoint's quantizer unpacks its weights to the model's dtype while loading
    (transformers' choice on this machine: gpt-oss's MXFP4 without Triton and its kernels)."""
    q = of(model)
    return q is not None and q.pre_quantized and bool(getattr(q.quantization_config, "dequantize", False))


def quantizes(model: nn.Module, key: str) -> bool:
    """True when ``key`` is read at full precision and quantized while loading (``--quantize``)."""
    q = of(model)
    return q is not None and not q.pre_quantized and q.param_needs_quantization(model, key)


def quantize(model: nn.Module, key: str, t: torch.Tensor) -> dict[str, Any]:
    """The quantized parameter(s) for full-precision weight ``t`` (already on its device)."""
    op = of(model).get_quantize_ops()
    return op.convert({key: [t]}, model=model, full_layer_name=key, missing_keys=set())


def planned_bytes(model: nn.Module, name: str, dtype: torch.dtype) -> dict[str, int]:
    """Weight name -> bytes once quantized by ``--quantize name``, for every weight the quantizer
    will replace: chosen by transformers' own rules (the quantizer's modules not to convert and
    ``should_convert_module``), so planning needs neither bitsandbytes nor a GPU.

    bitsandbytes 4-bit keeps two values a byte, a float32 scale per 64 values and a 16-entry
    float32 code map; LLM.int8() one byte a value and a float32 scale per output row.
    """
    if not supported_here():
        raise BadInput(f"--quantize {name} needs transformers 5.x's quantizers; pip install -U 'transformers>=5,<6'")
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers import AutoHfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    q = AutoHfQuantizer.from_config(method_config(name, dtype), pre_quantized=False)
    _tied_keys_for_quantizer(model)
    skip = q.get_modules_to_not_convert(
        model, q.quantization_config.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None)
    )
    four_bit = bool(q.quantization_config.load_in_4bit)
    out = {}
    for path, module in model.named_modules():
        if not (type(module) is nn.Linear or isinstance(module, Conv1D)) or not should_convert_module(path, skip):
            continue
        values = module.weight.numel()
        rows = module.weight.shape[0] if type(module) is nn.Linear else module.weight.shape[1]
        if four_bit:
            out[f"{path}.weight"] = -(-values // 2) + 4 * -(-values // BNB_4BIT_BLOCK) + 16 * 4
        else:
            out[f"{path}.weight"] = values + 4 * rows
    return out


def is_quantized_tensor(t: torch.Tensor) -> bool:
    """A parameter whose data alone is not the weight (it carries quantization state)."""
    return (
        getattr(t, "quant_state", None) is not None
        or getattr(t, "SCB", None) is not None
        or type(t).__module__.startswith("bitsandbytes")
    )
