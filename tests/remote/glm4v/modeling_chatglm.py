"""GLM-4V-9B's model (THUDM/glm-4v-9b modeling_chatglm.py, the ChatGLM4 text model with the
EVA2-CLIP tower), written for the transformers 4.40-4.41 it was released on:

* the text model is GLM-4's ChatGLM: config names ``num_layers``, ``padded_vocab_size``,
  ``ffn_hidden_size``, ``kv_channels``, ``multi_query_group_num``, ``seq_length``,
  ``rope_ratio``; ``ChatGLMPreTrainedModel(PreTrainedModel)`` (no ``GenerationMixin``
  base), ``__init__(config, empty_init=True, device=None)`` reading ``config.max_length``
  and building layers with ``skip_init``; unlike ChatGLM3 the activations are batch-first
  [b, s, h] and the rotary table is indexed [b, s, ...];
* the KV cache: per layer (key, value) [b, groups, s, head_dim]; during *prefill* the layers'
  caches are stacked into one tensor with ``torch.cat((presents, kv_cache.to(presents.device)))``
  (on the first layer's device) and ``ChatGLMModel.forward`` splits it back into the tuple
  of tuples; during decoding they stay tuples;
* the tower sits inside the text model (``transformer.vision``, beside
  ``transformer.embedding`` / ``transformer.encoder`` / ``transformer.output_layer``);
  ``ChatGLMModel.forward(input_ids, images, ...)`` runs it when there is no cache yet and
  *splices* its output in place of the three tokens ``<|begin_of_image|> <|endoftext|>
  <|end_of_image|>``: ``torch.cat((embeds[:boi], images_features[i].to(embeds.device),
  embeds[eoi + 1:]))``, the sequence growing by num_patches - 1; the image tokens all share
  the position boi + 1 (``position_ids[i, boi + 1].repeat(num_patches)``);
* ``prepare_inputs_for_generation(input_ids, images, ...)`` widens ``attention_mask`` the
  same way at *every* step (boi/eoi looked up in the full input_ids; with no image it still
  widens, at assumed positions 4 and 6), and ``images`` travels in ``model_kwargs``;
* there is no ``chat()``: the prompt comes from the tokenizer's ``apply_chat_template``
  (``tokenization_chatglm.py``) and the answer from ``model.generate(**inputs)``.
"""

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import CrossEntropyLoss, LayerNorm
from torch.nn.utils import skip_init
from transformers.generation.logits_process import LogitsProcessor
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel

from .configuration_chatglm import ChatGLMConfig
from .visual import EVA2CLIPModel

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


def default_init(cls, *args, **kwargs):
    return cls(*args, **kwargs)


class InvalidScoreLogitsProcessor(LogitsProcessor):
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.isnan(scores).any() or torch.isinf(scores).any():
            scores.zero_()
            scores[..., 198] = 5e4
        return scores


class RotaryEmbedding(nn.Module):
    def __init__(self, dim, rope_ratio=1, original_impl=False, device=None, dtype=None):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).to(dtype=dtype) / dim))
        self.register_buffer("inv_freq", inv_freq)
        self.dim = dim
        self.original_impl = original_impl
        self.rope_ratio = rope_ratio

    def forward_impl(self, seq_len: int, n_elem: int, dtype: torch.dtype, device: torch.device, base: int = 10000):
        base = base * self.rope_ratio
        theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float, device=device) / n_elem))
        seq_idx = torch.arange(seq_len, dtype=torch.float, device=device)
        idx_theta = torch.outer(seq_idx, theta).float()
        cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)
        if dtype in (torch.float16, torch.bfloat16, torch.int8):
            cache = cache.bfloat16() if dtype == torch.bfloat16 else cache.half()
        return cache

    def forward(self, max_seq_len, offset=0):
        return self.forward_impl(max_seq_len, self.dim, dtype=self.inv_freq.dtype, device=self.inv_freq.device)


@torch.jit.script
def apply_rotary_pos_emb(x: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
    # x: [b, np, sq, hn], rope_cache: [b, sq, rot_dim / 2, 2]
    b, np, sq = x.size(0), x.size(1), x.size(2)
    rot_dim = rope_cache.shape[-2] * 2
    x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    rope_cache = rope_cache[:, :sq]
    xshaped = x.reshape(b, np, sq, rot_dim // 2, 2)
    rope_cache = rope_cache.view(-1, 1, sq, xshaped.size(3), 2)
    x_out2 = torch.stack(
        [
            xshaped[..., 0] * rope_cache[..., 0] - xshaped[..., 1] * rope_cache[..., 1],
            xshaped[..., 1] * rope_cache[..., 0] + xshaped[..., 0] * rope_cache[..., 1],
        ],
        -1,
    )
    return torch.cat((x_out2.flatten(3), x_pass), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-5, device=None, dtype=None, **kwargs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(normalized_shape, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor):
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return (self.weight * hidden_states).to(input_dtype)


class CoreAttention(nn.Module):
    """The eager attention: scores with ``baddbmm`` into a buffer made on the query's device,
    the mask applied with ``masked_fill(-inf)``, softmax in fp32, layer-number scaling."""

    def __init__(self, config: ChatGLMConfig, layer_number):
        super().__init__()
        self.apply_query_key_layer_scaling = config.apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = config.attention_softmax_in_fp32
        if self.apply_query_key_layer_scaling:
            self.attention_softmax_in_fp32 = True
        self.layer_number = max(1, layer_number)
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = projection_size
        self.hidden_size_per_attention_head = projection_size // config.num_attention_heads
        self.num_attention_heads_per_partition = config.num_attention_heads
        coeff = None
        self.norm_factor = math.sqrt(self.hidden_size_per_attention_head)
        if self.apply_query_key_layer_scaling:
            coeff = self.layer_number
            self.norm_factor *= coeff
        self.coeff = coeff
        self.attention_dropout = nn.Dropout(config.attention_dropout)

    def forward(self, query_layer, key_layer, value_layer, attention_mask):
        # [b, np, sq, hn] x [b, np, sk, hn] -> [b, np, sq, sk]
        b, np_, sq, sk = query_layer.size(0), query_layer.size(1), query_layer.size(2), key_layer.size(2)
        q = query_layer.reshape(b * np_, sq, -1)
        k = key_layer.reshape(b * np_, sk, -1)
        buffer = torch.empty(b * np_, sq, sk, dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(buffer, q, k.transpose(1, 2), beta=0.0, alpha=(1.0 / self.norm_factor))
        scores = scores.view(b, np_, sq, sk)
        if self.attention_softmax_in_fp32:
            scores = scores.float()
        if self.coeff is not None:
            scores = scores * self.coeff
        if attention_mask is None and sq == sk:
            attention_mask = torch.ones(b, 1, sq, sk, device=scores.device, dtype=torch.bool)
            attention_mask.tril_()
            attention_mask = ~attention_mask
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, float("-inf"))
        probs = self.attention_dropout(F.softmax(scores, dim=-1).type_as(value_layer))
        context = torch.bmm(probs.view(b * np_, sq, sk), value_layer.reshape(b * np_, sk, -1))
        context = context.view(b, np_, sq, -1).transpose(1, 2).contiguous()   # [b, sq, np, hn]
        return context.reshape(*context.size()[:-2], self.hidden_size_per_partition)


def _config_to_kwargs(args):
    return {"dtype": args.torch_dtype}


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_number, device=None):
        super().__init__()
        self.layer_number = max(1, layer_number)
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_attention_head = self.projection_size // config.num_attention_heads
        self.num_attention_heads_per_partition = config.num_attention_heads
        self.multi_query_attention = config.multi_query_attention
        self.qkv_hidden_size = 3 * self.projection_size
        if self.multi_query_attention:
            self.num_multi_query_groups_per_partition = config.multi_query_group_num
            self.qkv_hidden_size = (
                self.projection_size + 2 * self.hidden_size_per_attention_head * config.multi_query_group_num)
        self.query_key_value = nn.Linear(config.hidden_size, self.qkv_hidden_size,
                                         bias=config.add_bias_linear or config.add_qkv_bias, device=device,
                                         **_config_to_kwargs(config))
        self.core_attention = CoreAttention(config, self.layer_number)
        self.dense = nn.Linear(self.projection_size, config.hidden_size, bias=config.add_bias_linear, device=device,
                               **_config_to_kwargs(config))

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        # hidden_states: [b, sq, h]
        mixed_x_layer = self.query_key_value(hidden_states)
        nh, hn = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
        groups = self.num_multi_query_groups_per_partition if self.multi_query_attention else nh
        query_layer, key_layer, value_layer = mixed_x_layer.split([nh * hn, groups * hn, groups * hn], dim=-1)
        query_layer = query_layer.view(query_layer.size()[:-1] + (nh, hn))
        key_layer = key_layer.view(key_layer.size()[:-1] + (groups, hn))
        value_layer = value_layer.view(value_layer.size()[:-1] + (groups, hn))
        # [b, sq, np, hn] -> [b, np, sq, hn]
        query_layer, key_layer, value_layer = [t.transpose(1, 2) for t in [query_layer, key_layer, value_layer]]
        if rotary_pos_emb is not None:
            query_layer = apply_rotary_pos_emb(query_layer, rotary_pos_emb)
            key_layer = apply_rotary_pos_emb(key_layer, rotary_pos_emb)
        if kv_cache is not None:
            cache_k, cache_v = kv_cache
            key_layer = torch.cat((cache_k, key_layer), dim=2)
            value_layer = torch.cat((cache_v, value_layer), dim=2)
        if use_cache:
            if kv_cache is None:   # prefill: one tensor [1, 2, b, groups, s, hn]
                kv_cache = torch.cat((key_layer.unsqueeze(0).unsqueeze(0), value_layer.unsqueeze(0).unsqueeze(0)),
                                     dim=1)
            else:
                kv_cache = (key_layer, value_layer)
        else:
            kv_cache = None
        if self.multi_query_attention:
            rep = nh // groups
            key_layer = key_layer.unsqueeze(2).expand(-1, -1, rep, -1, -1).contiguous().view(
                key_layer.size()[:1] + (nh,) + key_layer.size()[2:])
            value_layer = value_layer.unsqueeze(2).expand(-1, -1, rep, -1, -1).contiguous().view(
                value_layer.size()[:1] + (nh,) + value_layer.size()[2:])
        context_layer = self.core_attention(query_layer, key_layer, value_layer, attention_mask)
        return self.dense(context_layer), kv_cache


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.add_bias = config.add_bias_linear
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size * 2, bias=self.add_bias,
                                       device=device, **_config_to_kwargs(config))

        def swiglu(x):
            x = torch.chunk(x, 2, dim=-1)
            return F.silu(x[0]) * x[1]

        self.activation_func = swiglu
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=self.add_bias, device=device,
                                       **_config_to_kwargs(config))

    def forward(self, hidden_states):
        return self.dense_4h_to_h(self.activation_func(self.dense_h_to_4h(hidden_states)))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_number, device=None):
        super().__init__()
        self.layer_number = layer_number
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        self.fp32_residual_connection = config.fp32_residual_connection
        LayerNormFunc = RMSNorm if config.rmsnorm else LayerNorm
        self.input_layernorm = LayerNormFunc(config.hidden_size, eps=config.layernorm_epsilon, device=device,
                                             dtype=config.torch_dtype)
        self.self_attention = SelfAttention(config, layer_number, device=device)
        self.hidden_dropout = config.hidden_dropout
        self.post_attention_layernorm = LayerNormFunc(config.hidden_size, eps=config.layernorm_epsilon, device=device,
                                                      dtype=config.torch_dtype)
        self.mlp = MLP(config, device=device)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        layernorm_output = self.input_layernorm(hidden_states)
        attention_output, kv_cache = self.self_attention(layernorm_output, attention_mask, rotary_pos_emb,
                                                         kv_cache=kv_cache, use_cache=use_cache)
        residual = layernorm_output if self.apply_residual_connection_post_layernorm else hidden_states
        layernorm_input = residual + F.dropout(attention_output, p=self.hidden_dropout, training=self.training)
        layernorm_output = self.post_attention_layernorm(layernorm_input)
        mlp_output = self.mlp(layernorm_output)
        residual = layernorm_output if self.apply_residual_connection_post_layernorm else layernorm_input
        return residual + F.dropout(mlp_output, p=self.hidden_dropout, training=self.training), kv_cache


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.fp32_residual_connection = config.fp32_residual_connection
        self.post_layer_norm = config.post_layer_norm
        self.num_layers = config.num_layers
        self.layers = nn.ModuleList([GLMBlock(config, i + 1, device=device) for i in range(self.num_layers)])
        if self.post_layer_norm:
            LayerNormFunc = RMSNorm if config.rmsnorm else LayerNorm
            self.final_layernorm = LayerNormFunc(config.hidden_size, eps=config.layernorm_epsilon, device=device,
                                                 dtype=config.torch_dtype)
        self.gradient_checkpointing = False

    def _get_layer(self, layer_number):
        return self.layers[layer_number]

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_caches=None, use_cache: Optional[bool] = True,
                output_hidden_states: Optional[bool] = False):
        if not kv_caches:
            kv_caches = [None for _ in range(self.num_layers)]
        presents = () if use_cache else None
        all_self_attentions = None
        all_hidden_states = () if output_hidden_states else None
        for index in range(self.num_layers):
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            hidden_states, kv_cache = self._get_layer(index)(hidden_states, attention_mask, rotary_pos_emb,
                                                             kv_cache=kv_caches[index], use_cache=use_cache)
            if use_cache:
                if kv_caches[0] is not None:          # decoding: a tuple per layer
                    presents = presents + (kv_cache,)
                elif len(presents) == 0:              # prefill: one stacked tensor, on the first layer's device
                    presents = kv_cache
                else:
                    presents = torch.cat((presents, kv_cache.to(presents.device)), dim=0)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        if self.post_layer_norm:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states, presents, all_hidden_states, all_self_attentions


class ChatGLMPreTrainedModel(PreTrainedModel):
    is_parallelizable = False
    supports_gradient_checkpointing = True
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]
    _supports_flash_attn_2 = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module):
        return

    def get_masks(self, input_embeds, past_key_values, padding_mask=None):
        batch_size, seq_length, embed_size = input_embeds.shape
        full_attention_mask = torch.ones(batch_size, seq_length, seq_length, device=input_embeds.device)
        full_attention_mask.tril_()
        past_length = 0
        if past_key_values:
            past_length = past_key_values[0][0].shape[2]
        if past_length:
            full_attention_mask = torch.cat((torch.ones(batch_size, seq_length, past_length,
                                                        device=input_embeds.device), full_attention_mask), dim=-1)
        if padding_mask is not None:
            full_attention_mask = full_attention_mask * padding_mask.unsqueeze(1)
        if not past_length and padding_mask is not None:
            full_attention_mask -= padding_mask.unsqueeze(-1) - 1
        full_attention_mask = (full_attention_mask < 0.5).bool()
        full_attention_mask.unsqueeze_(1)
        return full_attention_mask

    def get_position_ids(self, input_ids, device):
        batch_size, seq_length = input_ids.shape
        return torch.arange(seq_length, dtype=torch.long, device=device).unsqueeze(0).repeat(batch_size, 1)


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, self.hidden_size, dtype=config.torch_dtype,
                                            device=device)
        self.fp32_residual_connection = config.fp32_residual_connection

    def forward(self, input_ids):
        embeddings = self.word_embeddings(input_ids)
        if self.fp32_residual_connection:
            embeddings = embeddings.float()
        return embeddings


def is_empty(images_list: Optional[List[List[torch.Tensor]]]):
    if images_list is None or len(images_list) == 0:
        return True
    for image_list in images_list:
        if image_list is not None:
            return False
    return True


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, device=None, empty_init=True):
        super().__init__(config)
        init_method = skip_init if empty_init else default_init
        init_kwargs = {}
        if device is not None:
            init_kwargs["device"] = device
        self.embedding = init_method(Embedding, config, **init_kwargs)
        self.num_layers = config.num_layers
        self.multi_query_group_num = config.multi_query_group_num
        self.kv_channels = config.kv_channels
        self.seq_length = config.seq_length
        rotary_dim = config.hidden_size // config.num_attention_heads if config.kv_channels is None \
            else config.kv_channels
        self.rotary_pos_emb = RotaryEmbedding(rotary_dim // 2, rope_ratio=config.rope_ratio,
                                              original_impl=config.original_rope, device=device,
                                              dtype=config.torch_dtype)
        self.encoder = init_method(GLMTransformer, config, **init_kwargs)
        self.output_layer = init_method(nn.Linear, config.hidden_size, config.padded_vocab_size, bias=False,
                                        dtype=config.torch_dtype, **init_kwargs)
        self.pre_seq_len = config.pre_seq_len
        self.prefix_projection = config.prefix_projection
        self.vision = EVA2CLIPModel(config)

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def forward(self, input_ids: torch.LongTensor = None, images: torch.Tensor = None,
                position_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.BoolTensor] = None,
                full_attention_mask: Optional[torch.BoolTensor] = None,
                past_key_values: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]] = None,
                inputs_embeds: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None
                ) -> Union[Tuple, BaseModelOutputWithPast]:
        # with a cache the image is already in it; without one, the image replaces boi/pad/eoi
        if past_key_values is None:
            if not is_empty(images) and input_ids is not None:
                image_size: int = self.config.vision_config["image_size"]
                patch_size: int = self.config.vision_config["patch_size"]
                num_patches = (image_size // patch_size // 2) ** 2
                assert len(input_ids) == len(images), f"{len(input_ids)} {len(images)}"
                inputs_embeds = self.embedding(input_ids)
                images = images.to(dtype=inputs_embeds.dtype)
                images_features = self.vision(images)
                if position_ids is None:
                    position_ids = self.get_position_ids(input_ids, device=inputs_embeds.device)
                new_input_embeds, new_position_ids = [], []
                for i in range(len(input_ids)):
                    input_id = input_ids[i].tolist()
                    boi_token_pos = input_id.index(self.config.boi_token_id)
                    eoi_token_pos = input_id.index(self.config.eoi_token_id)
                    assert eoi_token_pos - boi_token_pos == 2
                    new_input_embeds.append(torch.cat((inputs_embeds[i, :boi_token_pos],
                                                       images_features[i].to(inputs_embeds.device),
                                                       inputs_embeds[i, eoi_token_pos + 1:])))
                    new_position_ids.append(torch.cat((position_ids[i, :boi_token_pos + 1],
                                                       position_ids[i, boi_token_pos + 1].repeat(num_patches),
                                                       position_ids[i, eoi_token_pos:])))
                inputs_embeds = torch.stack(new_input_embeds, dim=0)
                position_ids = torch.stack(new_position_ids, dim=0)

        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch_size, seq_length, _ = inputs_embeds.shape
        if full_attention_mask is None:
            if (attention_mask is not None and not attention_mask.all()) or (past_key_values and seq_length != 1):
                full_attention_mask = self.get_masks(inputs_embeds, past_key_values, padding_mask=attention_mask)
        rotary_pos_emb = self.rotary_pos_emb(self.seq_length)
        if position_ids is not None:
            rotary_pos_emb = rotary_pos_emb[position_ids]
        else:
            rotary_pos_emb = rotary_pos_emb[None, :seq_length]
        hidden_states, presents, all_hidden_states, all_self_attentions = self.encoder(
            inputs_embeds, full_attention_mask, rotary_pos_emb=rotary_pos_emb, kv_caches=past_key_values,
            use_cache=use_cache, output_hidden_states=output_hidden_states)
        if presents is not None and type(presents) is torch.Tensor:
            # [layers, 2, b, groups, s, hn] -> ((k, v), ...) per layer
            presents = presents.split(1, dim=0)
            presents = [list(x.squeeze(0).split(1, dim=0)) for x in presents]
            presents = tuple(tuple(x.squeeze(0) for x in y) for y in presents)
        if not return_dict:
            return tuple(v for v in [hidden_states, presents, all_hidden_states, all_self_attentions] if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=presents,
                                       hidden_states=all_hidden_states, attentions=all_self_attentions)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, empty_init=True, device=None):
        super().__init__(config)
        self.max_sequence_length = config.max_length
        self.transformer = ChatGLMModel(config, empty_init=empty_init, device=device)
        self.config = config

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: Dict[str, Any],
                                            is_encoder_decoder: bool = False,
                                            standardize_cache_format: bool = False) -> Dict[str, Any]:
        model_kwargs["past_key_values"] = self._extract_past_from_model_output(
            outputs, standardize_cache_format=standardize_cache_format)
        if "attention_mask" in model_kwargs:
            attention_mask = model_kwargs["attention_mask"]
            model_kwargs["attention_mask"] = torch.cat(
                [attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)
        if "position_ids" in model_kwargs:
            position_ids = model_kwargs["position_ids"]
            new_position_id = position_ids[..., -1:].clone()
            new_position_id += 1
            model_kwargs["position_ids"] = torch.cat([position_ids, new_position_id], dim=-1)
        model_kwargs["is_first_forward"] = False
        return model_kwargs

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, images: Optional[torch.Tensor] = None,
                                      past_key_values: Optional[torch.Tensor] = None,
                                      attention_mask: Optional[torch.Tensor] = None,
                                      position_ids: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                                      is_first_forward: bool = True, **kwargs) -> dict:
        if position_ids is None:
            position_ids = self.get_position_ids(input_ids, device=input_ids.device)
        if attention_mask is not None:
            image_size: int = self.config.vision_config["image_size"]
            patch_size: int = self.config.vision_config["patch_size"]
            num_patches = (image_size // patch_size // 2) ** 2
            new_attention_masks = []
            eoi_token_pos, boi_token_pos = 6, 4   # used when there is no image
            for i in range(len(input_ids)):
                input_id = input_ids[i].tolist()
                if not is_empty(images):
                    boi_token_pos = input_id.index(self.config.boi_token_id)
                    eoi_token_pos = input_id.index(self.config.eoi_token_id)
                assert eoi_token_pos - boi_token_pos == 2
                new_attention_masks.append(torch.cat((attention_mask[i, :boi_token_pos + 1],
                                                      attention_mask.new_ones(num_patches),
                                                      attention_mask[i, eoi_token_pos:])))
            attention_mask = torch.stack(new_attention_masks, dim=0)
        if not is_first_forward:
            if past_key_values is not None:
                position_ids = position_ids[..., -1:]
                input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "images": images, "past_key_values": past_key_values,
                "position_ids": position_ids, "attention_mask": attention_mask, "return_last_logit": True,
                "use_cache": use_cache}

    def forward(self, input_ids: Optional[torch.Tensor] = None, images: List[List[torch.Tensor]] = None,
                position_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[Tuple[torch.FloatTensor]] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                return_last_logit: Optional[bool] = False):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        transformer_outputs = self.transformer(
            input_ids=input_ids, images=images, position_ids=position_ids, attention_mask=attention_mask,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=return_dict)
        hidden_states = transformer_outputs[0]
        if return_last_logit:
            hidden_states = hidden_states[:, -1:]
        lm_logits = self.transformer.output_layer(hidden_states)
        loss = None
        if labels is not None:
            new_labels = []
            for i in range(len(input_ids)):
                input_id = input_ids[i].tolist()
                boi_token_pos = input_id.index(self.config.boi_token_id)
                eoi_token_pos = input_id.index(self.config.eoi_token_id)
                assert eoi_token_pos - boi_token_pos == 2
                # the release hard-codes 1600 image tokens (1120 px / 14 / 2, squared)
                new_labels.append(torch.cat((labels[i, :boi_token_pos + 1],
                                             torch.tensor([-100]).to(labels.device).to(labels.dtype).repeat(1600),
                                             labels[i, eoi_token_pos:])))
            labels = torch.stack(new_labels, dim=0)
            lm_logits = lm_logits.to(torch.float32)
            shift_logits = lm_logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = CrossEntropyLoss(ignore_index=-100)(shift_logits.view(-1, shift_logits.size(-1)),
                                                       shift_labels.view(-1))
            lm_logits = lm_logits.to(hidden_states.dtype)
            loss = loss.to(hidden_states.dtype)
        if not return_dict:
            output = (lm_logits,) + transformer_outputs[1:]
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=lm_logits, past_key_values=transformer_outputs.past_key_values,
                                      hidden_states=transformer_outputs.hidden_states,
                                      attentions=transformer_outputs.attentions)

    @staticmethod
    def _reorder_cache(past: Tuple[Tuple[torch.Tensor, torch.Tensor], ...], beam_idx: torch.LongTensor):
        return tuple((layer_past[0].index_select(0, beam_idx.to(layer_past[0].device)),
                      layer_past[1].index_select(0, beam_idx.to(layer_past[1].device))) for layer_past in past)
