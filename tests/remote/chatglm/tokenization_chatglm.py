"""A ChatGLM3-style tokenizer: the real one wraps a SentencePiece model in ``.tokenizer``
(so it looks like a processor to code that tests ``hasattr(x, "tokenizer")``), builds
chat prompts with ``build_chat_input`` and role tokens from ``get_command``, and has no
chat template. Here the inner tokenizer maps bytes to ids, so no model file is needed."""

from typing import Dict, List, Optional, Union

from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding


class ByteTokenizer:
    """The inner tokenizer (SentencePiece in the real model): ids 0-2 are unk, bos, eos."""

    def __init__(self):
        self.n_words = 259
        self.bos_id, self.eos_id, self.pad_id = 1, 2, 0
        role_special_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
        self.special_tokens = {}
        self.index_special_tokens = {}
        for token in ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"] + role_special_tokens:
            self.special_tokens[token] = self.n_words
            self.index_special_tokens[self.n_words] = token
            self.n_words += 1

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = [b + 3 for b in s.encode("utf-8")]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: List[int]) -> str:
        out, buf = "", []
        for i in ids:
            if i in self.index_special_tokens:
                out += bytes(buf).decode("utf-8", "replace") + self.index_special_tokens[i]
                buf = []
            elif 3 <= i < 259:
                buf.append(i - 3)
        return out + bytes(buf).decode("utf-8", "replace")

    def convert_token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return ord(token[0]) + 3 if len(token.encode("utf-8")) == 1 else 0

    def convert_id_to_token(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        return chr(index - 3) if 3 <= index < 131 else "<unk>"


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, padding_side="left", clean_up_tokenization_spaces=False, **kwargs):
        self.name = "GLMTokenizer"
        self.tokenizer = ByteTokenizer()
        self.special_tokens = {"<bos>": self.tokenizer.bos_id, "<eos>": self.tokenizer.eos_id,
                               "<pad>": self.tokenizer.pad_id}
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         **kwargs)

    def get_command(self, token):
        if token in self.special_tokens:
            return self.special_tokens[token]
        assert token in self.tokenizer.special_tokens, f"{token} is not a special token for {self.name}"
        return self.tokenizer.special_tokens[token]

    @property
    def unk_token(self) -> str:
        return "<unk>"

    @property
    def pad_token(self) -> str:
        return "<unk>"

    @property
    def pad_token_id(self):
        return self.get_command("<pad>")

    @property
    def eos_token(self) -> str:
        return "</s>"

    @property
    def eos_token_id(self):
        return self.get_command("<eos>")

    @property
    def vocab_size(self):
        return self.tokenizer.n_words

    def get_vocab(self):
        return {self._convert_id_to_token(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text, **kwargs):
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token):
        return self.tokenizer.convert_token_to_id(token)

    def _convert_id_to_token(self, index):
        return self.tokenizer.convert_id_to_token(index)

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return "".join(tokens)

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.tokenizer.decode([int(i) for i in token_ids])

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()

    def get_prefix_tokens(self):
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    def build_single_message(self, role, metadata, message):
        assert role in ["system", "user", "assistant", "observation"], role
        role_tokens = [self.get_command(f"<|{role}|>")] + self.tokenizer.encode(f"{metadata}\n")
        return role_tokens + self.tokenizer.encode(message)

    def build_chat_input(self, query, history=None, role="user"):
        if history is None:
            history = []
        input_ids = []
        for item in history:
            content = item["content"]
            input_ids.extend(self.build_single_message(item["role"], item.get("metadata", ""), content))
        input_ids.extend(self.build_single_message(role, "", query))
        input_ids.extend([self.get_command("<|assistant|>")])
        return self.batch_encode_plus([input_ids], return_tensors="pt", is_split_into_words=True)

    def build_inputs_with_special_tokens(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None):
        prefix_tokens = self.get_prefix_tokens()
        token_ids_0 = prefix_tokens + token_ids_0
        if token_ids_1 is not None:
            token_ids_0 = token_ids_0 + token_ids_1 + [self.get_command("<eos>")]
        return token_ids_0

    def _pad(self, encoded_inputs: Union[Dict, BatchEncoding], max_length: Optional[int] = None,
             padding_strategy=None, pad_to_multiple_of: Optional[int] = None, padding_side=None,
             return_attention_mask: Optional[bool] = None) -> dict:
        # ChatGLM pads on the left and makes position_ids itself
        required_input = encoded_inputs[self.model_input_names[0]]
        seq_length = len(required_input)
        if "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * seq_length
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(seq_length))
        if max_length is not None and max_length > seq_length:
            difference = max_length - seq_length
            encoded_inputs["attention_mask"] = [0] * difference + encoded_inputs["attention_mask"]
            encoded_inputs["position_ids"] = [0] * difference + encoded_inputs["position_ids"]
            encoded_inputs[self.model_input_names[0]] = [self.pad_token_id] * difference + required_input
        return encoded_inputs
