from .pitfall_blocks import PitfallTextConfig


class PitfallNexttokConfig(PitfallTextConfig):
    model_type = "pitfall_nexttok"
