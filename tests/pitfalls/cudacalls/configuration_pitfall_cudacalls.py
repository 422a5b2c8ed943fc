from .pitfall_blocks import PitfallTextConfig


class PitfallCudacallsConfig(PitfallTextConfig):
    model_type = "pitfall_cudacalls"
