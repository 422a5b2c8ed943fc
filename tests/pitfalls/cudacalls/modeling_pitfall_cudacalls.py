"""Not a mismatch: model code that talks to CUDA itself, as kernel-launching remote code does.
CogVLM2's Triton rotary runs inside ``with torch.cuda.device(x.device.index):``; other code
selects the device, asks for the current one, synchronises, orders work with streams and
events, and moves tensors with ``.cuda(i)``. Each block here does all of that whenever its
input is not on the CPU (where the code assumes a GPU). On a machine without a GPU the calls
fail ("compiled without CUDA support") unless the replay answers them; placement is unchanged.
"""

import torch

from .configuration_pitfall_cudacalls import PitfallCudacallsConfig
from .pitfall_blocks import Decoder, DecoderLayer, PitfallCausalLM, new_cache, positions_for
from transformers.modeling_outputs import CausalLMOutputWithPast


class KernelLayer(DecoderLayer):
    def forward(self, x, cos, sin, cache=None):
        if x.device.type == "cpu":
            return super().forward(x, cos, sin, cache)
        index = x.device.index
        torch.cuda.set_device(index)
        assert torch.cuda.current_device() == index
        side = torch.cuda.Stream(device=index)
        side.wait_stream(torch.cuda.current_stream(index))
        with torch.cuda.device(index), torch.cuda.stream(side):
            out = super().forward(x, cos.cuda(index), sin.cuda(), cache)
        done = torch.cuda.Event()
        done.record(side)
        torch.cuda.current_stream().wait_event(done)
        torch.cuda.synchronize(index)
        return out


class KernelDecoder(Decoder):
    layer_class = KernelLayer


class PitfallCudacallsForCausalLM(PitfallCausalLM):
    config_class = PitfallCudacallsConfig
    decoder_class = KernelDecoder
    _no_split_modules = ["KernelLayer"]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, logits_to_keep=0, cache=None, **kwargs):
        cache = new_cache(self, cache if cache is not None else past_key_values,
                          use_cache if use_cache is not None else self.config.use_cache)
        positions = positions_for(input_ids, cache, kwargs.get("cache_position"), position_ids)
        hidden = self.model(input_ids, positions=positions, cache=cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)
