"""MiniCPM-Llama3-V 2.5's config, as that repository writes it: the top config *is* a
``LlamaConfig`` (``MiniCPMVConfig(LlamaConfig)``, model_type ``minicpmv``) whose Llama keys
sit at the top level of config.json, with the vision tower's config under ``vision_config``
(an ``Idefics2VisionConfig``: transformers' own SigLIP-like NaViT class, model_type
``idefics2``) and the image slicing under ``slice_config``."""

import os
from typing import Union

from transformers import LlamaConfig, PretrainedConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)


class MiniCPMVSliceConfig(PretrainedConfig):
    model_type = "minicpmv"

    def __init__(self, patch_size=14, max_slice_nums=9, scale_resolution=448, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "PretrainedConfig":
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "minicpmv":   # read from the whole model's config.json
            config_dict = config_dict["slice_config"]
        return cls.from_dict(config_dict, **kwargs)


class MiniCPMVConfig(LlamaConfig):
    model_type = "minicpmv"
    keys_to_ignore_at_inference = ["past_key_values"]

    # the release's tower: SigLIP so400m-patch14 at 980 px ("siglip-so400m-14-980-flash-attn2-navit")
    default_vision_config = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
                             "model_type": "idefics2", "num_attention_heads": 16, "num_hidden_layers": 27,
                             "patch_size": 14}

    def __init__(self, use_cache=True, query_num=64, image_size=448, drop_vision_last_layer=True,
                 batch_vision_input=True, slice_config=None, vision_config=None, **kwargs):
        self.use_cache = use_cache
        self.query_num = query_num
        self.image_size = image_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input
        self.slice_config = (MiniCPMVSliceConfig(max_slice_nums=1) if slice_config is None
                             else MiniCPMVSliceConfig(**slice_config))
        self.slice_mode = True
        if vision_config is None:
            self.vision_config = Idefics2VisionConfig(**self.default_vision_config)
            logger.info("vision_config is None, using default vision config")
        elif isinstance(vision_config, dict):
            self.vision_config = Idefics2VisionConfig(**vision_config)
        elif isinstance(vision_config, Idefics2VisionConfig):
            self.vision_config = vision_config
        self.patch_size = self.vision_config.patch_size
        super().__init__(**kwargs)
