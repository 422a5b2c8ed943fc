"""Pitfall 3: ``lm_head`` shares its weight with the input embeddings (tied), as in
Gemma, Qwen2-0.5B or MiniCPM. A hand-written map that puts the embeddings on GPU 0
and ``lm_head`` with the last layers on GPU 1 still holds ONE tensor (the tie wins,
on GPU 0), so the head multiplies hidden states on cuda:1 by a weight on cuda:0.
"""

from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_pitfall_tied import PitfallTiedConfig
from .pitfall_blocks import PitfallCausalLM, new_cache, positions_for


class PitfallTiedForCausalLM(PitfallCausalLM):
    config_class = PitfallTiedConfig
    _no_split_modules = ["DecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, logits_to_keep=0, **kwargs):
        cache = new_cache(self, past_key_values, use_cache if use_cache is not None else self.config.use_cache)
        x = input_ids if inputs_embeds is None else inputs_embeds
        positions = positions_for(x, cache, kwargs.get("cache_position"), position_ids)
        hidden = self.model(input_ids, inputs_embeds, positions, cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)
