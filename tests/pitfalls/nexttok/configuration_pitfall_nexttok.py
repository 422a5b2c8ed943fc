from transformers import PreTrainedConfig


class PitfallNexttokConfig(PreTrainedConfig):
    model_type = "pitfall_nexttok"

    def __init__(self, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=2048, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)
