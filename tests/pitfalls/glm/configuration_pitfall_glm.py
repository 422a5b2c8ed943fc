from .pitfall_blocks import PitfallTextConfig


class PitfallGlmConfig(PitfallTextConfig):
    model_type = "pitfall_glm"
