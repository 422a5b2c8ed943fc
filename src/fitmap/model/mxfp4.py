"""MXFP4, the format gpt-oss's routed experts are released in, as arithmetic: per weight row, 32-value
blocks of 4-bit e2m1 codes (``*_blocks``, two a byte) and one power-of-two exponent a block (``*_scales``,
uint8, bias 127): 4.25 bits a value.

:func:`unpack` turns blocks of some experts into values of a float dtype by a table look-up per byte (its
two values at once) and a power-of-two scale per block: equal, value for value, to transformers'
``convert_moe_packed_tensors`` (whose value table it uses), and several times faster on a CPU.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

BLOCK = 32  # values a block
PACKED_BYTES_PER_VALUE = 17 / 32  # half a byte a value, one exponent byte a block


def converts_mxfp4(converter: Any) -> bool:
    """True for transformers' MXFP4 unpacking operation (``Mxfp4Dequantize``) in a weight converter."""
    return any(type(op).__name__ == "Mxfp4Dequantize" for op in getattr(converter, "operations", ()))


@cache
def _tables(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte -> its two values, low nibble first, as one element of twice ``dtype``'s width; exponent
    byte -> 2**(e - 127) in ``dtype``), from transformers' own e2m1 value table."""
    from transformers.integrations.mxfp4 import FP4_VALUES

    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    byte = torch.arange(256)
    pair = torch.stack([lut[byte & 15], lut[byte >> 4]], dim=1).contiguous()
    wide = {2: torch.int32, 4: torch.int64}[dtype.itemsize]
    powers = torch.ldexp(torch.ones(256, dtype=torch.float64), torch.arange(256) - 127).to(dtype)
    return pair.view(wide).view(256), powers


def unpack(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 ``blocks`` (``[experts, rows, groups, 16]`` uint8) and ``scales`` (``[experts, rows, groups]``)
    as ``[experts, groups * 32, rows]`` values of ``dtype``: the layout transformers unpacks gpt-oss's
    experts to (a transposed view here, whose rows are contiguous: the fast side for a matrix product)."""
    pair, powers = _tables(dtype)
    experts, rows, groups, width = blocks.shape
    values = torch.index_select(pair, 0, blocks.reshape(-1).to(torch.int32)).view(dtype)
    values = values.view(experts, rows, groups, width * 2)
    values.mul_(torch.index_select(powers, 0, scales.reshape(-1).to(torch.int32)).view(experts, rows, groups, 1))
    return values.view(experts, rows, groups * width * 2).transpose(1, 2)
