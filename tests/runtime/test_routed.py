"""An experts module computed packed: the routed experts unpacked per forward give what the module gives with
every expert unpacked, and the module is left as it was."""

from __future__ import annotations

import torch
import transformers

from fitmap.model import mxfp4
from fitmap.runtime.routed import Packed, attach


def test_packed_experts_give_what_the_unpacked_module_gives():
    cfg = transformers.GptOssConfig(hidden_size=64, intermediate_size=32, num_local_experts=6, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"  # as from_pretrained sets it on the CPU
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    torch.manual_seed(0)
    dense = GptOssExperts(cfg).float()
    g = torch.Generator().manual_seed(1)
    weights = {}
    for name, (rows, cols) in {"gate_up_proj": (64, 64), "down_proj": (64, 32)}.items():
        blocks = torch.randint(0, 256, (6, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(122, 130, (6, rows, cols // 32), dtype=torch.uint8, generator=g)
        weights[name] = (blocks, scales)
        dense._parameters[name] = torch.nn.Parameter(mxfp4.unpack(blocks, scales, torch.float32).contiguous())
    for name in ("gate_up_proj_bias", "down_proj_bias"):
        torch.nn.init.normal_(dense._parameters[name])
    packed = GptOssExperts(cfg).float()
    packed.load_state_dict({k: v for k, v in dense.state_dict().items() if k.endswith("bias")}, strict=False)
    for name in weights:
        packed._parameters[name] = torch.nn.Parameter(torch.empty_like(dense._parameters[name], device="meta"))
    pack = Packed(weights, torch.float32)
    attach(packed, pack)
    hidden = torch.randn(5, 64)
    index = torch.tensor([[0, 3], [3, 5], [5, 0], [5, 3], [0, 3]])
    routing = torch.rand(5, 2)
    want = dense(hidden, index, routing)
    got = packed(hidden, index, routing)
    # the unpacked weights are a transposed view (the fast side for the product): the same sums, in another order
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    assert pack.fetched == 3  # experts 0, 3 and 5, not all 6
    assert packed.num_experts == 6 and packed.gate_up_proj.is_meta  # put back after the forward
