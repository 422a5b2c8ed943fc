"""Pitfall 2 (InternVL, MiniCPM-V, LLaVA-style remote code): a vision tower and a
projector (``mlp1``) turn the image into features, and the top-level forward writes
them into the text embeddings at the image-token positions. The hand-written map puts
the tower and projector on the last GPU (InternVL's ``split_model`` counts GPU 0 as
half a GPU) while the embeddings stay on GPU 0: the merge meets cuda:0 and cuda:1.
"""

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_pitfall_vlm import PitfallVlmConfig
from .pitfall_blocks import Decoder, PitfallPreTrainedModel, new_cache, positions_for


class VisionEmbeddings(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.patch_embedding = nn.Conv2d(vc.num_channels, vc.hidden_size, vc.patch_size, stride=vc.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, (vc.image_size // vc.patch_size) ** 2, vc.hidden_size))

    def forward(self, pixel_values):
        return self.patch_embedding(pixel_values).flatten(2).transpose(1, 2) + self.position_embedding


class VisionBlock(nn.Module):
    def __init__(self, vc):
        super().__init__()
        h = vc.hidden_size
        self.heads = vc.num_attention_heads
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, h))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionModel(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.embeddings = VisionEmbeddings(vc)
        self.layers = nn.ModuleList(VisionBlock(vc) for _ in range(vc.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(vc.hidden_size)

    def forward(self, pixel_values):
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


class LanguageModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class PitfallVlmForCausalLM(PitfallPreTrainedModel, GenerationMixin):
    config_class = PitfallVlmConfig
    _no_split_modules = ["VisionBlock", "DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        vc = config.vision_config
        self.vision_model = VisionModel(vc)
        self.mlp1 = nn.Sequential(nn.LayerNorm(vc.hidden_size), nn.Linear(vc.hidden_size, config.hidden_size),
                                  nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size))
        self.language_model = LanguageModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.model.embed_tokens

    def get_output_embeddings(self):
        return self.language_model.lm_head

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, pixel_values=None, **kwargs):
        # handed on under the keyword this transformers' own method takes (``cache`` from 5.25)
        own = inspect.signature(super().prepare_inputs_for_generation).parameters
        kwargs["cache" if "cache" in own else "past_key_values"] = past_key_values
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            inputs["pixel_values"] = pixel_values   # the image goes in with the prompt only
        return inputs

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=None, logits_to_keep=0, **kwargs):
        cache = new_cache(self, past_key_values, use_cache if use_cache is not None else self.config.use_cache)
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = self.mlp1(self.vision_model(pixel_values.to(inputs_embeds.dtype)))
            image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, features)
        positions = positions_for(input_ids, cache, kwargs.get("cache_position"), position_ids)
        hidden = self.language_model.model(inputs_embeds=inputs_embeds, positions=positions, cache=cache)
        logits = self.language_model.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)
