"""Pitfall 5: the next token comes back on the wrong device. This model's own chat
loop (``stream_greedy``, like ChatGLM's ``stream_generate``) is fed by the forward,
which picks the greedy token from the logits and appends it to ``input_ids``:
``torch.cat((input_ids, next_tokens))``. The logits come out of ``lm_head`` on the
last GPU, the ids live on the first. (With ``greedy_on_cpu`` the token is picked on
the CPU, as remote code that hands logits to numpy does: no device map can fix that.)

This model declares no ``_no_split_modules``: its blocks are found from the repeated
``ModuleList`` children.
"""

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_pitfall_nexttok import PitfallNexttokConfig
from .pitfall_blocks import PitfallCausalLM, new_cache, positions_for


@dataclass
class NextTokenOutput(CausalLMOutputWithPast):
    next_input_ids: torch.LongTensor | None = None   # input_ids with the greedy next token appended


class PitfallNexttokForCausalLM(PitfallCausalLM):
    config_class = PitfallNexttokConfig

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        cache = new_cache(self, past_key_values, use_cache if use_cache is not None else self.config.use_cache)
        positions = positions_for(input_ids, cache, kwargs.get("cache_position"), position_ids)
        hidden = self.model(input_ids, positions=positions, cache=cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        next_tokens = logits[:, -1:].argmax(-1)
        if getattr(self.config, "greedy_on_cpu", False):
            next_tokens = next_tokens.cpu()
        next_input_ids = torch.cat((input_ids, next_tokens), dim=-1)
        return NextTokenOutput(logits=logits, past_key_values=cache, next_input_ids=next_input_ids)

    @torch.no_grad()
    def stream_greedy(self, input_ids, max_new_tokens: int):
        """This model's own generation loop: yields each new token id [batch, 1]."""
        out = self(input_ids, use_cache=True)
        for _ in range(max_new_tokens):
            token = out.next_input_ids[:, -1:]
            yield token
            out = self(token, past_key_values=out.past_key_values, use_cache=True)
