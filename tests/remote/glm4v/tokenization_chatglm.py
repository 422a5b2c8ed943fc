"""GLM-4V-9B's tokenizer (``ChatGLM4Tokenizer``): the release wraps a tiktoken BPE
(tokenizer.model) in ``self.tokenizer``; here the inner tokenizer maps bytes to ids 0-255
and GLM-4's special tokens to 256 on, so no vocabulary file is needed. What is kept:
``[gMASK]<sop>`` prefix tokens, ``<|role|>metadata\\n`` messages, left padding with
``position_ids`` made by ``_pad``, ``image_size`` from tokenizer_config.json, and the
``apply_chat_template`` override that accepts ``{"role", "image", "content"}`` messages:
the image is resized to ``image_size`` (bicubic), CLIP-normalized and returned as
``images`` (with ``return_dict=True``), and the user message that carries it is prefixed
with ``<|begin_of_image|><|endoftext|><|end_of_image|>`` (one image per conversation).
The torchvision transform of the release is written with numpy/PIL here."""

from typing import Dict, List, Optional, Union

import numpy as np
import torch
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding
from transformers.utils import PaddingStrategy

SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                  "<|end_of_video|>"]


class ByteBPE:
    """Stands in for the tiktoken ``Encoding``: bytes are ids, special tokens follow."""

    def __init__(self):
        self.n_vocab = 256 + len(SPECIAL_TOKENS)
        self._special_tokens = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}

    def encode(self, text: str, disallowed_special=()) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: List[int]) -> str:
        out, buf = "", []
        for i in ids:
            if i >= 256:   # ids past the special tokens (the vocabulary is padded) decode to nothing
                out += bytes(buf).decode("utf-8", "replace") + (SPECIAL_TOKENS[i - 256] if i < self.n_vocab else "")
                buf = []
            else:
                buf.append(i)
        return out + bytes(buf).decode("utf-8", "replace")


def _clip_transform(image, image_size):
    """Resize((image_size, image_size), BICUBIC), ToTensor, Normalize(CLIP mean/std)."""
    pixels = np.asarray(image.convert("RGB").resize((image_size, image_size), 3), dtype=np.float32) / 255
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    return (torch.from_numpy(pixels).permute(2, 0, 1) - mean) / std


class ChatGLM4Tokenizer(PreTrainedTokenizer):
    vocab_files_names = {}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, padding_side="left", clean_up_tokenization_spaces=False, encode_special_tokens=False,
                 image_size=None, **kwargs):
        self.name = "GLM4Tokenizer"
        self.tokenizer = ByteBPE()
        self.special_tokens = dict(self.tokenizer._special_tokens)
        self.encode_special_tokens = encode_special_tokens
        self.image_size = image_size
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         **kwargs)

    @property
    def vocab_size(self):
        return self.tokenizer.n_vocab

    def get_vocab(self):
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return [chr(b) for b in self.tokenizer.encode(text, disallowed_special=())]

    def _convert_token_to_id(self, token):
        if token in self.special_tokens:
            return self.special_tokens[token]
        return ord(token) if len(token) == 1 and ord(token) < 256 else self.special_tokens["<|endoftext|>"]

    def _convert_id_to_token(self, index):
        if index >= self.vocab_size:
            return ""
        return SPECIAL_TOKENS[index - 256] if index >= 256 else chr(index)

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return self.tokenizer.decode([self._convert_token_to_id(t) for t in tokens])

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ids = [int(i) for i in token_ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < 256]
        return self.tokenizer.decode(ids)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()

    def get_prefix_tokens(self):
        return [self.convert_tokens_to_ids("[gMASK]"), self.convert_tokens_to_ids("<sop>")]

    def build_single_message(self, role, metadata, message, tokenize=True, message_prefix=None):
        assert role in ["system", "user", "assistant", "observation"], role
        if not tokenize:
            return str(f"<|{role}|>{metadata}\n{message}")
        role_tokens = [self.convert_tokens_to_ids(f"<|{role}|>")] + self.tokenizer.encode(f"{metadata}\n")
        message_tokens = self.tokenizer.encode(message)
        if message_prefix is not None:
            message_tokens = message_prefix + message_tokens
        return role_tokens + message_tokens

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = True,
                            padding: bool = False, truncation: bool = False, max_length: Optional[int] = None,
                            return_tensors=None, return_dict: bool = False, tokenizer_kwargs=None,
                            add_special_tokens: bool = True, **kwargs):
        if return_dict and not tokenize:
            raise ValueError("`return_dict=True` is incompatible with `tokenize=False`.")

        def handle_single_conversation(conversation):
            input_ids = self.get_prefix_tokens() if add_special_tokens else []
            input_message = "[gMASK]<sop>" if add_special_tokens else ""
            input_image = None
            for item in conversation:
                message = item.get("content", "")
                if "image" in item:
                    assert input_image is None, "Multiple images are not supported"
                    input_image = _clip_transform(item["image"], self.image_size)
                if item["role"] == "user" and "image" in item:
                    message_prefix = self.convert_tokens_to_ids(
                        ["<|begin_of_image|>", "<|endoftext|>", "<|end_of_image|>"])
                else:
                    message_prefix = None
                if tokenize:
                    input_ids.extend(self.build_single_message(item["role"], item.get("metadata", ""), message,
                                                               tokenize=tokenize, message_prefix=message_prefix))
                else:
                    input_message += self.build_single_message(item["role"], item.get("metadata", ""), message,
                                                               tokenize=tokenize, message_prefix=message_prefix)
            if add_generation_prompt:
                if tokenize:
                    input_ids.extend([self.convert_tokens_to_ids("<|assistant|>")])
                else:
                    input_message += "<|assistant|>"
            return {"input": input_ids if tokenize else input_message, "image": input_image}

        if isinstance(conversation, list) and all(isinstance(i, dict) for i in conversation):
            result = handle_single_conversation(conversation)
            input_ids, input_images = result["input"], [result["image"]]
        elif isinstance(conversation, list) and all(isinstance(i, list) for i in conversation):
            results = [handle_single_conversation(c) for c in conversation]
            input_ids = [item["input"] for item in results]
            input_images = [item["image"] for item in results]
        elif hasattr(conversation, "messages"):
            result = handle_single_conversation(conversation.messages)
            input_ids, input_images = result["input"], [result["image"]]
        else:
            raise ValueError("Invalid conversation format")
        if not tokenize:
            return input_ids
        output = self.batch_encode_plus(input_ids if isinstance(input_ids[0], list) else [input_ids],
                                        padding=padding, truncation=truncation, max_length=max_length,
                                        return_tensors=return_tensors, is_split_into_words=True,
                                        add_special_tokens=False)
        if not return_dict:
            return output["input_ids"]
        if any(image is not None for image in input_images):
            output["images"] = torch.stack(input_images)
        return output

    def build_inputs_with_special_tokens(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None):
        token_ids_0 = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            token_ids_0 = token_ids_0 + token_ids_1 + [self.convert_tokens_to_ids("<eos>")]
        return token_ids_0

    def _pad(self, encoded_inputs: Union[Dict, BatchEncoding], max_length: Optional[int] = None,
             padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD, pad_to_multiple_of: Optional[int] = None,
             padding_side=None, return_attention_mask: Optional[bool] = None) -> dict:
        # left padding, and position_ids made here
        required_input = encoded_inputs[self.model_input_names[0]]
        seq_length = len(required_input)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = len(required_input)
        if max_length is not None and pad_to_multiple_of is not None and (max_length % pad_to_multiple_of != 0):
            max_length = ((max_length // pad_to_multiple_of) + 1) * pad_to_multiple_of
        if "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * seq_length
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(seq_length))
        if padding_strategy != PaddingStrategy.DO_NOT_PAD and max_length is not None and max_length > seq_length:
            difference = max_length - seq_length
            encoded_inputs["attention_mask"] = [0] * difference + encoded_inputs["attention_mask"]
            encoded_inputs["position_ids"] = [0] * difference + encoded_inputs["position_ids"]
            encoded_inputs[self.model_input_names[0]] = [self.pad_token_id] * difference + required_input
        return encoded_inputs
