"""MXFP4 unpacked on the CPU: value for value what transformers' own conversion gives, in the layout it gives."""

from __future__ import annotations

import pytest
import torch

from fitmap.model import mxfp4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unpack_equals_transformers_conversion(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 24, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (3, 24, 2), dtype=torch.uint8, generator=g)
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    got = mxfp4.unpack(blocks, scales, dtype)
    assert got.shape == want.shape == (3, 64, 24) and got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(mxfp4.unpack(blocks[1:2], scales[1:2], dtype), want[1:2])  # one expert alone


def test_the_unpacking_operation_is_recognised_in_transformers_converters():
    from transformers.integrations.mxfp4 import Mxfp4Dequantize

    class Converter:
        operations = [Mxfp4Dequantize(None)]

    assert mxfp4.converts_mxfp4(Converter())
    assert not mxfp4.converts_mxfp4(object())
