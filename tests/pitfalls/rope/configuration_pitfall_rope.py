from .pitfall_blocks import PitfallTextConfig


class PitfallRopeConfig(PitfallTextConfig):
    model_type = "pitfall_rope"
