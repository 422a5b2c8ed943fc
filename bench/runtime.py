"""Runtime: start-up, decode with a disk tier, and hook overhead; fitmap vs its anchors in one run.

Three benchmarks, each printed as a markdown table:

* ``startup`` — process start to the first generated token, every variant in a
  fresh child process: ``fitmap.loader.load`` with an all-``cpu`` plan vs
  transformers ``from_pretrained(device_map=<same map>)``, both then
  ``generate(max_new_tokens=1)``. Cold (checkpoint evicted from the page cache
  with ``POSIX_FADV_DONTNEED``) and warm. Peak RSS of the child is split into
  anonymous memory (copies) and file pages (mmap'd checkpoint, shared with the
  page cache), sampled every 5 ms; the bound is checkpoint size / cold read rate.
* ``decode`` — a third of the decoder layers on the ``disk`` tier, the files that
  hold them evicted before every token (a machine whose RAM cannot keep them):
  fitmap with read-ahead on and off vs transformers/accelerate disk offload
  (``from_pretrained(device_map=..., offload_folder=...)``: ``AlignDevicesHook``
  reading the original safetensors). All variants are loaded in one process and
  run token by token in rotation, together with a plain sequential read of the
  same evicted files, so each round compares them at the disk's current speed
  (this machine's virtual disk moves between ~0.7 and ~2 GB/s).
  Fraction of the disk bound = (disk-tier bytes / cold read rate) / time per token.
* ``hooks`` — per-token overhead of boundary hooks on a small model (8-layer
  tiny Llama, where Python overhead shows): a decode step unhooked vs
  ``fitmap.hooks.attach`` with every unit hooked (and with the second half
  hooked, as on a two-device split) vs accelerate ``dispatch_model`` on the
  same all-cpu map (``force_hooks=True``: ``AlignDevicesHook`` everywhere).
  Median of interleaved runs, the KV cache cropped back after every step.

The checkpoint (random Llama, hidden 2048, 18 layers, GQA 16/4, bf16, one
safetensors shard per layer, 1.89 GB) is written once to
``$TMPDIR/fitmap-bench-runtime``.

    .venv/bin/python bench/runtime.py                 # all three (~6 min)
    .venv/bin/python bench/runtime.py --only decode --tokens 12
"""

from __future__ import annotations

import argparse
import copy
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
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CKPT_VERSION = "llama-h2048-l18-kv4-bf16-v1"
LAYERS = 18
DISK_LAYERS = range(12, 18)          # the last third, where fitmap's planner puts them under a tight --cpu
PROMPT = 16                          # prompt tokens (random ids)
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
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=LAYERS, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(64 << 20, generator=gen) * 0.02).to(torch.bfloat16)   # 128 MiB of noise, sliced per tensor
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for i, (key, shape) in enumerate(shapes.items()):
        n = shape.numel()
        start = (i * 7919 * 4096) % (pool.numel() - n)
        t = torch.ones(shape, dtype=torch.bfloat16) if key.endswith("norm.weight") else pool[start:start + n].view(shape).clone()
        shards.setdefault(_shard_name(key), {})[key] = t
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum((path / f).stat().st_size for f in shards)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    cfg.save_pretrained(path)
    for f in shards:   # written pages are dirty: DONTNEED cannot drop them until they reach the disk
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
    from fitmap.devices import make_machine
    from fitmap.workload import Workload

    disk_dir = path.parent / "offload"
    disk_dir.mkdir(exist_ok=True)
    req = pipeline.PlanRequest(str(path), make_machine(None, 16 << 30, disk_dir), Workload(1, PROMPT, 64),
                               estimate="analytic")
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
    t_imports = time.time()
    import torch

    if variant == "fitmap":
        from fitmap.loader import load
        from fitmap.plan import Plan

        plan = Plan.load(plan_file)
        t_load = time.time()
        lm = load(path, plan, progress=False)
        model, device = lm.model, lm.input_device
    else:
        import transformers

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
    print(json.dumps(dict(t_imports=t_imports, t_load=t_load, t_gen=t_gen, t_first=t_first,
                          peak_rss=peak.rss, peak_anon=peak.anon, peak_file=peak.file)))


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
    first_token: float      # s, spawn to first token
    imports: float          # s, spawn to imports done
    load: float             # s
    generate: float         # s
    peak_rss: int
    peak_anon: int
    peak_file: int
    maxrss: int             # bytes, getrusage of the child (kernel's high-water mark)


def run_startup_child(variant: str, path: Path, plan_file: Path, cold: bool) -> Startup:
    if cold:
        evict(shards(path))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--child-startup", variant, str(path), str(plan_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out, err = proc.communicate()
    usage = resource_of(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} child failed:\n{err[-3000:]}")
    r = json.loads(out.strip().splitlines()[-1])
    return Startup(variant, "cold" if cold else "warm", r["t_first"] - t0, r["t_load"] - t0,
                   r["t_gen"] - r["t_load"], r["t_first"] - r["t_gen"], r["peak_rss"], r["peak_anon"],
                   r["peak_file"], usage)


def resource_of(proc: subprocess.Popen) -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024   # max over children so far


def bench_startup(path: Path, plan, warm_repeats: int) -> str:
    plan_file = path.parent / "plan-ram.json"
    plan.save(plan_file)
    files = shards(path)
    size = nbytes(files)
    rate, rates = cold_read_rate(files, repeats=3)
    rows: list[Startup] = []
    for variant in ("fitmap", "transformers"):
        rows.append(run_startup_child(variant, path, plan_file, cold=True))
        warm = [run_startup_child(variant, path, plan_file, cold=False) for _ in range(warm_repeats)]
        rows.append(sorted(warm, key=lambda s: s.first_token)[len(warm) // 2])
    lines = [f"Checkpoint {size / GB:.2f} GB in {len(files)} shards; cold sequential read "
             f"{rate / GB:.2f} GB/s (median of {', '.join(f'{r / GB:.2f}' for r in rates)}): "
             f"bound (file size / cold read rate) = **{size / rate:.2f} s** cold.",
             "",
             "| variant | page cache | start → first token | of which imports | load | generate(1) "
             "| peak RSS | peak anon (copies) | peak file-backed | RSS ÷ checkpoint |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(f"| {s.variant} | {s.cache} | {s.first_token:.2f} s | {s.imports:.2f} s | {s.load:.2f} s "
                     f"| {s.generate:.2f} s | {s.peak_rss / GB:.2f} GB | {s.peak_anon / GB:.2f} GB "
                     f"| {s.peak_file / GB:.2f} GB | {s.peak_rss / size:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 2. decode with a disk tier
class Decoder:
    """One model decoding token by token from a fixed prompt; ``step()`` times one token."""

    def __init__(self, name: str, model, device, evicts: list[Path], close=lambda: None,
                 threads: int | None = None) -> None:
        import torch
        from transformers import DynamicCache

        self.name, self.model, self.device, self.evicts, self.close = name, model, device, evicts, close
        self.threads = threads      # torch intra-op threads during this model's steps (None: as set)
        self.times: list[float] = []
        with torch.no_grad():
            self.cache = DynamicCache(config=model.config)
            out = model(input_ids=prompt_ids().to(device), past_key_values=self.cache, use_cache=True)
        self.token = out.logits[:, -1:].argmax(-1)
        self.tokens = [int(self.token)]

    def step(self) -> float:
        import torch

        evict(self.evicts)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or threads)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True)
            self.token = out.logits[:, -1:].argmax(-1)
        elapsed = time.perf_counter() - start
        torch.set_num_threads(threads)
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

    from fitmap.loader import load

    dfiles = disk_shards(path)
    dbytes = nbytes(dfiles)
    offload_dir = path.parent / "accelerate-offload"
    decoders = []
    threads = torch.get_num_threads()
    for readahead, n in ((True, None), (False, None), (True, max(1, threads - 1))):
        lm = load(path, plan, readahead=readahead, progress=False)
        name = f"fitmap, read-ahead {'on' if readahead else 'off'}" + (f", {n} torch thread(s)" if n else "")
        decoders.append(Decoder(name, lm.model, lm.input_device, dfiles, lm.close, threads=n))
    acc = transformers.AutoModelForCausalLM.from_pretrained(path, device_map=plan.device_map, dtype=torch.bfloat16,
                                                            offload_folder=str(offload_dir))
    afiles = accelerate_files(acc)
    decoders.append(Decoder("accelerate disk offload (transformers from_pretrained)", acc, torch.device("cpu"),
                            afiles or dfiles))
    # every variant evicts every disk file, so none finds another's pages
    union = sorted(set(dfiles) | set(afiles))
    for d in decoders:
        d.evicts = union
    evict(union)
    left = cached_fraction(union)
    reads = []
    for r in range(tokens + 1):
        order = decoders[r % len(decoders):] + decoders[:r % len(decoders)]
        for d in order:
            t = d.step()
            if r:                       # round 0 warms allocator and caches; not counted
                d.times.append(t)
        evict(union)
        t_read = read_seconds(dfiles)
        if r:
            reads.append(t_read)
    same = len({tuple(d.tokens) for d in decoders}) == 1
    t_bound = statistics.median(reads)
    lines = [f"Disk tier: layers {DISK_LAYERS.start}-{DISK_LAYERS.stop - 1} of {LAYERS}, {len(dfiles)} shards, "
             f"{dbytes / GB:.3f} GB read per token; accelerate reads "
             f"{', '.join(sorted({f.parent.name for f in afiles})) or '?'}/ "
             f"({len(afiles)} files: {'the original shards' if set(afiles) == set(dfiles) else 'offload files'}). "
             f"Page cache left after eviction: {left:.1%}. "
             f"Plain cold read of the disk tier in the same rounds: median {t_bound:.3f} s "
             f"({dbytes / t_bound / GB:.2f} GB/s; range {min(reads):.3f}-{max(reads):.3f} s). "
             f"{tokens} tokens per variant, interleaved; same tokens from all: {same}. "
             f"torch threads {threads}; load average {_load()}.",
             "",
             "| runtime | time per token (median) | tok/s | disk-tier GB/s | fraction of disk bound |",
             "|---|---|---|---|---|"]
    for d in decoders:
        t = statistics.median(d.times)
        lines.append(f"| {d.name} | {t:.3f} s | {1 / t:.2f} | {dbytes / t / GB:.2f} | {t_bound / t:.0%} |")
    lines.append(f"| (plain sequential read of the same files) | {t_bound:.3f} s | {1 / t_bound:.2f} "
                 f"| {dbytes / t_bound / GB:.2f} | 100% |")
    for d in decoders:
        d.close()
    del decoders, acc
    gc.collect()
    return "\n".join(lines)


def bench_compute_floor(path: Path, ram_plan, steps: int = 6) -> str:
    """Decode step with everything in RAM (warm), the compute the disk tier adds I/O to."""
    from fitmap.loader import load

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


def bench_hooks(rounds: int) -> str:
    import torch
    from accelerate import dispatch_model
    from transformers import DynamicCache

    from fitmap import hooks

    base = tiny_llama()
    units = ["model.embed_tokens", "model.rotary_emb"] + [f"model.layers.{i}" for i in range(8)] + \
            ["model.norm", "lm_head"]
    cpu, other = torch.device("cpu"), torch.device("cpu", 1)   # "cpu:1": a second device label, same memory
    variants: dict[str, tuple[object, int]] = {"unsplit (no hooks)": (copy.deepcopy(base), 0)}

    everything = copy.deepcopy(base)   # first unit on the other label: every later unit is hooked
    n = len(hooks.attach(everything, {u: (other if i == 0 else cpu) for i, u in enumerate(units)}, cpu).hooked)
    variants[f"fitmap hooks, every unit hooked, inputs in place ({n} units)"] = (everything, n)

    moving = copy.deepcopy(base)       # every unit on the other label: every hooked call copies its inputs
    n = len(hooks.attach(moving, {u: other for u in units}, cpu).hooked)
    variants[f"fitmap hooks, every unit hooked, inputs copied each time ({n} units)"] = (moving, n)

    acc = dispatch_model(copy.deepcopy(base), device_map={u: "cpu" for u in units}, force_hooks=True)
    n = sum(1 for m in acc.modules() if hasattr(m, "_hf_hook"))
    variants[f"accelerate dispatch_model, same map ({n} modules)"] = (acc, n)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model gains nothing from a second thread; one is steadier on a busy machine
    ids = prompt_ids() % 512
    state = {}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu_time: dict[str, list[float]] = {name: [] for name in variants}
    items = list(variants.items())
    with torch.no_grad():
        for name, (model, _) in items:
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            state[name] = (cache, out.logits[:, -1:].argmax(-1))
        for r in range(rounds + 50):
            for name, (model, _) in items[r % len(items):] + items[:r % len(items)]:
                cache, token = state[name]
                c0, t0 = time.thread_time(), time.perf_counter()
                model(input_ids=token, past_key_values=cache, use_cache=True)
                t1, c1 = time.perf_counter(), time.thread_time()
                cache.crop(-1)   # back to the prompt: every step sees the same cache
                if r >= 50:
                    wall[name].append(t1 - t0)
                    cpu_time[name].append(c1 - c0)
    torch.set_num_threads(threads)
    base_wall = statistics.median(wall["unsplit (no hooks)"])
    base_cpu = statistics.median(cpu_time["unsplit (no hooks)"])
    lines = [f"Tiny Llama (8 layers, hidden 64, fp32), one decode step at {PROMPT} cached tokens, "
             f"1 torch thread; median of {rounds} interleaved rounds; wall time, and the CPU time of the "
             f"calling thread (all the work with 1 torch thread; not inflated when another process takes "
             f"the core). Load average {_load()}.",
             "",
             "| variant | step, wall | overhead | step, thread CPU | overhead | per hooked module (CPU) |",
             "|---|---|---|---|---|---|"]
    for name, (_, n) in items:
        tw, tc = statistics.median(wall[name]), statistics.median(cpu_time[name])
        ow = f"{(tw - base_wall) / base_wall:+.1%}" if n else "—"
        oc = f"{(tc - base_cpu) / base_cpu:+.1%}" if n else "—"
        per = f"{(tc - base_cpu) / n * 1e6:+.2f} µs" if n else "—"
        lines.append(f"| {name} | {tw * 1e3:.3f} ms | {ow} | {tc * 1e3:.3f} ms | {oc} | {per} |")
    return "\n".join(lines)


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="startup,decode,hooks", help="comma-separated: startup, decode, hooks")
    ap.add_argument("--tokens", type=int, default=10, help="decode: tokens per variant (after one warm-up)")
    ap.add_argument("--warm", type=int, default=3, help="startup: warm runs per variant (median shown)")
    ap.add_argument("--rounds", type=int, default=2000, help="hooks: interleaved decode steps per variant")
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
        print(bench_hooks(args.rounds), "\n", flush=True)
    print(f"(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
