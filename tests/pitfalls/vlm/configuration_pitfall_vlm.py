from transformers import PreTrainedConfig


class PitfallVisionConfig(PreTrainedConfig):
    model_type = "pitfall_vision"

    def __init__(self, image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_channels=3, **kwargs):
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.num_attention_heads = num_attention_heads
        super().__init__(**kwargs)


class PitfallVlmConfig(PreTrainedConfig):
    model_type = "pitfall_vlm"
    sub_configs = {"vision_config": PitfallVisionConfig}

    def __init__(self, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=2048, image_token_id=500, vision_config=None,
                 **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.max_position_embeddings, self.image_token_id = max_position_embeddings, image_token_id
        if not isinstance(vision_config, PitfallVisionConfig):
            vision_config = PitfallVisionConfig(**(vision_config or {}))
        self.vision_config = vision_config
        super().__init__(**kwargs)
