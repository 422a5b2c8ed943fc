"""llama.cpp's CPU decode on the same MoE weights as bench/moe.py, for a side-by-side number.

bench/moe.py times fitmap's experts on the CPU for a random-weight Qwen3-MoE shape. This bench saves that same
model (its ``build()`` and argparse defaults), converts the checkpoint to a GGUF file for llama.cpp's ``qwen3moe``
architecture with the ``gguf`` package (bf16 weights kept as bf16, norms and the router in f32, as llama.cpp's
own converter does), and times llama.cpp's single-token decode steps through llama-cpp-python, everything on the
CPU (what ``--cpu-moe`` does for the experts on a GPU machine).

It first checks the conversion: llama.cpp's logits for a prompt and a few greedy steps against transformers'
on the same weights. llama.cpp's qwen3moe always renormalises the top-k routing weights, so the reference is
run with ``norm_topk_prob`` set on the routers (the bench config leaves it off); that changes the arithmetic of
a step, not its cost. Then, for the same threads, the whole decode step of the model in plain transformers.

llama-cpp-python and gguf are not project dependencies; they live in their own venv, which also needs numpy and
(for the model and the reference) torch and transformers:

    PYTHONPATH=.:src /tmp/llamacpp-venv/bin/python bench/gguf_moe.py
    PYTHONPATH=.:src /tmp/llamacpp-venv/bin/python bench/gguf_moe.py --tokens 64 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# safetensors dtype -> (numpy dtype of the raw elements, GGML type name of the same bytes)
_DTYPES = {"BF16": (np.uint16, "BF16"), "F16": (np.float16, "F16"), "F32": (np.float32, "F32")}


class _Checkpoint:
    """The tensors of a safetensors checkpoint (one file or shards), read as memory maps with numpy."""

    def __init__(self, model_dir: Path) -> None:
        self.entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            header.pop("__metadata__", None)
            for name, info in header.items():
                self.entries[name] = (f, 8 + size, info)
        if not self.entries:
            raise FileNotFoundError(f"no *.safetensors in {model_dir}")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][2]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name][2]["dtype"]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's elements as stored (bf16 as ``uint16``), shaped as in the file."""
        f, base, info = self.entries[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{name}: dtype {info['dtype']} not supported")
        start, end = info["data_offsets"]
        np_dtype = _DTYPES[info["dtype"]][0]
        count = (end - start) // np.dtype(np_dtype).itemsize
        return np.memmap(f, dtype=np_dtype, mode="r", offset=base + start, shape=(count,)).reshape(info["shape"])

    def f32(self, name: str) -> np.ndarray:
        """The tensor widened to float32 (exact for bf16 and f16)."""
        a = self.raw(name)
        if self.dtype(name) == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)


def _experts(ck: _Checkpoint, prefix: str, n_expert: int) -> dict[str, np.ndarray]:
    """A layer's experts as stacked ``gate``/``up`` [E, I, H] and ``down`` [E, H, I] arrays of raw elements.

    Reads both the fused layout of transformers' in-memory modules (``experts.gate_up_proj`` [E, 2I, H],
    ``experts.down_proj`` [E, H, I]) and the per-expert layout its ``save_pretrained`` writes for Qwen3-MoE
    (``experts.N.{gate,up,down}_proj.weight``)."""
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in ck:
        gate_up = ck.raw(fused)
        half = gate_up.shape[1] // 2
        return {"gate": gate_up[:, :half], "up": gate_up[:, half:], "down": ck.raw(f"{prefix}.experts.down_proj")}
    return {
        part: np.stack([ck.raw(f"{prefix}.experts.{e}.{part}_proj.weight") for e in range(n_expert)])
        for part in ("gate", "up", "down")
    }


def write_gguf(model_dir: Path, out: Path) -> Path:
    """Convert a Qwen3-MoE checkpoint saved by transformers (``config.json`` and safetensors) to GGUF ``out``.

    Matrices keep the checkpoint's dtype (bf16, f16 or f32); norms and the router are written in f32. The
    tokenizer is a placeholder of the model's vocabulary size (``gpt2`` type, tokens ``<i>``): the bench feeds
    token ids. Tensors are streamed to the file one at a time, so memory holds one layer's experts at most."""
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "qwen3_moe":
        raise ValueError(f"expected a qwen3_moe checkpoint, got {cfg.get('model_type')!r}")
    ck = _Checkpoint(model_dir)
    arch = gguf.MODEL_ARCH.QWEN3MOE
    names = gguf.TENSOR_NAMES
    allowed = set(gguf.MODEL_TENSORS[arch])
    n_layer, n_expert = cfg["num_hidden_layers"], cfg.get("num_experts") or cfg["num_local_experts"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type')!r} not converted")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise ValueError("dense MLP layers are not converted: every layer must be MoE")

    def name(kind: Any, bid: int | None = None) -> str:
        assert kind in allowed, kind
        return names[kind].format(bid=bid) + ".weight"

    # (gguf name, numpy shape, numpy dtype, GGML type name, thunk giving the array): reads wait for the writing
    plan: list[tuple[str, tuple[int, ...], Any, str, Any]] = []

    def matrix(gguf_name: str, hf_name: str) -> None:
        np_dtype, ggml_type = _DTYPES[ck.dtype(hf_name)]
        plan.append((gguf_name, ck.shape(hf_name), np_dtype, ggml_type, lambda: ck.raw(hf_name)))

    def vector(gguf_name: str, hf_name: str) -> None:
        plan.append((gguf_name, ck.shape(hf_name), np.float32, "F32", lambda: ck.f32(hf_name)))

    T = gguf.MODEL_TENSOR
    matrix(name(T.TOKEN_EMBD), "model.embed_tokens.weight")
    vector(name(T.OUTPUT_NORM), "model.norm.weight")
    if "lm_head.weight" in ck and not cfg.get("tie_word_embeddings"):
        matrix(name(T.OUTPUT), "lm_head.weight")
    layer: dict[str, dict[str, np.ndarray]] = {}  # the experts of the layer being written, stacked

    def experts(mlp: str, which: str) -> np.ndarray:
        if mlp not in layer:
            layer.clear()
            layer[mlp] = _experts(ck, mlp, n_expert)
        return layer[mlp][which]

    for i in range(n_layer):
        p = f"model.layers.{i}"
        vector(name(T.ATTN_NORM, i), f"{p}.input_layernorm.weight")
        matrix(name(T.ATTN_Q, i), f"{p}.self_attn.q_proj.weight")
        matrix(name(T.ATTN_K, i), f"{p}.self_attn.k_proj.weight")
        matrix(name(T.ATTN_V, i), f"{p}.self_attn.v_proj.weight")
        matrix(name(T.ATTN_OUT, i), f"{p}.self_attn.o_proj.weight")
        vector(name(T.ATTN_Q_NORM, i), f"{p}.self_attn.q_norm.weight")
        vector(name(T.ATTN_K_NORM, i), f"{p}.self_attn.k_norm.weight")
        vector(name(T.FFN_NORM, i), f"{p}.post_attention_layernorm.weight")
        vector(name(T.FFN_GATE_INP, i), f"{p}.mlp.gate.weight")  # router [E, H]: ggml ne {H, E}
        mlp = f"{p}.mlp"
        fused = f"{mlp}.experts.gate_up_proj" in ck
        probe = f"{mlp}.experts.gate_up_proj" if fused else f"{mlp}.experts.0.gate_proj.weight"
        np_dtype, ggml_type = _DTYPES[ck.dtype(probe)]
        if fused:
            e, two_i, h = ck.shape(probe)
            gate_shape, down_shape = (e, two_i // 2, h), ck.shape(f"{mlp}.experts.down_proj")
        else:
            gate_shape = (n_expert, *ck.shape(probe))
            down_shape = (n_expert, *ck.shape(f"{mlp}.experts.0.down_proj.weight"))
        # numpy [E, I, H] is ggml ne {H, I, E}: llama.cpp's {n_embd, n_ff_exp, n_expert} for gate and up
        for kind, which, shape in (
            (T.FFN_GATE_EXP, "gate", gate_shape),
            (T.FFN_UP_EXP, "up", gate_shape),
            (T.FFN_DOWN_EXP, "down", down_shape),
        ):
            plan.append((name(kind, i), shape, np_dtype, ggml_type, lambda mlp=mlp, which=which: experts(mlp, which)))

    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    w.add_name("fitmap bench qwen3moe (random weights)")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_count(n_expert)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    file_type = {"BF16": gguf.LlamaFileType.MOSTLY_BF16, "F16": gguf.LlamaFileType.MOSTLY_F16}
    w.add_file_type(file_type.get(plan[0][3], gguf.LlamaFileType.ALL_F32))  # the embeddings' type
    vocab = cfg["vocab_size"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<{i}>" for i in range(vocab)])
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)
    w.add_token_merges(["< >"])  # llama.cpp's gpt2 vocab wants a merges list; one placeholder rank
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)

    for gguf_name, shape, np_dtype, ggml_type, _ in plan:
        nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        w.add_tensor_info(gguf_name, shape, np.dtype(np_dtype), nbytes, raw_dtype=gguf.GGMLQuantizationType[ggml_type])
    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file(path=out)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, shape, _, _, thunk in plan:
        a = np.ascontiguousarray(thunk())
        assert a.shape == shape, (a.shape, shape)
        w.write_tensor_data(a)
    w.close()
    return out


def _llama(gguf_path: Path, threads: int, n_ctx: int) -> Any:
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 512),
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=0,
        verbose=False,
    )


def _last_logits(llm: Any) -> np.ndarray:
    """The logits of the last token ``llm`` evaluated (llama-cpp-python's ``eval`` no longer keeps them)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32)


def llama_cpp_logits(gguf_path: Path, prompt: list[int], follow: list[int], threads: int = 2) -> list[np.ndarray]:
    """llama.cpp's last-position logits after ``prompt`` and after each token of ``follow`` fed in turn."""
    llm = _llama(gguf_path, threads, len(prompt) + len(follow) + 8)
    llm.eval(prompt)
    out = [_last_logits(llm)]
    for token in follow:
        llm.eval([token])
        out.append(_last_logits(llm))
    llm.close()
    return out


def llama_cpp_decode(gguf_path: Path, tokens: int, threads: int, prompt: list[int] | None = None) -> dict:
    """Time ``tokens`` single-token decode steps of llama.cpp after an 8-token prompt (ids, no text).

    Two warm-up steps go first; each timed step is one ``eval`` of the previous step's greedy token, logits
    for that token included. Returns tok/s, mean and median ms per token, and the threads used."""
    prompt = prompt or [int(t) for t in np.random.default_rng(0).integers(0, 1024, 8)]
    warm = 2
    llm = _llama(gguf_path, threads, len(prompt) + tokens + warm + 8)
    t = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t
    for _ in range(warm):
        llm.eval([int(_last_logits(llm).argmax())])
    steps = []
    for _ in range(tokens):
        token = int(_last_logits(llm).argmax())
        t = time.perf_counter()
        llm.eval([token])
        steps.append(time.perf_counter() - t)
    llm.close()
    return _rates(threads, steps) | {"prefill_ms": prefill * 1e3}


def _rates(threads: int, steps: list[float]) -> dict:
    """A decode's rate from the seconds of each of its timed steps."""
    total = sum(steps)
    return {
        "threads": threads,
        "tokens": len(steps),
        "tok_s": len(steps) / total,
        "ms_per_token": total / len(steps) * 1e3,
        "median_ms": float(np.median(steps)) * 1e3,
    }


def transformers_logits(model: Any, prompt: list[int], steps: int) -> list[np.ndarray]:
    """transformers' last-position logits after ``prompt`` and after each of ``steps`` greedy tokens."""
    import torch

    out = []
    with torch.no_grad():
        step = model(input_ids=torch.tensor([prompt]), use_cache=True)
        out.append(step.logits[0, -1].float().numpy())
        for _ in range(steps):
            token = torch.tensor([[int(out[-1].argmax())]])
            step = model(input_ids=token, past_key_values=step.past_key_values, use_cache=True)
            out.append(step.logits[0, -1].float().numpy())
    return out


def transformers_decode(model: Any, tokens: int, threads: int, prompt: list[int]) -> dict:
    """The same timing as :func:`llama_cpp_decode` for the whole model in plain transformers (eager, bf16)."""
    import torch

    torch.set_num_threads(threads)
    steps = []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        for i in range(tokens + 2):
            token = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            if i >= 2:
                steps.append(time.perf_counter() - t)
    return _rates(threads, steps)


def _set_norm_topk(model: Any, value: bool) -> None:
    for m in model.modules():
        if hasattr(m, "norm_topk_prob"):
            m.norm_topk_prob = value


def _compare(ref: list[np.ndarray], got: list[np.ndarray]) -> Iterator[str]:
    for i, (a, b) in enumerate(zip(ref, got)):
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        top2 = np.sort(a)[-2:]
        yield (
            f"  step {i}: transformers {int(a.argmax())}, llama.cpp {int(b.argmax())} "
            f"({'match' if a.argmax() == b.argmax() else 'DIFFER'}); logits cos {cos:.5f}, max |diff| "
            f"{float(np.abs(a - b).max()):.4f}, transformers top-2 gap {float(top2[1] - top2[0]):.4f}"
        )


def main() -> None:
    from bench.moe import build, shape_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_arguments(p)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--check-steps", type=int, default=4, help="greedy steps compared with transformers")
    p.add_argument("--keep", default=None, help="write the GGUF here and keep it (default: a temp dir)")
    args = p.parse_args()

    model = build(args)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, model.config.vocab_size, 8)]
    with tempfile.TemporaryDirectory(prefix="gguf-moe-") as tmp:
        ckpt = Path(tmp) / "hf"
        model.save_pretrained(ckpt)
        out = Path(args.keep) if args.keep else Path(tmp) / "model.gguf"
        t = time.perf_counter()
        write_gguf(ckpt, out)
        print(f"GGUF {out.stat().st_size / 2**30:.2f} GiB written in {time.perf_counter() - t:.1f} s")
        for f in ckpt.glob("*"):
            f.unlink()

        _set_norm_topk(model, True)  # llama.cpp's qwen3moe renormalises the top-k weights
        ref = transformers_logits(model, prompt, args.check_steps)
        got = llama_cpp_logits(out, prompt, [int(r.argmax()) for r in ref[:-1]])  # fed transformers' tokens
        print("check against transformers (norm_topk_prob=True), its greedy tokens fed to both, 8-token prompt:")
        print("\n".join(_compare(ref, got)))
        _set_norm_topk(model, False)
        ref_off = transformers_logits(model, prompt, 0)
        print(f"  (bench config, norm_topk_prob=False: step 0 token {int(ref_off[0].argmax())})")

        print(
            f"shape: {args.layers} MoE layers x {args.experts} experts (top {args.top_k}), hidden {args.hidden}, "
            f"expert {args.expert_size}, {args.dtype}; decode of {args.tokens} tokens after 8"
        )
        for threads in args.threads:
            r = llama_cpp_decode(out, args.tokens, threads, prompt)
            print(
                f"llama.cpp     threads {threads}: {r['tok_s']:6.2f} tok/s, {r['ms_per_token']:7.1f} ms/token "
                f"(median {r['median_ms']:.1f}; prefill {r['prefill_ms']:.0f} ms)"
            )
        for threads in args.threads:
            r = transformers_decode(model, args.tokens, threads, prompt)
            print(
                f"transformers  threads {threads}: {r['tok_s']:6.2f} tok/s, {r['ms_per_token']:7.1f} ms/token "
                f"(median {r['median_ms']:.1f}; whole step, eager)"
            )


if __name__ == "__main__":
    main()
