"""What the user wants to run: batch, prompt and new tokens, images, dtype."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import Enum

from fitmap.errors import BadInput


class Dtype(str, Enum):
    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def torch_name(self) -> str | None:
        return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(self.value)


@dataclass(frozen=True)
class Workload:
    """One generation request shape. Token counts are per sequence."""

    batch: int = 1
    prompt: int = 512  # text tokens of the prompt (image tokens come on top)
    new: int = 256  # tokens to generate
    images: tuple[tuple[int, int], ...] = field(default_factory=tuple)  # (width, height) per image, per sequence

    def __post_init__(self) -> None:
        for k in ("batch", "prompt", "new"):
            v = getattr(self, k)
            if type(v) is not int:
                raise BadInput(
                    f"{k} must be a whole number of {'sequences' if k == 'batch' else 'tokens'}, "
                    f"not {v!r} ({type(v).__name__})"
                )
        for image in self.images:
            if not isinstance(image, tuple) or len(image) != 2 or any(type(x) is not int or x < 1 for x in image):
                raise BadInput(f"an image is (width, height) in whole pixels, both at least 1; got {image!r}")
        problems = [
            f"--{k} must be {'at least 1' if k == 'batch' else 'non-negative'} (got {v})"
            for k, v in (("batch", self.batch), ("prompt", self.prompt), ("new", self.new))
            if v < (1 if k == "batch" else 0)
        ]
        if self.prompt + self.new < 1:
            problems.append("--prompt plus --new must be at least 1 token")
        if problems:
            raise BadInput("; ".join(problems))

    def to_json(self) -> dict:
        d = asdict(self)
        d["images"] = [f"{w}x{h}" for w, h in self.images]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Workload:
        return cls(d["batch"], d["prompt"], d["new"], tuple(parse_image(s) for s in d.get("images", [])))


_IMAGE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_image(text: str) -> tuple[int, int]:
    """``"1344x1344"`` -> (1344, 1344)."""
    m = _IMAGE.match(text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise BadInput(f"cannot read --image {text!r}: write WIDTHxHEIGHT in pixels, e.g. 1344x1344")
    return int(m.group(1)), int(m.group(2))
