"""Tiny random checkpoints of several families, written as sharded safetensors.

Each family is small enough that a CPU forward takes milliseconds, yet keeps the
structure that matters for placement: several decoder layers, GQA, tied or
untied heads, experts, a vision tower with a projector.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def config(family: str) -> transformers.PretrainedConfig:
    if family == "llama":
        return transformers.LlamaConfig(**TEXT, tie_word_embeddings=False)
    if family == "mixtral":
        return transformers.MixtralConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2)
    if family == "glm":  # GLM-4 as transformers ports it natively (THUDM's remote code is tests/remote)
        return transformers.GlmConfig(**TEXT, head_dim=16, partial_rotary_factor=0.5, tie_word_embeddings=False)
    if family == "qwen3_moe":  # saved by transformers 5 with one tensor per expert, fused again on load
        return transformers.Qwen3MoeConfig(
            **TEXT | {"intermediate_size": 128},
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
        )
    if family == "deepseek_v3":  # MLA attention, one dense layer then MoE with a shared expert, per-expert keys
        return transformers.DeepseekV3Config(
            **TEXT | {"intermediate_size": 128},
            moe_intermediate_size=32,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.0,
            tie_word_embeddings=False,
        )
    if family == "gemma2":
        return transformers.Gemma2Config(**TEXT, head_dim=16, sliding_window=32, tie_word_embeddings=True)
    if family == "qwen2_vl":
        return transformers.Qwen2VLConfig(
            text_config=dict(
                TEXT,
                model_type="qwen2_vl_text",
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            ),
            vision_config=dict(
                depth=2,
                embed_dim=32,
                hidden_size=64,
                num_heads=2,
                mlp_ratio=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
            ),
            image_token_id=500,
            video_token_id=501,
            vision_start_token_id=502,
            vision_end_token_id=503,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    if family == "qwen2_5_vl":  # windowed attention in the vision tower, full attention in its last block
        return transformers.Qwen2_5_VLConfig(
            text_config=dict(
                TEXT,
                model_type="qwen2_5_vl_text",
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            ),
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=56,
                fullatt_block_indexes=[1],
            ),
            image_token_id=500,
            video_token_id=501,
            vision_start_token_id=502,
            vision_end_token_id=503,
            tie_word_embeddings=False,
        )
    if family == "mistral3":  # Pixtral tower: images at their own size (within the longest edge), 2x2 merged
        return transformers.Mistral3Config(
            text_config=dict(TEXT, model_type="mistral", head_dim=16, sliding_window=None),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                head_dim=16,
                image_size=224,
                patch_size=14,
            ),
            spatial_merge_size=2,
            image_token_index=500,
            tie_word_embeddings=False,
        )
    if family == "glm4v":  # GLM-4.1V: Qwen-style grid of patches, its own image processor and markers
        return transformers.Glm4vConfig(
            text_config=dict(
                TEXT,
                head_dim=16,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [1, 1, 2],
                    "partial_rotary_factor": 0.5,
                },
            ),
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                image_size=28,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            image_token_id=500,
            video_token_id=501,
            image_start_token_id=502,
            image_end_token_id=503,
            video_start_token_id=504,
            video_end_token_id=505,
            tie_word_embeddings=False,
        )
    if family == "llava":  # CLIP tower at a fixed square, one token per patch ("default": CLS dropped)
        return transformers.LlavaConfig(
            text_config=dict(TEXT, model_type="llama"),
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
                projection_dim=32,
            ),
            image_token_index=500,
            tie_word_embeddings=False,
        )
    if family == "internvl":  # InternVL 3 as transformers ports it: 448 tiles, pixel shuffle to a quarter
        return transformers.InternVLConfig(
            text_config=dict(TEXT, model_type="qwen2"),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=[28, 28],
                patch_size=[14, 14],
            ),
            image_token_id=500,
            image_seq_length=1,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
    if family in ("idefics3", "smolvlm"):  # tiles of the tower's square plus the whole image, pixel-shuffled
        cls = transformers.Idefics3Config if family == "idefics3" else transformers.SmolVLMConfig
        return cls(
            text_config=dict(TEXT, model_type="llama"),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            scale_factor=2,
            image_token_id=500,
            tie_word_embeddings=False,
        )
    if family == "llava_onevision":  # SigLIP tower, "anyres" tiles chosen among grid pinpoints, unpadded
        return transformers.LlavaOnevisionConfig(
            text_config=dict(TEXT, model_type="qwen2"),
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56], [56, 84], [84, 56]],
            vision_aspect_ratio="anyres_max_9",
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_token_index=500,
            video_token_index=501,
            tie_word_embeddings=False,
        )
    if family == "gemma3":  # SigLIP vision tower: its position embedding must load as stored
        return transformers.Gemma3Config(
            text_config=dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                vocab_size=512,
                sliding_window=16,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=28,
                patch_size=7,
            ),
            mm_tokens_per_image=4,
            image_token_index=500,
            boi_token_index=501,
            eoi_token_index=502,
        )
    if family == "llama4":  # complex rotary buffer, MoE text model, pixel-shuffle vision tower
        return transformers.Llama4Config(
            text_config=dict(
                hidden_size=64,
                intermediate_size=128,
                intermediate_size_mlp=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                vocab_size=512,
                num_local_experts=2,
                num_experts_per_tok=1,
                interleave_moe_layer_step=1,
                max_position_embeddings=512,
                no_rope_layers=[1, 1],
                attention_chunk_size=64,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
                vision_output_dim=64,
                projector_input_dim=64,
                projector_output_dim=64,
                pixel_shuffle_ratio=0.5,
            ),
            image_token_index=500,
            boi_token_index=501,
            eoi_token_index=502,
        )
    if family in ("qwen3_vl", "qwen3_vl_moe"):  # 16-px patches, learned position grid, DeepStack features
        moe = family == "qwen3_vl_moe"
        text = dict(
            TEXT,
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        )
        if moe:
            text.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
        cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
        return cls(
            text_config=text,
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                out_hidden_size=64,
                num_position_embeddings=16,
                deepstack_visual_indexes=[0, 1],
            ),
            image_token_id=500,
            video_token_id=501,
            vision_start_token_id=502,
            vision_end_token_id=503,
            tie_word_embeddings=False,
        )
    return _other_vlm(family)


_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
)


def _other_vlm(family: str) -> transformers.PretrainedConfig:
    """VLMs fitmap has no per-family code for: their images come from the image processor their type
    pairs with, and the count of image tokens from the model's own get_image_features."""
    if family == "llava_next":  # "anyres" tiles among grid pinpoints, unpadded features and row newlines
        return transformers.LlavaNextConfig(
            text_config=dict(TEXT, model_type="llama"),
            vision_config=dict(_CLIP, model_type="clip_vision_model", projection_dim=32),
            image_grid_pinpoints=[[28, 28], [28, 56], [56, 28]],
            image_token_index=500,
            tie_word_embeddings=False,
        )
    if family == "paligemma":  # SigLIP tower, one token per patch, Gemma text model
        return transformers.PaliGemmaConfig(
            text_config=dict(TEXT, model_type="gemma", head_dim=16, num_key_value_heads=1),
            vision_config=dict(_CLIP, model_type="siglip_vision_model", projection_dim=64),
            projection_dim=64,
            image_token_index=500,
        )
    if family == "qwen3_5":  # Qwen2-VL's image processor, linear-attention and full-attention layers
        return transformers.Qwen3_5Config(
            text_config=dict(
                TEXT,
                head_dim=16,
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                linear_key_head_dim=8,
                linear_value_head_dim=8,
                layer_types=["linear_attention", "full_attention"] * 2,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            ),
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=16,
                deepstack_visual_indexes=[],
            ),
            image_token_id=500,
            video_token_id=501,
            vision_start_token_id=502,
            vision_end_token_id=503,
            tie_word_embeddings=False,
        )
    if family == "blip-2":  # a Q-Former between tower and text model; its forward requires pixel_values
        return transformers.Blip2Config(
            vision_config=_CLIP,
            qformer_config=dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                encoder_hidden_size=32,
                vocab_size=512,
            ),
            text_config=dict(TEXT, model_type="opt", ffn_dim=128, word_embed_proj_dim=64),
            num_query_tokens=4,
            image_token_index=500,
        )
    if family == "idefics2":  # a perceiver resampler pools each image to a fixed count
        return transformers.Idefics2Config(
            text_config=dict(TEXT, model_type="mistral"),
            vision_config=_CLIP,
            perceiver_config=dict(
                hidden_size=64,
                resampler_n_latents=4,
                resampler_depth=1,
                resampler_n_heads=2,
                resampler_head_dim=8,
                num_key_value_heads=1,
            ),
            image_token_id=500,
            tie_word_embeddings=False,
        )
    if family == "mllama":  # Llama 3.2 Vision: tiles, and images reached through cross-attention layers
        return transformers.MllamaConfig(
            text_config=dict(TEXT, model_type="mllama_text_model", cross_attention_layers=[1]),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_global_layers=1,
                attention_heads=2,
                image_size=28,
                patch_size=14,
                max_num_tiles=4,
                vision_output_dim=64,
                intermediate_layers_indices=[0],
            ),
            image_token_index=500,
        )
    if family == "qwen2_5_omni_thinker":  # an omni model's thinker: vision and audio towers beside the text model
        return transformers.Qwen2_5OmniThinkerConfig(
            text_config=dict(
                TEXT,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            ),
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                fullatt_block_indexes=[1],
                window_size=56,
            ),
            audio_config=dict(
                d_model=32,
                encoder_layers=2,
                encoder_attention_heads=2,
                encoder_ffn_dim=64,
                output_dim=64,
                num_mel_bins=16,
                max_source_positions=100,
                n_window=10,
            ),
            image_token_index=500,
            audio_token_index=501,
            video_token_index=502,
            vision_start_token_id=503,
            vision_end_token_id=504,
            audio_start_token_id=505,
            audio_end_token_id=506,
        )
    if family == "git":  # no image token: the image features go before the text, inside the model
        return transformers.GitConfig(
            vision_config=_CLIP,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=512,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    if family == "kosmos-2":  # no image token: image_embeds_position_mask marks where the features go
        return transformers.Kosmos2Config(
            text_config=dict(
                embed_dim=64, layers=4, attention_heads=4, ffn_dim=128, vocab_size=512, max_position_embeddings=512
            ),
            vision_config=_CLIP,
            latent_query_num=8,
        )
    raise ValueError(f"unknown tiny family {family!r}")


# decoder-only VLMs whose config names no image token, recognised by their forward's signature
NO_IMAGE_TOKEN = ("git", "kosmos-2")

# VLMs planned through their image processor and their own get_image_features (no family code; Llama 3.2
# Vision's cross-attention mask is made by transformers' own functions)
OTHER_VLMS = ("llava_next", "paligemma", "qwen3_5", "blip-2", "idefics2", "mllama", "qwen2_5_omni_thinker")


VISION = (
    "qwen2_vl",
    "qwen2_5_vl",
    "mistral3",
    "glm4v",
    "llava",
    "internvl",
    "idefics3",
    "smolvlm",
    "llava_onevision",
    "gemma3",
    "llama4",
    "qwen3_vl",
    "qwen3_vl_moe",
    *OTHER_VLMS,
    *NO_IMAGE_TOKEN,
)


def make_checkpoint(
    family: str, directory: Path, shard_kb: int = 200, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a random-weight checkpoint of ``family`` into ``directory`` (sharded)."""
    torch.manual_seed(seed)
    cfg = config(family)
    auto = transformers.AutoModelForImageTextToText if family in VISION else transformers.AutoModelForCausalLM
    model = auto.from_config(cfg).eval()
    if dtype != torch.float32:  # already float32; .to() would also cast Llama 4's complex buffer to real
        model = model.to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size=f"{shard_kb}KB")
    return directory


def gemma3_with_processor(directory: Path) -> Path:
    """A tiny Gemma 3 with the files a user has: a Gemma3Processor (its PIL image processor at the tower's
    28 px, a word-level tokenizer holding Gemma 3's image tokens, a chat template) beside the weights."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    make_checkpoint("gemma3", directory)
    specials = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    words = ["user", "model", "describe", "this", "image", "."] + [chr(c) for c in range(97, 123)]
    vocab = {w: i for i, w in enumerate(specials + words + ["[UNK]"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="[UNK]",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    chat = (
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    image_processor = transformers.Gemma3ImageProcessor(size={"height": 28, "width": 28})
    transformers.Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, chat_template=chat, image_seq_length=4
    ).save_pretrained(directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(
        image_token_index=vocab["<image_soft_token>"],
        boi_token_index=vocab["<start_of_image>"],
        eoi_token_index=vocab["<end_of_image>"],
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory
