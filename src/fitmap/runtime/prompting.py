"""Text and images -> model inputs, with the model's own processor and chat template.

``AutoProcessor`` is used when the checkpoint ships one that loads here. Some
processors cannot be built without optional packages (Qwen2-VL's needs
torchvision for its video half); then the tokenizer and the image processor are
used directly, and the image placeholder is expanded to the number of tokens the
image processor's grid gives, as the full processor would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fitmap.errors import BadInput, remote_code_flag

OWN_IMAGE_PATHS = (
    "internvl_chat",
    "minicpmv",
    "CogVLMForCausalLM",
    "chatglm",
)  # remote code that takes images its own way (fitmap.runtime.run.own_chat), not through a processor
MAX_PIXELS = 100_000_000  # larger images are refused before decoding (PIL's own bomb check is at 179 MP)


def open_image(path: str | Path, flag: str = "--image"):
    """A PIL image in RGB, or a clear error for anything that is not an image (naming ``flag``, how the
    user gave it: ``--image`` or chat's ``/image``)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if p.is_dir():
        raise BadInput(f"{flag} {p} is a directory; give one image file (repeat {flag} for several)")
    if not p.is_file():
        raise BadInput(f"{flag} {p}: no such file")
    try:
        with Image.open(p) as img:
            if img.width * img.height > MAX_PIXELS:
                raise BadInput(
                    f"{flag} {p} is {img.width}x{img.height} pixels, over fitmap's limit of "
                    f"{MAX_PIXELS // 1_000_000} megapixels; resize it first (processors resize "
                    "images far smaller anyway)"
                )
            return img.convert("RGB")
    except Image.DecompressionBombError:
        raise BadInput(
            f"{flag} {p} is over fitmap's limit of {MAX_PIXELS // 1_000_000} megapixels (PIL "
            "refuses to decode it); resize it first"
        ) from None
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(f"{flag} {p} is not an image PIL can read ({e}); give a PNG, JPEG or WebP file") from None


@dataclass
class Prompter:
    """Builds inputs for one model; keeps a multi-turn conversation."""

    tokenizer: Any
    processor: Any = None  # a full multimodal processor, when one loads
    image_processor: Any = None  # otherwise the image processor alone
    config: Any = None
    messages: list[dict] = field(default_factory=list)
    no_processor: str = ""  # why no processor loaded, for the --image error

    @classmethod
    def for_model(cls, model_dir: str | Path, config: Any, trust_remote_code: bool = False) -> Prompter:
        import transformers

        remote_code_flag(trust_remote_code)

        processor = image_processor = None
        why = ""
        try:
            processor = transformers.AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        except ImportError as e:  # a library the processor class needs (torchvision for most VLMs)
            missing = re.search(r"requires the (\w+) librar", str(e))
            why = f"its processor needs {missing.group(1) if missing else 'a library this Python lacks'}" + (
                f" (pip install {missing.group(1).lower()})" if missing else f": {str(e).strip().splitlines()[0]}"
            )
        except (OSError, ValueError, AttributeError, TypeError):
            processor = None
        if isinstance(processor, transformers.PreTrainedTokenizerBase):
            processor = None  # a text model: AutoProcessor gave its tokenizer
        if processor is not None and not isinstance(processor, transformers.ProcessorMixin):
            image_processor, processor = processor, None  # an image processor only
        if processor is None and image_processor is None and (Path(model_dir) / "preprocessor_config.json").is_file():
            image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
        try:
            tokenizer = (
                processor.tokenizer
                if processor is not None
                else transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
            )
        except (OSError, ValueError, ImportError):
            if not trust_remote_code and _remote_tokenizer(Path(model_dir)):
                raise BadInput(
                    f"the tokenizer of {model_dir} is the repository's own code (auto_map in "
                    "tokenizer_config.json); fitmap runs it only with --trust-remote-code, after you read "
                    "it"
                ) from None
            have = sorted(p.name for p in Path(model_dir).glob("*token*"))
            raise BadInput(
                f"{model_dir} has no tokenizer fitmap can load (tokenizer files there: "
                f"{', '.join(have) or 'none'}); fitmap run needs the tokenizer files that come with the "
                "model (tokenizer.json, or tokenizer_config.json with its vocabulary files)"
            ) from None
        return cls(tokenizer, processor, image_processor, config, no_processor=why)

    def add_user(self, text: str, images: list) -> None:
        if not text.strip():
            raise BadInput("the prompt is empty; give --prompt TEXT")
        if images and self.processor is None and self.image_processor is None and not self.own_images:
            from fitmap.model.configs import vision_config

            if vision_config(self.config) is None:
                raise BadInput("this is a text model (its config has no vision_config); it takes no --image")
            raise BadInput(
                "this vision-language model's directory has no image processor fitmap can load"
                + (
                    f": {self.no_processor}"
                    if self.no_processor
                    else " (no preprocessor_config.json or processor_config.json); copy the processor files "
                    "from the model's repository beside its weights"
                )
            )
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content, "images": images})

    @property
    def own_images(self) -> bool:
        """Images go through the model's own ``chat()`` (InternVL's remote code has no processor)."""
        from fitmap.model.configs import family, vision_config

        # ChatGLM3 is a text model under the same model type as GLM-4V: images only with a vision tower
        return family(self.config, OWN_IMAGE_PATHS) in OWN_IMAGE_PATHS and vision_config(self.config) is not None

    def add_assistant(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": text}], "images": []})

    def inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The whole conversation so far, ready for ``generate``."""
        images = [img for m in self.messages for img in m["images"]]
        chat = [{"role": m["role"], "content": m["content"]} for m in self.messages]
        text = self._template(chat)
        if self.own_images:  # its chat() makes the image inputs; the text is what is counted here
            enc = self.tokenizer([text], return_tensors="pt")
        elif self.processor is not None:
            enc = self.processor(text=[text], images=images or None, return_tensors="pt")
        elif images:
            enc = self._manual(text, images)
        else:
            enc = self.tokenizer([text], return_tensors="pt")
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(enc).items()}

    def _template(self, chat: list[dict]) -> str:
        owner = self.processor if self.processor is not None else self.tokenizer
        if getattr(owner, "chat_template", None):
            try:
                return owner.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            except TypeError:  # an older template that takes each message's content as one string
                return owner.apply_chat_template(self.text_turns(), add_generation_prompt=True, tokenize=False)
        return "\n".join(c["text"] for m in chat for c in m["content"] if c["type"] == "text")

    def _manual(self, text: str, images: list) -> dict:
        """Image processor + tokenizer, with each image placeholder expanded to its token count."""
        pixels = self.image_processor(images=images, return_tensors="pt")
        counts = image_token_counts(self.config, pixels)
        token = image_token(self.config, self.tokenizer)
        pieces = text.split(token)
        if len(pieces) - 1 != len(counts):
            raise BadInput(f"the chat template made {len(pieces) - 1} image placeholder(s) for {len(counts)} image(s)")
        expanded = pieces[0] + "".join(token * n + rest for n, rest in zip(counts, pieces[1:]))
        enc = dict(self.tokenizer([expanded], return_tensors="pt"))
        enc.update(dict(pixels))
        if "mm_token_type_ids" not in enc and getattr(self.config, "model_type", "") in ("qwen2_vl", "qwen2_5_vl"):
            enc["mm_token_type_ids"] = (enc["input_ids"] == self.config.image_token_id).long()
        return enc

    def has_images(self) -> bool:
        return any(m["images"] for m in self.messages)

    def text_turns(self) -> list[dict]:
        """The conversation as ``{"role", "content"}`` with plain-text content (a model's own ``chat()``)."""
        return [{"role": m["role"], "content": "".join(c.get("text", "") for c in m["content"])} for m in self.messages]

    def internvl_pixels(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The images of the last turn as InternVL's model card preprocesses them (its
        ``dynamic_preprocess``: the closest grid of square tiles, a thumbnail when there is more
        than one, ImageNet normalisation); None without images."""
        images = self.messages[-1]["images"] if self.messages else []
        if not images:
            return None
        return torch.cat([internvl_tiles(self.config, img) for img in images]).to(device=device, dtype=dtype)

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def image_token(config: Any, tokenizer: Any) -> str:
    token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    if token_id is None:
        raise BadInput(f"model type {config.model_type!r} does not say which token stands for an image")
    return tokenizer.convert_ids_to_tokens(int(token_id))


def image_token_counts(config: Any, pixels: Any) -> list[int]:
    """Tokens per image, from what the image processor produced."""
    grid = pixels.get("image_grid_thw")
    if grid is not None:  # Qwen2-VL family: patches merged spatial_merge_size^2 to one token
        merge = config.vision_config.spatial_merge_size
        return [int(g.prod()) // (merge * merge) for g in grid]
    seq = getattr(config, "image_seq_length", None)
    if seq is None:
        vc = config.vision_config
        seq = (vc.image_size // vc.patch_size) ** 2
    return [int(seq)] * int(pixels["pixel_values"].shape[0])


def _remote_tokenizer(model_dir: Path) -> bool:
    import json

    try:
        data = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("auto_map"), (dict, list))


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def internvl_tiles(config: Any, image) -> torch.Tensor:
    """(tiles, 3, S, S) for one PIL image, tiled as :func:`fitmap.planning.images.image_shape` counts."""
    import numpy as np

    from fitmap.model import configs
    from fitmap.planning.images import closest_grid

    vc = configs.vision_config(config)
    size = getattr(config, "force_image_size", None) or vc.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    cols, rows = closest_grid(image.width, image.height, size, int(getattr(config, "max_dynamic_patch", None) or 12))
    resized = image.resize((size * cols, size * rows))
    tiles = [
        resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)
    ]
    if len(tiles) > 1 and getattr(config, "use_thumbnail", True) is not False:
        tiles.append(image.resize((size, size)))
    mean, std = torch.tensor(_IMAGENET_MEAN).view(3, 1, 1), torch.tensor(_IMAGENET_STD).view(3, 1, 1)
    return torch.stack(
        [(torch.from_numpy(np.asarray(t, dtype=np.float32) / 255.0).permute(2, 0, 1) - mean) / std for t in tiles]
    )
