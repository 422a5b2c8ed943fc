"""MoE experts computed on the CPU where they live, against the RAM-bandwidth bound.

A decode step reads, per MoE layer, only the experts its token is routed to. This bench builds a
Qwen3-MoE shape with random weights (its experts in RAM, as a ``cpu-compute`` plan leaves them), decodes
greedily, and times the experts modules alone with forward hooks; the bound is the bytes of the experts
the step used over the RAM read bandwidth measured in the same run (a large tensor summed).

    .venv/bin/python bench/moe.py                       # bf16, 4 layers of 64 experts (top 8)
    .venv/bin/python bench/moe.py --dtype float32 --tokens 32 --threads 1

With ``--disk DIR`` a second section saves the model to DIR and loads it with fitmap, its experts left
on disk (``disk-compute``: a token reads only its routed experts from the files), the rest in RAM; it decodes
with the page cache dropped for the checkpoint before each token (``posix_fadvise``), and compares the bytes
read per token with the routed experts' bytes, and the time with the disk's read bound (measured in the same
run on the same file).

    .venv/bin/python bench/moe.py --disk /tmp/moe-bench --tokens 8

With ``--mxfp4 DIR`` a third: gpt-oss-120b's expert shape (hidden 2880, experts of 2880, top 4; 2 layers of
32 experts here, so the file stays small) written in MXFP4 as released, loaded by fitmap with its experts
computed on the CPU and kept packed in RAM; per token, the time in the experts against the RAM bound of the
packed bytes the routed experts take, and against the unpacking rate ``fitmap calibrate`` measures.

    .venv/bin/python bench/moe.py --mxfp4 /tmp/moe-mxfp4 --tokens 4

On a GPU machine the same experts run on the CPU beside the GPU part: see bench/gpu.py's moe section.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers


def ram_read_rate(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of reading one large tensor (a sum: read once, nothing written back)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times)


def build(args) -> torch.nn.Module:
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.expert_size,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=args.hidden // 16,
        vocab_size=1024,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
    return model.eval()


def shape_arguments(p: argparse.ArgumentParser) -> None:
    """The model shape's options, shared with bench/gguf_moe.py (same weights, same defaults)."""
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--expert-size", type=int, default=768)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_arguments(p)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: fitmap's choice for these experts)")
    p.add_argument("--disk", default=None, help="measure the experts left on disk instead, saving the model here")
    p.add_argument("--mxfp4", default=None, help="measure gpt-oss-shaped MXFP4 experts kept packed, saved here")
    args = p.parse_args()
    if args.mxfp4:
        packed_mxfp4(args)
        return
    model = build(args)
    if args.disk:
        on_disk(model, args)
        return
    blocks = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    per_expert = sum(p[0].numel() * p.element_size() for p in blocks[0].parameters())
    from fitmap.runtime.threads import BYTES_PER_THREAD, cores

    token_bytes = len(blocks) * args.top_k * per_expert  # what fitmap's plan records as cpu_token_bytes
    torch.set_num_threads(args.threads or max(1, min(cores(), token_bytes // BYTES_PER_THREAD)))
    spent = [0.0]
    used = [0]
    started: dict[int, float] = {}

    def before(module, args_, kwargs):
        index = kwargs.get("top_k_index", args_[1] if len(args_) > 1 else None)
        used[0] += len(set(index.flatten().tolist())) * per_expert
        started[id(module)] = time.perf_counter()

    def after(module, args_, output):
        spent[0] += time.perf_counter() - started.pop(id(module))

    for b in blocks:
        b.register_forward_pre_hook(before, with_kwargs=True)
        b.register_forward_hook(after)
    ids = torch.randint(0, 1024, (1, 8))
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)  # warm-up
        spent[0], used[0] = 0.0, 0
        t = time.perf_counter()
        prefill = model(input_ids=ids, use_cache=True)
        prefill_experts, prefill_bytes = spent[0], used[0]
        spent[0], used[0] = 0.0, 0
        cache = prefill.past_key_values
        token = prefill.logits[:, -1:].argmax(-1)
        for _ in range(args.tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        total = time.perf_counter() - t
    rate = ram_read_rate()
    experts_bytes = sum(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    step_bytes = used[0] / args.tokens
    step_time = spent[0] / args.tokens
    bound = step_bytes / rate
    print(
        f"shape: {args.layers} MoE layers x {args.experts} experts (top {args.top_k}), hidden {args.hidden}, "
        f"expert {args.expert_size}, {args.dtype}; experts in RAM {experts_bytes / 2**30:.2f} GiB; "
        f"threads {torch.get_num_threads()}"
    )
    print(f"RAM read bandwidth (1 GiB summed, median of 5): {rate / 1e9:.1f} GB/s")
    print(
        f"decode, experts computed on the CPU: {step_bytes / 2**20:.1f} MiB of routed experts read per token, "
        f"{step_time * 1e3:.1f} ms per token in the experts -> {step_bytes / step_time / 1e9:.1f} GB/s, "
        f"{bound / step_time:.0%} of the RAM bound ({bound * 1e3:.1f} ms)"
    )
    print(
        f"prefill of {ids.shape[1]} tokens: {prefill_bytes / 2**20:.0f} MiB of experts read, "
        f"{prefill_experts * 1e3:.0f} ms in the experts; whole run {total:.2f} s for {args.tokens} tokens"
    )


def _evict(directory) -> None:
    import os

    for f in directory.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cold_read_rate(directory) -> float:
    """Bytes/s of reading the checkpoint's largest file after dropping it from the page cache."""
    f = max(directory.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    _evict(directory)
    t = time.perf_counter()
    with open(f, "rb", buffering=0) as fh:
        while fh.read(64 << 20):
            pass
    return f.stat().st_size / (time.perf_counter() - t)


def on_disk(model: torch.nn.Module, args) -> None:
    """The experts left on disk (``disk-compute``), loaded and run by fitmap: bytes read per token against the
    routed experts' bytes, seconds per token against the disk's cold read bound."""
    from pathlib import Path

    from fitmap.model.inventory import inventory
    from fitmap.model.skeleton import skeleton
    from fitmap.planning.experts import DISK_COMPUTE
    from fitmap.planning.plan import Plan
    from fitmap.planning.workload import Workload
    from fitmap.runtime import loader, routed

    directory = Path(args.disk)
    model.save_pretrained(directory)
    sk = skeleton(inventory(directory), getattr(torch, args.dtype))
    device_map: dict[str, int | str] = {}
    for u in sk.units:  # every unit in RAM, the routed experts of each MoE block on disk
        device_map[u.name] = "cpu"
        if u.experts:
            device_map[str(u.experts)] = DISK_COMPUTE
    experts = [str(u.experts) for u in sk.units if u.experts]
    plan = Plan(str(directory), True, "balanced", args.dtype, "analytic", Workload(), device_map, ())
    del model
    rate = _cold_read_rate(directory)
    with loader.load(directory, plan, progress=False) as lm:
        blocks = [lm.model.get_submodule(e) for e in experts]
        per_expert = sum(p[0].numel() * p.element_size() for p in blocks[0].parameters())
        torch.set_num_threads(args.threads or 1)
        routed_bytes = [0]

        def count(module, args_, kwargs):
            index = kwargs.get("top_k_index", args_[1] if len(args_) > 1 else None)
            routed_bytes[0] += len(set(index.flatten().tolist())) * per_expert

        for b in blocks:
            b.register_forward_pre_hook(count, with_kwargs=True)
        read = [0]
        original = routed.FromDisk.fetch

        def fetch(self, name, chosen):
            before = self.read_bytes
            out = original(self, name, chosen)
            read[0] += self.read_bytes - before
            return out

        routed.FromDisk.fetch = fetch  # type: ignore[method-assign]
        ids = torch.randint(0, 1024, (1, 8))
        with torch.no_grad():
            out = lm.model(input_ids=ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            seconds, read[0], routed_bytes[0] = 0.0, 0, 0
            for _ in range(args.tokens):
                _evict(directory)
                t = time.perf_counter()
                out = lm.model(input_ids=token, past_key_values=cache, use_cache=True)
                seconds += time.perf_counter() - t
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        routed.FromDisk.fetch = original  # type: ignore[method-assign]
    layer_bytes = per_expert * args.experts * len(experts)
    print(
        f"shape: {args.layers} MoE layers x {args.experts} experts (top {args.top_k}), hidden {args.hidden}, expert "
        f"{args.expert_size}, {args.dtype}; experts on disk {layer_bytes / 2**30:.2f} GiB; threads "
        f"{torch.get_num_threads()}"
    )
    print(f"disk cold read (the largest shard after fadvise DONTNEED): {rate / 1e9:.2f} GB/s")
    per_token, routed_per_token = read[0] / args.tokens, routed_bytes[0] / args.tokens
    bound = per_token / rate
    print(
        f"decode, experts read from disk per routed expert: {per_token / 2**20:.1f} MiB read per token, routed "
        f"experts {routed_per_token / 2**20:.1f} MiB ({per_token / routed_per_token:.2f}x), of "
        f"{layer_bytes / 2**20:.0f} MiB in the layers; {seconds / args.tokens * 1e3:.0f} ms per token, "
        f"disk bound {bound * 1e3:.0f} ms ({bound / (seconds / args.tokens):.0%})"
    )


def packed_mxfp4(args) -> None:
    """gpt-oss-shaped MXFP4 experts kept packed in RAM by fitmap (``cpu-compute``), timed per token."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from fitmap.model.inventory import inventory
    from fitmap.model.skeleton import skeleton
    from fitmap.planning.calibrate import cpu_unpack_rate
    from fitmap.planning.experts import CPU_COMPUTE
    from fitmap.planning.plan import Plan
    from fitmap.planning.workload import Workload
    from fitmap.runtime import loader

    directory = Path(args.mxfp4)
    layers, experts, top, size = 2, 32, 4, 2880
    cfg = transformers.GptOssConfig(
        hidden_size=size,
        intermediate_size=size,
        num_hidden_layers=layers,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=experts,
        num_experts_per_tok=top,
        vocab_size=1024,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = transformers.AutoModelForCausalLM.from_config(cfg).state_dict()
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for key, t in shapes.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, n_in, n_out = t.shape
            tensors[f"{key}_blocks"] = torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
            tensors[f"{key}_scales"] = torch.randint(118, 123, (e, n_out, n_in // 32), dtype=torch.uint8, generator=g)
        elif "rotary" not in key:
            tensors[key] = (torch.randn(t.shape, generator=g) * 0.02).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    del tensors
    config = cfg.to_dict() | {
        "dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        },
    }
    (directory / "config.json").write_text(json.dumps(config))
    sk = skeleton(inventory(directory), torch.bfloat16)
    device_map: dict[str, int | str] = {}
    for u in sk.units:
        device_map[u.name] = "cpu"
        if u.experts:
            device_map[str(u.experts)] = CPU_COMPUTE
    plan = Plan(str(directory), True, "balanced", "bfloat16", "analytic", Workload(), device_map, ())
    torch.set_num_threads(args.threads or torch.get_num_threads())
    unpack = cpu_unpack_rate()
    rate = ram_read_rate()
    per_expert_values = 3 * size * size
    with loader.load(directory, plan, progress=False) as lm, torch.no_grad():
        blocks = [lm.model.get_submodule(str(u.experts)) for u in sk.units if u.experts]
        spent, chosen, started = [0.0], [0], {}

        def before(module, args_, kwargs):  # before fitmap's hook (prepended): its unpacking is timed
            index = kwargs.get("router_indices", args_[1] if len(args_) > 1 else None)
            chosen[0] += len(set(index.flatten().tolist()))
            started[id(module)] = time.perf_counter()

        def after(module, args_, output):
            spent[0] += time.perf_counter() - started.pop(id(module))

        for b in blocks:
            b.register_forward_pre_hook(before, with_kwargs=True, prepend=True)
            b.register_forward_hook(after)
        ids = torch.randint(0, 1024, (1, 8))
        out = lm.model(input_ids=ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        spent[0], chosen[0] = 0.0, 0
        for _ in range(args.tokens):
            out = lm.model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    per_token = spent[0] / args.tokens
    values = chosen[0] / args.tokens * per_expert_values
    packed_bytes = values * 17 / 32
    print(
        f"shape: gpt-oss-120b's experts (hidden {size}, experts of {size}), {layers} layers x {experts} experts (top "
        f"{top}), MXFP4 kept packed in RAM; threads {torch.get_num_threads()}"
    )
    print(f"RAM read bandwidth: {rate / 1e9:.1f} GB/s; MXFP4 unpacking (calibrate's measure): {unpack / 1e9:.2f} G/s")
    print(
        f"decode: {values / 1e6:.0f} M values ({packed_bytes / 2**20:.0f} MiB packed) of routed experts per token, "
        f"{per_token * 1e3:.0f} ms in the experts; RAM bound {packed_bytes / rate * 1e3:.1f} ms, unpacking bound "
        f"{values / unpack * 1e3:.0f} ms ({values / unpack / per_token:.0%} of the time)"
    )


if __name__ == "__main__":
    main()
