"""``fitmap demo``: what ``make demo`` runs, offline, on a CPU laptop.

1. Plans and checks a full-size catalog VLM (Qwen2-VL-7B) on a hypothetical
   2 x 16 GiB machine for one 1344x1344 image and 3000 + 1000 tokens.
2. Creates once, in a cache directory, a small random-weight Qwen2-VL checkpoint
   (with a tokenizer and image processor built here, no download), loads it with a
   RAM budget that sends part of it to the disk tier, answers one prompt about an
   image, and prints measured vs predicted memory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from fitmap.cache import cache_dir, writable_cache_dir

CATALOG_MODEL = "qwen2-vl-7b"
DEMO_NAME = "qwen2-vl-tiny-random-v1"
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
WORDS = (
    "the a an image picture photo shows show is are of in on with and what which where describe colour color "
    "red green blue yellow black white gradient square circle cat dog sky light dark left right top bottom "
    "this that it I you see there here please tell me about . , ? ! : user assistant system"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def demo_checkpoint(root: Path | None = None) -> Path:
    """The small random Qwen2-VL checkpoint, created once (atomically) under ``root``."""
    target = (root or cache_dir()) / DEMO_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        _write_checkpoint(tmp)
        tmp.rename(target)
    except FileExistsError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + WORDS + chars + ["[UNK]"]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=SPECIALS,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _write_checkpoint(path: Path) -> None:
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(
        model_type="qwen2_vl_text",
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0},
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    cfg = transformers.Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=4,
            embed_dim=256,
            hidden_size=512,
            num_heads=4,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(cfg).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path, max_shard_size="20MB")
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=448 * 448).save_pretrained(path)
    (path / "fitmap-demo.json").write_text(json.dumps({"note": "random weights made by fitmap demo"}))


def demo_image(root: Path | None = None) -> Path:
    """A 448x448 PNG with a gradient and a square, drawn here."""
    from PIL import Image, ImageDraw

    path = (root or cache_dir()) / "demo-image.png"
    if not path.is_file():
        img = Image.new("RGB", (448, 448))
        px = img.load()
        assert px is not None  # an image made in memory has its pixels
        for y in range(448):
            for x in range(448):
                px[x, y] = (x * 255 // 447, y * 255 // 447, 128)
        ImageDraw.Draw(img).rectangle((150, 150, 300, 300), fill=(250, 250, 250))
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    return path


def run_demo() -> int:
    from fitmap import pipeline
    from fitmap.cli import report
    from fitmap.planning.devices import make_machine
    from fitmap.planning.workload import Workload
    from fitmap.runtime.prompting import open_image
    from fitmap.runtime.run import answer
    from fitmap.simulation.check import check
    from fitmap.sizes import fmt_bytes

    writable_cache_dir()  # the demo's checkpoint, image and offload folder live there: one line if it cannot

    c = report.console
    c.rule(f"1. Plan + check {CATALOG_MODEL} (full size, no weights) on 2 x 16 GiB GPUs, one 1344x1344 image")
    req = pipeline.PlanRequest(
        CATALOG_MODEL, make_machine("2x16GiB", "64GiB"), Workload(1, 3000, 1000, ((1344, 1344),))
    )
    prep = pipeline.prepare(req)
    plan = pipeline.plan(req, prep)
    report.print_plan(plan)
    groups = {plan.device_map[u] for u in plan.groups.get("input", [])}
    c.print(f"embeddings, vision tower and projector on: {', '.join(f'cuda:{g}' for g in sorted(groups))}")
    checked = check(prep.skeleton.config, prep.inventory.task, prep.skeleton, plan)
    report.print_check(checked)

    c.rule("2. Run a small Qwen2-VL with RANDOM weights on this machine, part of it streamed from disk")
    path = demo_checkpoint()
    image = demo_image()
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    budget = int(size * 0.65)
    disk = cache_dir() / "offload"
    disk.mkdir(parents=True, exist_ok=True)
    c.print(
        f"checkpoint: {path} ({fmt_bytes(size)}); RAM budget {fmt_bytes(budget)} (--cpu: 65% of the checkpoint, "
        f"for weights, KV, activations and read buffers), disk tier {disk}"
    )
    c.print("the weights are random, so the answer is noise: this shows placement, offload and memory, not quality")
    result = answer(
        str(path), "describe this image .", [open_image(image)], 12, make_machine(None, budget, disk), out=None
    )
    report.print_plan(result.plan)
    on_disk = [u for u, d in result.plan.device_map.items() if d == "disk"]
    c.print(f"units streamed from disk with read-ahead: {', '.join(on_disk) or 'none'}")
    c.print(
        f"answer ({result.new_tokens} tokens in {result.seconds:.2f} s, load {result.load_seconds:.2f} s): "
        f"{result.text!r}"
    )
    report.print_memory(result.memory, result.plan)
    return 0
