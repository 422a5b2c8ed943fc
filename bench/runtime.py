"""Runtime: start-up, decode with a disk tier, and hook overhead; fitmap vs its anchors in one run.

Three benchmarks, each printed as a markdown table:

* ``startup`` — process start to the first generated token, every variant in a
  fresh child process: ``fitmap.runtime.loader.load`` with an all-``cpu`` plan vs
  transformers ``from_pretrained(device_map=<same map>)``, both then
  ``generate(max_new_tokens=1)``. Cold (checkpoint evicted from the page cache
  with ``POSIX_FADV_DONTNEED``) and warm. Peak RSS of the child (``ru_maxrss``
  from ``wait4``), and its peaks of anonymous memory (copies) and file pages
  (the mmap'd checkpoint, shared with the page cache), sampled every 5 ms.
  The bound is checkpoint size / cold sequential read rate.
* ``decode`` — a third of the decoder layers on the ``disk`` tier, the files that
  hold them evicted before every token (a machine whose RAM cannot keep them):
  fitmap with read-ahead on and off vs transformers/accelerate disk offload
  (``from_pretrained(device_map=..., offload_folder=...)``: ``AlignDevicesHook``
  reading the original safetensors). All variants are loaded in one process and
  step token by token in rotation; each round also times a plain sequential read
  of the same evicted files, and fitmap's own disk reader with no compute, so
  every variant is compared at the disk's current speed (this machine's virtual
  disk moves between ~0.7 and ~2 GB/s from one second to the next).
  Fraction of the disk bound = (disk-tier bytes / cold read rate) / time per token.
* ``hooks`` — per-token overhead of boundary hooks on a small model (8-layer
  tiny Llama, where Python overhead shows): a decode step unhooked vs
  ``fitmap.dispatch.hooks.attach`` (every unit hooked; a two-device split; every input
  copied) vs accelerate ``dispatch_model`` on the same all-cpu map
  (``force_hooks=True``: ``AlignDevicesHook`` everywhere), and a no-op torch
  hook on the same units as the floor. One model instance, hooks attached and
  removed per block of steps, blocks interleaved; medians of wall and thread CPU time.

All forwards run under ``torch.no_grad()``: fitmap's boundary hooks fail under
``torch.inference_mode()`` (see docs/benchmarks.md, "Runtime").

The checkpoint (random Llama, hidden 2048, 18 layers, GQA 16/4, bf16, one
safetensors shard per layer, 1.89 GB) is written once to
``$TMPDIR/fitmap-bench-runtime`` (about 15 s).

    .venv/bin/python bench/runtime.py                 # all three, ~3 min
    .venv/bin/python bench/runtime.py --only decode --tokens 12
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fitmap.model.compat import cache_kwarg  # noqa: E402

CKPT_VERSION = "llama-h2048-l18-kv4-bf16-v1"
LAYERS = 18
DISK_LAYERS = range(12, 18)  # the last third, where fitmap's planner puts them under a tight --cpu
PROMPT = 16  # prompt tokens (random ids)
GB = 1e9


# --------------------------------------------------------------------------- checkpoint
def checkpoint(root: Path) -> Path:
    """A random-weight Llama checkpoint, one shard per decoder layer (written once)."""
    path = root / "ckpt"
    stamp = path / "VERSION"
    if stamp.exists() and stamp.read_text() == CKPT_VERSION:
        return path
    import torch
    import transformers
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=LAYERS,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(64 << 20, generator=gen) * 0.02).to(torch.bfloat16)  # 128 MiB of noise, sliced per tensor
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for i, (key, shape) in enumerate(shapes.items()):
        n = shape.numel()
        start = (i * 7919 * 4096) % (pool.numel() - n)
        t = (
            torch.ones(shape, dtype=torch.bfloat16)
            if key.endswith("norm.weight")
            else pool[start : start + n].view(shape).clone()
        )
        shards.setdefault(_shard_name(key), {})[key] = t
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum((path / f).stat().st_size for f in shards)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    cfg.save_pretrained(path)
    for f in shards:  # written pages are dirty: DONTNEED cannot drop them until they reach the disk
        fd = os.open(path / f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    stamp.write_text(CKPT_VERSION)
    return path


def _shard_name(key: str) -> str:
    if key.startswith("model.layers."):
        return f"model-layer-{int(key.split('.')[2]):02d}.safetensors"
    return "model-embed.safetensors" if "embed_tokens" in key else "model-head.safetensors"


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def disk_shards(path: Path) -> list[Path]:
    return [path / f"model-layer-{i:02d}.safetensors" for i in DISK_LAYERS]


def nbytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


# --------------------------------------------------------------------------- page cache
def evict(files: list[Path]) -> None:
    """Drop ``files`` from the page cache (pages mapped by a live process stay)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def cached_fraction(files: list[Path]) -> float:
    """Fraction of ``files``' pages in the page cache (mincore), to check that eviction worked."""
    page = mmap.PAGESIZE
    resident = total = 0
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    for f in files:
        size = f.stat().st_size
        pages = (size + page - 1) // page
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            vec = ctypes.create_string_buffer(pages)
            _libc.mincore(addr, size, vec)
            _libc.munmap(addr, size)
        finally:
            os.close(fd)
        resident += sum(b & 1 for b in vec.raw)
        total += pages
    return resident / total


def read_seconds(files: list[Path], block: int = 16 << 20) -> float:
    """Wall time of a plain sequential read of ``files`` (``readinto`` a 16 MiB buffer)."""
    buf = memoryview(bytearray(block))
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - start


def read_seconds_direct(files: list[Path], block: int = 128 << 20) -> float:
    """Wall time of a plain sequential ``O_DIRECT`` read of ``files`` (128 MiB requests into a
    page-aligned buffer): the disk's rate with no page cache in the way and deep requests (this
    VM's disk serves a 16 MiB direct read at about half the rate of a 128 MiB one)."""
    buf = mmap.mmap(-1, block)  # anonymous mappings are page-aligned
    view = memoryview(buf)
    start = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        try:
            offset = 0
            while True:
                n = os.preadv(fd, [view], offset)
                offset += n
                if n < block:
                    break
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - start
    view.release()
    buf.close()
    return elapsed


def cold_read_rate(files: list[Path], repeats: int = 3) -> tuple[float, list[float]]:
    """Median bytes/s of plain sequential reads of ``files``, each after eviction."""
    rates = []
    for _ in range(repeats):
        evict(files)
        rates.append(nbytes(files) / read_seconds(files))
    return statistics.median(rates), rates


# --------------------------------------------------------------------------- plans
def plans(path: Path) -> tuple[object, object]:
    """(all-cpu plan, the same with DISK_LAYERS on the disk tier)."""
    from fitmap import pipeline
    from fitmap.planning.devices import make_machine
    from fitmap.planning.workload import Workload

    disk_dir = path.parent / "offload"
    disk_dir.mkdir(exist_ok=True)
    req = pipeline.PlanRequest(
        str(path), make_machine(None, 16 << 30, disk_dir), Workload(1, PROMPT, 64), estimate="analytic"
    )
    ram = pipeline.plan(req)
    assert set(ram.device_map.values()) == {"cpu"}, ram.device_map
    disk = dict(ram.device_map)
    for i in DISK_LAYERS:
        disk[f"model.layers.{i}"] = "disk"
    return ram, replace(ram, device_map=disk)


def prompt_ids():
    import torch

    return torch.randint(3, 32000, (1, PROMPT), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- 1. start-up
def child_startup(variant: str, path: str, plan_file: str) -> None:
    """In a fresh process: load, generate one token, print timings and memory as JSON."""
    peak = _MemSampler()
    peak.start()
    import torch
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401  (both load it; imported here, not timed as load)

    if variant == "fitmap":
        from fitmap.planning.plan import Plan
        from fitmap.runtime.loader import load

        plan = Plan.load(plan_file)
        t_load = time.time()
        lm = load(path, plan, progress=False)
        model, device = lm.model, lm.input_device
    else:
        device_map = json.loads(Path(plan_file).read_text())["device_map"]
        t_load = time.time()
        model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=torch.bfloat16)
        device = torch.device("cpu")
    t_gen = time.time()
    with torch.no_grad():
        out = model.generate(prompt_ids().to(device), max_new_tokens=1, do_sample=False)
    t_first = time.time()
    assert out.shape[1] == PROMPT + 1
    peak.stop()
    print(
        json.dumps(
            {
                "t_load": t_load,
                "t_gen": t_gen,
                "t_first": t_first,
                "peak_rss": peak.rss,
                "peak_anon": peak.anon,
                "peak_file": peak.file,
            }
        )
    )


class _MemSampler(threading.Thread):
    """Peaks of RSS, anonymous and file-backed resident memory of this process (/proc, every 5 ms)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.rss = self.anon = self.file = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.sample()

    def sample(self) -> None:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                    k, v = line.split(":")
                    fields[k] = int(v.split()[0]) * 1024
        self.rss = max(self.rss, fields["VmRSS"])
        self.anon = max(self.anon, fields["RssAnon"])
        self.file = max(self.file, fields["RssFile"] + fields.get("RssShmem", 0))

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.sample()


@dataclass
class Startup:
    variant: str
    cache: str
    first_token: float  # s, spawn to first token
    imports: float  # s, spawn to imports done (python, torch, transformers + llama, fitmap)
    load: float  # s
    generate: float  # s
    peak_rss: int
    peak_anon: int
    peak_file: int
    maxrss: int  # bytes, getrusage of the child (kernel's high-water mark)


def run_startup_child(variant: str, path: Path, plan_file: Path, cold: bool) -> Startup:
    if cold:
        evict(shards(path))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child-startup", variant, str(path), str(plan_file)],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            text=True,
        )
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss: its peak RSS)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{variant} child failed:\n{err.read()[-3000:]}")
    r = json.loads(out.strip().splitlines()[-1])
    return Startup(
        variant,
        "cold" if cold else "warm",
        r["t_first"] - t0,
        r["t_load"] - t0,
        r["t_gen"] - r["t_load"],
        r["t_first"] - r["t_gen"],
        r["peak_rss"],
        r["peak_anon"],
        r["peak_file"],
        usage.ru_maxrss * 1024,
    )


def bench_startup(path: Path, plan, warm_repeats: int) -> str:
    plan_file = path.parent / "plan-ram.json"
    plan.save(plan_file)
    files = shards(path)
    size = nbytes(files)
    rate, rates = cold_read_rate(files, repeats=3)
    variants = ("fitmap", "transformers")
    cold = {v: run_startup_child(v, path, plan_file, cold=True) for v in variants}
    warm: dict[str, list[Startup]] = {v: [] for v in variants}
    for i in range(warm_repeats):  # interleaved, so both see the same machine
        for v in variants[i % 2 :] + variants[: i % 2]:
            warm[v].append(run_startup_child(v, path, plan_file, cold=False))
    rows: list[Startup] = []
    for v in variants:
        rows += [cold[v], sorted(warm[v], key=lambda s: s.first_token)[len(warm[v]) // 2]]
    lines = [
        (
            f"Checkpoint {size / GB:.2f} GB in {len(files)} shards; cold sequential read "
            f"{rate / GB:.2f} GB/s (median of {', '.join(f'{r / GB:.2f}' for r in rates)}): "
            f"bound (file size / cold read rate) = **{size / rate:.2f} s** cold. "
            f"Warm: median of {warm_repeats} runs by time to first token."
        ),
        "",
        (
            "| variant | page cache | start → first token | python + imports | load | generate(1) "
            "| peak RSS (ru_maxrss) | peak anon (copies) | peak file-backed (mmap) | peak RSS ÷ checkpoint |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        lines.append(
            f"| {s.variant} | {s.cache} | {s.first_token:.2f} s | {s.imports:.2f} s | {s.load:.2f} s "
            f"| {s.generate:.2f} s | {s.maxrss / GB:.2f} GB | {s.peak_anon / GB:.2f} GB "
            f"| {s.peak_file / GB:.2f} GB | {s.maxrss / size:.2f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- 2. decode with a disk tier
class Decoder:
    """One model decoding token by token from a fixed prompt; ``step()`` times one token."""

    def __init__(self, name: str, model, device, evicts: list[Path], close=lambda: None) -> None:
        import torch
        from transformers import DynamicCache

        self.name, self.model, self.device, self.evicts, self.close = name, model, device, evicts, close
        self.times: list[float] = []
        with torch.no_grad():
            self.cache = DynamicCache(config=model.config)
            out = model(input_ids=prompt_ids().to(device), **{cache_kwarg(model): self.cache}, use_cache=True)
        self.token = out.logits[:, -1:].argmax(-1)
        self.tokens = [int(self.token)]

    def step(self) -> float:
        import torch

        evict(self.evicts)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model(input_ids=self.token, **{cache_kwarg(self.model): self.cache}, use_cache=True)
            self.token = out.logits[:, -1:].argmax(-1)
        elapsed = time.perf_counter() - start
        self.tokens.append(int(self.token))
        return elapsed


def accelerate_files(model) -> list[Path]:
    """The files accelerate's offload hooks read (its weights_map index), as it was told."""
    files = set()
    for m in model.modules():
        hook = getattr(m, "_hf_hook", None)
        wmap = getattr(hook, "weights_map", None)
        index = getattr(getattr(wmap, "dataset", None), "index", None) or getattr(wmap, "index", None)
        if index:
            for info in index.values():
                if info.get("safetensors_file"):
                    files.add(Path(info["safetensors_file"]))
        folder = getattr(getattr(wmap, "dataset", None), "save_folder", None)
        if folder:
            files.update(Path(folder).glob("*.dat"))
    return sorted(files)


def bench_decode(path: Path, plan, tokens: int) -> str:
    import torch
    import transformers

    from fitmap.runtime.loader import load

    dfiles = disk_shards(path)
    dbytes = nbytes(dfiles)
    decoders = []
    for readahead in (True, False):
        lm = load(path, plan, readahead=readahead, progress=False)
        decoders.append(
            Decoder(f"fitmap, read-ahead {'on' if readahead else 'off'}", lm.model, lm.input_device, dfiles, lm.close)
        )
    reader = fitmap_disk_reader(lm)
    acc = transformers.AutoModelForCausalLM.from_pretrained(
        path, device_map=plan.device_map, dtype=torch.bfloat16, offload_folder=str(path.parent / "accelerate-offload")
    )
    afiles = accelerate_files(acc)
    decoders.append(
        Decoder("accelerate disk offload (transformers from_pretrained)", acc, torch.device("cpu"), afiles or dfiles)
    )
    union = sorted(set(dfiles) | set(afiles))  # every variant evicts every disk file: none finds another's pages
    for d in decoders:
        d.evicts = union
    evict(union)
    left = cached_fraction(union)
    plain, direct, fitmap_read = [], [], []
    for r in range(tokens + 1):
        for d in decoders[r % len(decoders) :] + decoders[: r % len(decoders)]:
            t = d.step()
            if r:  # round 0 warms allocator and caches; not counted
                d.times.append(t)
        evict(union)
        t_plain = read_seconds(dfiles)
        t_direct = read_seconds_direct(dfiles)
        evict(union)
        t_fitmap = reader()
        if r:
            plain.append(t_plain)
            direct.append(t_direct)
            fitmap_read.append(t_fitmap)
    same = len({tuple(d.tokens) for d in decoders}) == 1
    best = [min(p, q) for p, q in zip(plain, direct)]  # the disk's rate: the faster plain read of the round
    t_bound = statistics.median(best)
    lines = [
        (
            f"Disk tier: layers {DISK_LAYERS.start}-{DISK_LAYERS.stop - 1} of {LAYERS} ({len(dfiles)} shards, "
            f"{dbytes / GB:.3f} GB read per token); accelerate reads "
            f"{'the same original shards' if set(afiles) == set(dfiles) else f'{len(afiles)} offload files'} "
            f"(transformers 5 indexes the safetensors in place, no .dat rewrite). Page cache left after "
            f"eviction: {left:.1%}. {tokens} tokens per variant in rotation; each round also times plain "
            f"sequential reads of the evicted files, buffered (`readinto`, 16 MiB: median "
            f"{statistics.median(plain):.3f} s) and `O_DIRECT` (128 MiB requests: median "
            f"{statistics.median(direct):.3f} s); "
            f"the bound is the faster of the two in each round — median {t_bound:.3f} s = "
            f"{dbytes / t_bound / GB:.2f} GB/s (range {dbytes / max(best) / GB:.2f}-"
            f"{dbytes / min(best) / GB:.2f} GB/s). Same tokens from all: {same}. "
            f"torch threads {torch.get_num_threads()}; load average {_load()}."
        ),
        "",
        (
            "| runtime | time per token (median) | tok/s | disk-tier GB/s | fraction of disk bound "
            "| median of per-round fractions |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for d in decoders:
        t = statistics.median(d.times)
        per_round = statistics.median(p / x for p, x in zip(best, d.times))
        lines.append(
            f"| {d.name} | {t:.3f} s | {1 / t:.2f} | {dbytes / t / GB:.2f} | {t_bound / t:.0%} | {per_round:.0%} |"
        )
    t_fit = statistics.median(fitmap_read)
    lines.append(
        f"| (fitmap's disk reader alone, no compute: positioned reads into reused buffers) | {t_fit:.3f} s "
        f"| — | {dbytes / t_fit / GB:.2f} | {t_bound / t_fit:.0%} "
        f"| {statistics.median(p / x for p, x in zip(best, fitmap_read)):.0%} |"
    )
    for name, times in (("buffered `readinto`", plain), ("`O_DIRECT`", direct)):
        t = statistics.median(times)
        lines.append(
            f"| (plain sequential read of the same files, {name}) | {t:.3f} s | — | {dbytes / t / GB:.2f} "
            f"| {t_bound / t:.0%} | {statistics.median(p / x for p, x in zip(best, times)):.0%} |"
        )
    for d in decoders:
        d.close()
    del decoders, acc
    gc.collect()
    return "\n".join(lines)


def fitmap_disk_reader(lm):
    """Seconds for fitmap's own disk-unit readers to bring every disk unit in once, one after the other
    (what the read-ahead thread runs; reaches into the loaded model's offload state)."""
    slots = lm._offload.streamer.slots
    readers = [s.unit.read for s in slots.values() if s.unit.read is not None]

    def run() -> float:
        start = time.perf_counter()
        for read in readers:
            host = read()
            if hasattr(host, "release"):  # a reused read buffer: give it back
                host.release()
            del host
        return time.perf_counter() - start

    return run


def bench_compute_floor(path: Path, ram_plan, steps: int = 6) -> str:
    """Decode step with everything in RAM (warm), the compute the disk tier adds I/O to."""
    from fitmap.runtime.loader import load

    lm = load(path, ram_plan, progress=False)
    d = Decoder("fitmap, all in RAM", lm.model, lm.input_device, [])
    times = [d.step() for _ in range(steps + 1)][1:]
    lm.close()
    t = statistics.median(times)
    return f"Compute floor (all {LAYERS} layers in RAM, warm): {t:.3f} s per token ({1 / t:.2f} tok/s)."


# --------------------------------------------------------------------------- 3. hook overhead
def tiny_llama(layers: int = 8):
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import config

    cfg = config("llama")
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def hook_variants(model) -> dict[str, tuple[Callable[[], Callable[[], object]], int]]:
    """name -> (attach(): detach callable, modules hooked). All act on the same model instance, so no
    variant gains or loses from where its tensors happen to sit in memory."""
    import torch
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_submodules

    from fitmap.dispatch import hooks

    units = (
        ["model.embed_tokens", "model.rotary_emb"] + [f"model.layers.{i}" for i in range(8)] + ["model.norm", "lm_head"]
    )
    cpu, other = torch.device("cpu"), torch.device("cpu", 1)  # "cpu:1": a second device label (a copy, same RAM)
    at = units.index("model.layers.4")
    fitmap_cases = {  # name: (placement, input device)
        # a two-device split: input side on "cpu:1", layers 4+ on cpu (hooked), logits copied back
        "fitmap, 2-device split at layer 4": ({u: other if i < at else cpu for i, u in enumerate(units)}, other),
        # every unit on "cpu:1", inputs on cpu: every hooked call copies its tensors (the Mover path)
        "fitmap, every unit hooked, inputs copied each time": ({u: other for u in units}, cpu),
    }

    def fitmap_attach(placement, device):
        def attach():
            return hooks.attach(model, placement, device).remove

        return attach

    def in_place_attach():
        # What a split runs on every unit after its first device boundary, with no tensor to move:
        # the model's memo reset and output hook, InputsTo on each unit (its fast path).
        mover = hooks.Mover()
        handles = [model.register_forward_pre_hook(mover.reset)]
        handles += [
            model.get_submodule(u).register_forward_pre_hook(hooks.inputs_to(cpu, mover), with_kwargs=True)
            for u in units
        ]
        handles.append(model.register_forward_hook(hooks.OutputsTo(cpu, mover), always_call=True))
        return lambda: [h.remove() for h in handles]

    def noop_attach():
        handles = [
            model.get_submodule(u).register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True) for u in units
        ]
        return lambda: [h.remove() for h in handles]

    def minimal_attach():
        check = least_checking_hook(cpu)
        handles = [model.get_submodule(u).register_forward_pre_hook(check, with_kwargs=True) for u in units]
        return lambda: [h.remove() for h in handles]

    def accelerate_attach():
        dispatch_model(model, device_map={u: "cpu" for u in units}, force_hooks=True)
        return lambda: remove_hook_from_submodules(model)

    out: dict[str, tuple[Callable[[], Callable[[], object]], int]] = {"unsplit (no hooks)": (lambda: lambda: None, 0)}
    out["fitmap, every unit hooked, inputs in place"] = (in_place_attach, len(units))
    for name, (placement, device) in fitmap_cases.items():
        detach = fitmap_attach(placement, device)()
        out[name] = (fitmap_attach(placement, device), len(hooks.boundary_units(placement, device)))
        detach()
    out["(floor) a no-op torch pre-hook, same units"] = (noop_attach, len(units))
    out["(reference) the least a checking hook does, same units"] = (minimal_attach, len(units))
    detach = accelerate_attach()
    n_acc = sum(1 for m in model.modules() if hasattr(m, "_hf_hook"))
    detach()
    out["accelerate dispatch_model, same map (force_hooks)"] = (accelerate_attach, n_acc)
    return out


def least_checking_hook(device):
    """The least a pre-hook that looks at its inputs can do (the reference row of the hook
    benchmarks): each positional tensor's device, and one look-up per keyword value in a
    table of ids kept across steps; it never moves anything."""
    import torch

    table = {id(None), id(True), id(False)}
    tensor = torch.Tensor

    def check(module, args, kwargs):
        for a in args:
            if isinstance(a, tensor) and a.device != device:
                return None
        for v in kwargs.values():
            if id(v) not in table:
                table.add(id(v))
        return None

    return check


def bench_hooks(blocks: int, steps: int = 10) -> str:
    import logging

    import torch
    from transformers import DynamicCache

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    model = tiny_llama()
    variants = hook_variants(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from a second thread; one is steadier on a busy machine
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu_time: dict[str, list[float]] = {name: [] for name in variants}
    rounds: dict[str, list[float]] = {name: [] for name in variants}  # per round: median thread CPU of the block
    items = list(variants.items())
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt_ids() % 512, **{cache_kwarg(model): cache}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for b in range(blocks):
            for name, (attach, _) in items[b % len(items) :] + items[: b % len(items)]:
                detach = attach()
                for s in range(steps + 1):
                    c0, t0 = time.thread_time(), time.perf_counter()
                    model(input_ids=token, **{cache_kwarg(model): cache}, use_cache=True)
                    t1, c1 = time.perf_counter(), time.thread_time()
                    cache.crop(-1)  # back to the prompt: every step sees the same cache
                    if s:  # the first step after attaching is not counted
                        wall[name].append(t1 - t0)
                        cpu_time[name].append(c1 - c0)
                rounds[name].append(statistics.median(cpu_time[name][-steps:]))
                detach()
    torch.set_num_threads(threads)
    base_wall = statistics.median(wall["unsplit (no hooks)"])
    base_cpu = statistics.median(cpu_time["unsplit (no hooks)"])
    lines = [
        (
            f"Tiny Llama (8 layers, hidden 64, fp32, 12 units), one decode step at {PROMPT} cached tokens, "
            f"1 torch thread, one model instance (hooks attached and removed per block of {steps} steps, "
            f"{blocks} interleaved blocks: {blocks * steps} steps per variant). Medians of wall time and of "
            f"the calling thread's CPU time (all the work with 1 torch thread; not inflated when another "
            f"process takes the core). Paired: in each round every variant runs one block; the median over "
            f"rounds of (variant's block / unsplit block of the same round) - 1, which cancels the machine's "
            f"drift between rounds. Load average {_load()}."
        ),
        "",
        (
            "| variant | modules hooked | step, wall | overhead | step, thread CPU | overhead "
            "| per hooked module (CPU) | paired overhead (CPU) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, n) in items:
        tw, tc = statistics.median(wall[name]), statistics.median(cpu_time[name])
        ow = f"{(tw - base_wall) / base_wall:+.1%}" if n else "—"
        oc = f"{(tc - base_cpu) / base_cpu:+.1%}" if n else "—"
        per = f"{(tc - base_cpu) / n * 1e6:+.2f} µs" if n else "—"
        paired = statistics.median(v / u - 1 for v, u in zip(rounds[name], rounds["unsplit (no hooks)"]))
        pc = f"{paired:+.1%}" if n else "—"
        lines.append(f"| {name} | {n} | {tw * 1e3:.3f} ms | {ow} | {tc * 1e3:.3f} ms | {oc} | {per} | {pc} |")

    def paired(name: str) -> float:
        return statistics.median(v / u - 1 for v, u in zip(rounds[name], rounds["unsplit (no hooks)"]))

    fit = paired("fitmap, every unit hooked, inputs in place")
    lines += [
        "",
        f"Paired, fitmap (every unit, inputs in place) minus the no-op floor: "
        f"{(fit - paired('(floor) a no-op torch pre-hook, same units')) * 100:+.1f} points; minus the "
        f"least checking hook: {(fit - paired('(reference) the least a checking hook does, same units')) * 100:+.1f}"
        " points.",
    ]
    return "\n".join(lines)


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="startup,decode,hooks", help="comma-separated: startup, decode, hooks")
    ap.add_argument("--tokens", type=int, default=10, help="decode: tokens per variant (after one warm-up)")
    ap.add_argument("--warm", type=int, default=3, help="startup: warm runs per variant (median shown)")
    ap.add_argument("--blocks", type=int, default=200, help="hooks: interleaved blocks of 10 steps per variant")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "fitmap-bench-runtime")
    ap.add_argument("--child-startup", nargs=3, metavar=("VARIANT", "PATH", "PLAN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_startup:
        child_startup(*args.child_startup)
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    only = set(args.only.split(","))
    start = time.perf_counter()
    path = checkpoint(args.dir)
    ram, disk = plans(path) if only & {"startup", "decode"} else (None, None)
    if "startup" in only:
        print("### Start-up: process start to first token\n")
        print(bench_startup(path, ram, args.warm), "\n", flush=True)
    if "decode" in only:
        print("### Decode with a third of the layers on the disk tier (evicted before every token)\n")
        print(bench_decode(path, disk, args.tokens), flush=True)
        print("\n" + bench_compute_floor(path, ram), "\n", flush=True)
    if "hooks" in only:
        print("### Per-token hook overhead (tiny model)\n")
        print(bench_hooks(args.blocks), "\n", flush=True)
    print(f"(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
