"""Tiny remote-code models that reproduce the device mismatches users report.

Each subdirectory holds one model's own code (``configuration_*.py``,
``modeling_*.py``, written the way remote-code checkpoints are), and the module
docstring of its ``modeling_*.py`` says which failure it reproduces.
:func:`make_pitfall` copies that code and the shared ``pitfall_blocks.py`` into a
fresh directory, writes ``config.json`` with its ``auto_map``, and saves random
weights as sharded safetensors. Loading needs ``trust_remote_code=True``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).parent
BLOCKS = HERE / "pitfall_blocks.py"
TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _blocks(prefix: str, first_on_gpu1: int = 2, n: int = 4) -> dict[str, int]:
    return {f"{prefix}.{i}": int(i >= first_on_gpu1) for i in range(n)}


@dataclass(frozen=True)
class Pitfall:
    name: str                       # subdirectory of tests/pitfalls
    config_class: str               # in configuration_pitfall_<name>.py
    model_class: str                # in modeling_pitfall_<name>.py
    bare_map: dict[str, int]        # the map users write by hand (every unit, in execution order)
    config: dict = field(default_factory=dict)

    @property
    def sources(self) -> list[Path]:
        return sorted((HERE / self.name).glob("*.py")) + [BLOCKS]

    def config_json(self) -> dict:
        mod = f"pitfall_{self.name}"
        return {"model_type": mod, "architectures": [self.model_class], **TEXT, **self.config, "auto_map": {
            "AutoConfig": f"configuration_{mod}.{self.config_class}",
            "AutoModelForCausalLM": f"modeling_{mod}.{self.model_class}",
        }}


# The bare maps: the first half of the blocks on GPU 0, the rest and the head on GPU 1;
# the VLM's tower and projector on GPU 1 too (InternVL's split_model spares GPU 0).
PITFALLS = {
    "glm": Pitfall("glm", "PitfallGlmConfig", "PitfallGlmForConditionalGeneration", {
        "transformer.embedding": 0, "transformer.rotary_pos_emb": 0, **_blocks("transformer.encoder.layers"),
        "transformer.encoder.final_layernorm": 1, "transformer.output_layer": 1}),
    "vlm": Pitfall("vlm", "PitfallVlmConfig", "PitfallVlmForCausalLM", {
        "vision_model.embeddings": 1, **_blocks("vision_model.layers", 0, 2), "vision_model.post_layernorm": 1,
        "mlp1": 1, "language_model.model.embed_tokens": 0, "language_model.model.rotary_emb": 0,
        **_blocks("language_model.model.layers"), "language_model.model.norm": 1, "language_model.lm_head": 1,
    }, {"image_token_id": 500,
        "vision_config": {"image_size": 28, "patch_size": 14, "hidden_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "num_channels": 3}}),
    "tied": Pitfall("tied", "PitfallTiedConfig", "PitfallTiedForCausalLM", {
        "model.embed_tokens": 0, "model.rotary_emb": 0, **_blocks("model.layers"), "model.norm": 1, "lm_head": 1,
    }, {"tie_word_embeddings": True, "initializer_range": 0.2}),   # wider init: not just echoing the prompt
    "rope": Pitfall("rope", "PitfallRopeConfig", "PitfallRopeForCausalLM", {
        "model.embed_tokens": 0, **_blocks("model.blocks"), "model.norm": 1, "lm_head": 1}),
    "nexttok": Pitfall("nexttok", "PitfallNexttokConfig", "PitfallNexttokForCausalLM", {
        "model.embed_tokens": 0, "model.rotary_emb": 0, **_blocks("model.layers"), "model.norm": 1, "lm_head": 1}),
}
# Not a device mismatch: model code that calls CUDA itself (devices, streams, events, .cuda()),
# which a replay on a machine without a GPU must answer.
OTHERS = {
    "cudacalls": Pitfall("cudacalls", "PitfallCudacallsConfig", "PitfallCudacallsForCausalLM", {
        "model.embed_tokens": 0, "model.rotary_emb": 0, **_blocks("model.layers"), "model.norm": 1, "lm_head": 1}),
}


def make_pitfall(name: str, root: Path, seed: int = 0, **config) -> Path:
    """Write pitfall ``name`` (config overrides in ``config``) under ``root``; its directory."""
    p = PITFALLS.get(name) or OTHERS[name]
    cfg = p.config_json() | config
    # transformers imports remote code as a package named after the directory: a name
    # per content keeps two versions (or two configs) from sharing one module.
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()
                          + b"".join(s.read_bytes() for s in p.sources)).hexdigest()[:10]
    directory = root / f"pitfall_{name}_{digest}"
    directory.mkdir(parents=True, exist_ok=True)
    for src in p.sources:
        shutil.copy(src, directory / src.name)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(directory, trust_remote_code=True), trust_remote_code=True)
    model.eval().save_pretrained(directory, max_shard_size="100KB")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))   # keep auto_map as written
    return directory
