"""The chat template InternVL builds prompts with (its own, not the tokenizer's): ChatML."""

import dataclasses
from typing import List


@dataclasses.dataclass
class Conversation:
    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: tuple = ("<|im_start|>user\n", "<|im_start|>assistant\n")
    messages: List = dataclasses.field(default_factory=list)
    sep: str = "<|im_end|>"

    def get_prompt(self) -> str:
        ret = "<|im_start|>system\n" + self.system_template.format(system_message=self.system_message) + self.sep
        for role, message in self.messages:
            ret += role + (message + self.sep if message else "")
        return ret

    def append_message(self, role: str, message: str):
        self.messages.append([role, message])

    def copy(self):
        return Conversation(self.name, self.system_template, self.system_message, self.roles,
                            [[x, y] for x, y in self.messages], self.sep)


conv_templates = {
    "Hermes-2": Conversation("Hermes-2", system_message="You are a helpful assistant."),
}


def get_conv_template(name: str) -> Conversation:
    return conv_templates[name].copy()
