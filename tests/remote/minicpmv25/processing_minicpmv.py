"""MiniCPM-V 2.5's processor (``AutoProcessor``; the model's ``chat()`` builds one itself
with ``AutoProcessor.from_pretrained(self.config._name_or_path, trust_remote_code=True)``).
``__call__(text, images)`` replaces each ``(<image>./</image>)`` tag by the image
processor's placeholder, encodes (version 2.5: no extra BOS, the chat template wrote it),
and returns ``input_ids`` (int32), ``pixel_values`` / ``tgt_sizes`` / ``image_sizes`` as
nested lists, and ``image_bound``: per image piece the [start, end) token range between
``<image>`` and ``</image>``. Text-only input is not handled (``image_inputs`` is unset when
``images`` is None), as in the release."""

import re
from typing import Optional, Union

import torch
from transformers.processing_utils import ProcessorMixin
from transformers.utils import TensorType

from .image_processing_minicpmv import MiniCPMVBatchFeature


class MiniCPMVProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None):
        super().__init__(image_processor, tokenizer)
        self.version = image_processor.version

    def __call__(self, text, images=None, padding=False, truncation=None, max_length: Optional[int] = None,
                 do_pad: Optional[bool] = True,
                 return_tensors: Optional[Union[str, TensorType]] = TensorType.PYTORCH) -> MiniCPMVBatchFeature:
        if images is not None:
            image_inputs = self.image_processor(images, do_pad=do_pad, return_tensors=return_tensors)
        return self._convert_images_texts_to_inputs(image_inputs, text, max_length=max_length)

    def batch_decode(self, *args, **kwargs):
        result_text = []
        for result in args[0]:
            result = result[result != 0]
            if result[0] == self.tokenizer.bos_id:
                result = result[1:]
            if result[-1] == self.tokenizer.eos_id:
                result = result[:-1]
            result_text.append(self.tokenizer.decode(result, *args[1:], **kwargs).strip())
        return result_text

    def decode(self, *args, **kwargs):
        result = args[0]
        result = result[result != 0]
        if result[0] == self.tokenizer.bos_id:
            result = result[1:]
        if result[-1] == self.tokenizer.eos_id or result[-1] == self.tokenizer.eot_id:
            result = result[:-1]
        return self.tokenizer.decode(result, *args[1:], **kwargs).strip()

    def _convert(self, input_str, max_inp_length: Optional[int] = None):
        if self.version == 2.5 or self.tokenizer.add_bos_token:
            input_ids = self.tokenizer.encode(input_str)
        else:
            input_ids = [self.tokenizer.bos_id] + self.tokenizer.encode(input_str)
        if max_inp_length is not None:
            input_ids = input_ids[:max_inp_length]
        input_ids = torch.tensor(input_ids, dtype=torch.int32)
        starts = torch.where(input_ids == self.tokenizer.im_start_id)[0] + 1
        ends = torch.where(input_ids == self.tokenizer.im_end_id)[0]
        n = max(len(starts), len(ends))
        image_bounds = torch.hstack([starts[:n].unsqueeze(-1), ends[:n].unsqueeze(-1)])
        return input_ids.unsqueeze(0), image_bounds

    def _convert_images_texts_to_inputs(self, images, texts, do_pad=False, truncation=None, max_length=None,
                                        return_tensors=None):
        if not len(images):
            model_inputs = self.tokenizer(texts, return_tensors=return_tensors, padding=do_pad,
                                          truncation=truncation, max_length=max_length)
            return MiniCPMVBatchFeature(data={**model_inputs})
        pattern = "(<image>./</image>)"
        images, image_sizes, tgt_sizes = images["pixel_values"], images["image_sizes"], images["tgt_sizes"]
        image_tags = re.findall(pattern, texts)   # a regex: the parentheses group, "." is any character
        assert len(image_tags) == len(image_sizes[0])
        text_chunks = texts.split(pattern)
        final_texts = ""
        for i in range(len(image_tags)):
            final_texts += text_chunks[i] + self.image_processor.get_slice_image_placeholder(image_sizes[0][i])
        final_texts += text_chunks[-1]
        input_ids, image_bounds = self._convert(final_texts, max_length)
        return MiniCPMVBatchFeature(data={"input_ids": input_ids, "pixel_values": images, "image_sizes": image_sizes,
                                          "image_bound": [image_bounds], "tgt_sizes": tgt_sizes})

    @property
    def model_input_names(self):
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))
