"""Quantized loads on the CPU: fitmap against ``from_pretrained`` with the same quantizer.

A random bf16 Llama checkpoint (hidden 2048, 8 layers, vocab 32000: 1.1 GB) is written
once, then saved quantized by transformers itself (bitsandbytes NF4 and LLM.int8()).
Each variant runs in a fresh process: load (timed), generate one token; peak RSS and
peak anonymous memory are sampled from /proc every 5 ms. Variants, per method:

* checkpoint saved quantized: ``fitmap.runtime.loader.load`` (all-cpu plan) vs
  ``from_pretrained(path, device_map="cpu")``;
* bf16 checkpoint quantized while loading: fitmap ``--quantize`` vs
  ``from_pretrained(path, quantization_config=..., device_map="cpu")``.

Both read the same files, warm in the page cache (one read before the runs).

    .venv/bin/python bench/quant.py            # about 2 minutes on 2 cores

fitmap's plan (analytic costs) is made in the same process before its load and timed apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench.runtime import _MemSampler  # noqa: E402  (/proc peaks, shared with the runtime benchmark)

METHODS = ("nf4", "int8")
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def bnb_config(method: str):
    import torch
    import transformers

    return transformers.BitsAndBytesConfig(
        **(
            {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16}
            if method == "nf4"
            else {"load_in_8bit": True}
        )
    )


def write(root: Path) -> dict[str, Path]:
    import torch
    import transformers

    out = {"bf16": root / "bf16"} | {m: root / m for m in METHODS}
    if not (out["bf16"] / "config.json").exists():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(**SHAPE)
        transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(out["bf16"])
    for m in METHODS:
        if not (out[m] / "config.json").exists():
            q = transformers.AutoModelForCausalLM.from_pretrained(
                out["bf16"], quantization_config=bnb_config(m), device_map="cpu"
            )
            q.save_pretrained(out[m])
            del q
    return out


def child(variant: str, path: str, method: str) -> None:
    """In a fresh process: load one way, generate one token, print JSON."""
    peak = _MemSampler()
    peak.start()
    import torch
    import transformers

    import fitmap
    from fitmap.runtime.loader import load

    quantize = method if variant == "fitmap --quantize" else None
    tp = time.time()
    plan = (
        fitmap.plan(path, cpu="16GiB", prompt=16, new=1, estimate="analytic", quantize=quantize)
        if variant.startswith("fitmap")
        else None
    )
    t0 = time.time()
    if plan is not None:
        model = load(path, plan, progress=False).model
    else:
        extra = {"quantization_config": bnb_config(method)} if variant == "from_pretrained, quantization_config" else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **extra)
    t1 = time.time()
    with torch.no_grad():
        token = model.generate(torch.arange(1, 17).unsqueeze(0), max_new_tokens=1, do_sample=False)[0, -1]
    peak.stop()
    planned = sum(d.weights_bytes for d in plan.devices) if plan is not None else None
    print(
        json.dumps(
            {
                "load": t1 - t0,
                "plan": t0 - tp,
                "peak_rss": peak.rss,
                "peak_anon": peak.anon,
                "token": int(token),
                "planned_weights": planned,
            }
        )
    )


def run(variant: str, path: Path, method: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", variant, str(path), method],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            text=True,
        )
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{variant} failed:\n{err.read()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "fitmap-bench-quant"
    paths = write(root)
    for p in paths.values():
        for f in p.glob("*.safetensors"):
            f.read_bytes()  # warm: both loaders read from the page cache
    size = sum(f.stat().st_size for f in paths["bf16"].glob("*.safetensors"))
    print(f"checkpoint: Llama hidden 2048 x 8 layers, bf16 {size / 1e9:.2f} GB\n")
    print(
        "| method | checkpoint | loader | plan (fitmap) | load | peak RSS | peak anon | plan's weights | first token |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m in METHODS:
        cases = [
            (paths[m], "saved quantized", "fitmap"),
            (paths[m], "saved quantized", "from_pretrained"),
            (paths["bf16"], "bf16, quantized on load", "fitmap --quantize"),
            (paths["bf16"], "bf16, quantized on load", "from_pretrained, quantization_config"),
        ]
        for path, kind, variant in cases:
            r = run(variant, path, m)
            planned = f"{r['planned_weights'] / 2**20:.0f} MiB" if r["planned_weights"] else ""
            made = f"{r['plan']:.2f} s" if r["planned_weights"] else ""
            print(
                f"| {m} | {kind} | {variant} | {made} | {r['load']:.2f} s | {r['peak_rss'] / 2**20:.0f} MiB | "
                f"{r['peak_anon'] / 2**20:.0f} MiB | {planned} | {r['token']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
