from .pitfall_blocks import PitfallTextConfig


class PitfallTiedConfig(PitfallTextConfig):
    model_type = "pitfall_tied"

    def __init__(self, tie_word_embeddings=True, **kwargs):
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
