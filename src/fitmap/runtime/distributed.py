"""One plan across processes (hosts): pipeline stages on torch.distributed, launched by torchrun.

Each rank loads only its stage's units (the others stay on ``meta``). Rank 0 owns the model's own
forward and its generation: tokenizer, processor, images, sampling and stop conditions, so every model
that generates in one process generates here through the same code. On rank 0 a remote stage's units
are replaced by proxies: the first block of a run of blocks on another rank sends its inputs there
(hidden states and the keyword arguments the model hands every block: mask, positions, rotary tables),
that rank runs all of its consecutive blocks with its own KV cache and sends the last one's output
back, and the run's other blocks pass it on; any other unit placed on another rank (the output head)
is called there the same way. Hidden states cross each stage boundary once per step each way.

Which rank runs a unit: with a plan across hosts (``fitmap plan --hosts``), the rank of its GPU's host
(rank r is the r-th host); for a plan of one machine run on several processes (the CPU here), the
decoder blocks are cut into as many contiguous stages as there are ranks, the rest on rank 0.

Messages are Python objects over a gloo group (tensors travel on the CPU); a rank that fails or
disappears ends every rank within ``TIMEOUT`` with one line naming it.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fitmap.errors import FitmapError
from fitmap.planning.plan import Plan
from fitmap.runtime import kv

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("FITMAP_DIST_TIMEOUT", "30")))
# rank 0's messages to the other ranks, one at a time (several threads may send: micro-batches in
# flight); and when it last sent them anything
_SEND = threading.RLock()
_SENT = [time.monotonic()]
KV_NAMES = kv.NAMES


class RankFailed(FitmapError):
    """Another rank of the run failed or is gone."""

    exit_code = 1


class StageDone(FitmapError):
    """A rank > 0 ran its stage until rank 0 finished: nothing to say, exit 0."""

    exit_code = 0


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int

    @classmethod
    def from_env(cls) -> Ranks | None:
        """This process's rank when torchrun started several, else None."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world) if world > 1 else None


def stages(plan: Plan, blocks: list[str], world: int) -> dict[str, int]:
    """Unit -> rank running it."""
    if plan.hosts:
        hosts = list(plan.hosts)
        if len(hosts) != world:
            raise FitmapError(
                f"the plan spans {len(hosts)} hosts ({', '.join(hosts)}) but torchrun started {world} processes: "
                f"start one process per host (--nnodes {len(hosts)} --nproc-per-node 1)"
            )
        return {u: hosts.index(plan.host_of(u)) if plan.host_of(u) else 0 for u in plan.device_map}
    if len(blocks) < world:
        raise FitmapError(f"the model has {len(blocks)} decoder blocks, fewer than the {world} processes started")
    out = {u: 0 for u in plan.device_map}
    for i, b in enumerate(blocks):
        out[b] = i * world // len(blocks)
    return out


def local_plan(plan: Plan, stage: Mapping[str, int], rank: int) -> tuple[Plan, frozenset[str]]:
    """The plan as rank ``rank`` loads it: its GPUs numbered from 0 on its host; the units other ranks
    run named apart (left unloaded)."""
    remote = frozenset(u for u, r in stage.items() if r != rank)
    if not plan.hosts:
        return plan, remote
    first = min(list(plan.hosts.values())[rank])

    def local(dev: int | str) -> int | str:
        return int(dev) - first if isinstance(dev, int) or str(dev).isdigit() else dev

    device_map = {u: (local(d) if u not in remote else "cpu") for u, d in plan.device_map.items()}
    execution = str(local(plan.execution_device)) if rank == 0 else str(local(min(list(plan.hosts.values())[rank])))
    return replace(plan, device_map=device_map, execution_device=execution, devices=(), hosts={}), remote


# --------------------------------------------------------------------------- messages
def init(ranks: Ranks) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)


def _send(obj: Any, dst: int) -> None:
    import torch.distributed as dist

    try:
        dist.send_object_list([tree_map(_to_cpu, obj)], dst=dst)
    except RuntimeError as e:
        raise RankFailed(f"rank {dst} is gone: {_first_line(e)}") from None
    _SENT[0] = time.monotonic()


def _recv(src: int, device: torch.device) -> Any:
    import torch.distributed as dist

    box: list[Any] = [None]
    try:
        dist.recv_object_list(box, src=src)
    except RuntimeError as e:
        raise RankFailed(f"rank {src} is gone: {_first_line(e)}") from None
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, box[0])


def _to_cpu(x: Any) -> Any:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def _first_line(e: BaseException) -> str:
    """The reason in a transport's error, without the source path it starts with."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    line = line.split("] ", 1)[-1] if line.startswith("[") else line
    return line.split(". This is typically")[0][:160]


# --------------------------------------------------------------------------- rank 0: proxies
def _strip_cache(args: tuple, kwargs: dict) -> tuple[dict, tuple[bool, int | None, bool]]:
    """The keyword arguments without the KV cache (each rank keeps its own layers'); whether this
    step starts a generation (rank 0's cache, its own blocks having run first, holds no earlier
    tokens), the number naming rank 0's cache (the other ranks keep one cache per number), and
    whether the blocks keep per-layer tuples (remote code for 4.x: ChatGLM's ``kv_cache``)."""
    fresh, name, legacy = True, None, False
    out = {}
    for k, v in kwargs.items():
        if k in KV_NAMES and (v is None or isinstance(v, str)) and k in kv.PER_LAYER:
            fresh, legacy = v is None, True  # None to start; then what the stage sent back for it
            continue
        if k in KV_NAMES:
            hidden = args[0] if args else kwargs.get("hidden_states")
            length = getattr(v, "get_seq_length", None)
            if callable(length) and isinstance(hidden, torch.Tensor) and hidden.dim() >= 2:
                fresh = int(length()) <= int(hidden.shape[-2])
            if v is not None:
                name = kv.key(v)
            continue
        out[k] = v
    return out, (fresh, name, legacy)


class _Replies:
    """A rank answers its requests in the order they came: each thread waiting for an answer from it
    takes the next one when its request is the oldest unanswered, so several threads may have requests
    in flight to the same rank (one micro-batch's stage runs there while rank 0 computes another's)."""

    def __init__(self) -> None:
        self.order: list[object] = []
        self.turn = threading.Condition()

    def exchange(self, rank: int, message: tuple, device: torch.device) -> Any:
        ticket = object()
        with _SEND:
            with self.turn:
                self.order.append(ticket)
            try:
                _send(message, rank)
            except BaseException:
                self._done(ticket)
                raise
        with self.turn:
            while self.order[0] is not ticket:
                self.turn.wait()
        try:
            return _recv(rank, device)
        finally:
            self._done(ticket)

    def _done(self, ticket: object) -> None:
        with self.turn:
            self.order.remove(ticket)
            self.turn.notify_all()


_REPLIES: dict[int, _Replies] = {}


def _exchange(rank: int, message: tuple, device: torch.device) -> Any:
    return _REPLIES.setdefault(rank, _Replies()).exchange(rank, message, device)


class _RunProxy(nn.Module):
    """Stands for blocks ``names`` of rank ``rank``: the first call of a step runs them all there."""

    def __init__(self, rank: int, names: list[str], device: torch.device, shared: dict) -> None:
        super().__init__()
        self.rank, self.names, self.device, self.shared = rank, names, device, shared

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rest, fresh = _strip_cache(args, kwargs)
        try:
            out = kv.stage_cache_in(_exchange(self.rank, ("run", self.names, args, rest, fresh), self.device), kwargs)
        except RankFailed as e:
            raise _named(e, self.rank, self.names, self.shared) from None
        _outputs(self.shared)[self.names[-1]] = out
        return out


def _outputs(shared: dict) -> dict:
    """This thread's outputs of remote runs (each micro-batch's thread has its own)."""
    local = shared.setdefault("outputs", threading.local())
    if not hasattr(local, "by_name"):
        local.by_name = {}
    return local.by_name


def _named(e: RankFailed, rank: int, names: list[str], shared: dict) -> RankFailed:
    """The failure with the rank's host and stage: what a user reads first."""
    host = shared.get("hosts", {}).get(rank)
    units = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
    where = f"rank {rank}" + (f" on host {host}" if host else "") + f" (stage {units})"
    reason = str(e).split(": ", 1)[-1]
    return RankFailed(f"{where} is gone: {reason}; this run stops (restart every rank)")


class _PassOn(nn.Module):
    """A block of a remote run after its first: what the run returned."""

    def __init__(self, last: str, shared: dict) -> None:
        super().__init__()
        self.last, self.shared = last, shared

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _outputs(self.shared)[self.last]


class _CallProxy(nn.Module):
    """Any other unit run on rank ``rank`` (the output head on the last host)."""

    def __init__(self, rank: int, name: str, device: torch.device) -> None:
        super().__init__()
        self.rank, self.name, self.device = rank, name, device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rest, _ = _strip_cache(args, kwargs)
        try:
            return _exchange(self.rank, ("call", [self.name], args, rest, False), self.device)
        except RankFailed as e:
            raise _named(e, self.rank, [self.name], {}) from None


def attach_proxies(
    model: nn.Module,
    stage: Mapping[str, int],
    blocks: list[str],
    device: torch.device,
    hosts: Mapping[int, str] | None = None,
) -> None:
    """On rank 0: every unit another rank runs replaced by its proxy (see the module's docstring).
    ``hosts``: rank -> host name, for what a failure says."""
    shared: dict = {"hosts": dict(hosts or {})}
    runs: list[tuple[int, list[str]]] = []
    for b in blocks:
        r = stage.get(b, 0)
        if r == 0:
            continue
        if runs and runs[-1][0] == r and blocks.index(runs[-1][1][-1]) == blocks.index(b) - 1:
            runs[-1][1].append(b)
        else:
            runs.append((r, [b]))
    for r, names in runs:
        _put(model, names[0], _RunProxy(r, names, device, shared))
        for n in names[1:]:
            _put(model, n, _PassOn(names[-1], shared))
    for u, r in stage.items():
        if r != 0 and u not in blocks:
            _put(model, u, _CallProxy(r, u, device))


def _put(model: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    if isinstance(parent, nn.ModuleList):
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


class _KeepAlive(threading.Thread):
    """Rank 0: while it sends nothing for a while (idle between requests or turns), a ping to every
    other rank, so that their wait for the next step stays within ``TIMEOUT`` and a silent rank 0
    (hung, or gone) is still noticed there within it."""

    def __init__(self, world: int) -> None:
        super().__init__(name="fitmap-keepalive", daemon=True)
        self.world, self.done = world, threading.Event()

    def run(self) -> None:
        every = TIMEOUT.total_seconds() / 4
        while not self.done.wait(every):
            if time.monotonic() - _SENT[0] < every or not _SEND.acquire(blocking=False):
                continue
            try:
                for r in range(1, self.world):
                    _send(("ping", [], (), {}, None), r)
            except RankFailed:
                return  # the next exchange of the run says which rank, and stops
            finally:
                _SEND.release()


def cache_ops(world: int, stage: Mapping[str, int] | None = None, hosts: Mapping[int, str] | None = None) -> Any:
    """Rank 0: what keeps the other ranks' caches in step with a continuous batch's
    (:class:`fitmap.serve.batcher.Batch`): ``adopt`` a cache as the batch's, ``stack`` one under
    another, ``select`` rows and columns, ``forget`` one. No answer is awaited: each rank applies
    them in order, before the next step it is sent."""

    def send(op: str, *params: Any) -> None:
        with _SEND:
            for r in range(1, world):
                try:
                    _send(("cache", [op], params, {}, None), r)
                except RankFailed as e:
                    raise _gone(e, r, stage, hosts) from None

    return send


def stop(
    world: int, stage: Mapping[str, int] | None = None, hosts: Mapping[int, str] | None = None
) -> RankFailed | None:
    """Rank 0: the others leave their loops. A rank found gone is returned, named with its host and
    stage (``stage``: unit -> rank), for the line the user reads."""
    failed = None
    for r in range(1, world):
        try:
            with _SEND:
                _send(("stop", [], (), {}, False), r)
        except RankFailed as e:
            failed = failed or _gone(e, r, stage, hosts)
    return failed


def _gone(e: RankFailed, rank: int, stage: Mapping[str, int] | None, hosts: Mapping[int, str] | None) -> RankFailed:
    """``e`` named with the rank's host and stage (``stage``: unit -> rank, in pipeline order)."""
    names = [u for u, x in (stage or {}).items() if x == rank] or [f"rank {rank}'s units"]
    return _named(e, rank, names, {"hosts": dict(hosts or {})})


# --------------------------------------------------------------------------- other ranks: a stage
def serve_stage(model: nn.Module, device: torch.device, config: Any) -> None:
    """Ranks > 0: run what rank 0 sends until it says stop. Each of rank 0's caches has one here, for
    this rank's layers: a generation's, or a continuous batch's and the newcomer's being prefilled
    (``cache`` operations keep their rows in step). A new generation drops the caches no batch keeps."""

    caches: dict[Any, Any] = {}
    kept: set[Any] = set()  # a continuous batch's
    cache: Any = None
    while True:
        op, names, args, kwargs, fresh = _recv(0, device)
        if op == "stop":
            return
        if op == "ping":  # rank 0 is idle (a server between requests, a chat waiting for its user)
            continue
        if op == "cache":
            _cache_op(caches, kept, names[0], args)
            continue
        if op == "run":
            new, name, legacy = fresh if isinstance(fresh, tuple) else (fresh, None, False)
            loose = [k for k in caches if k not in kept]
            if not new and name not in caches and len(loose) == 1:  # transformers 4.x rebuilds its cache
                caches[name] = caches.pop(loose[0])  # object from tuples every step: the same generation
            elif new or name not in caches:
                for k in loose:
                    del caches[k]
                caches[name] = {} if legacy else kv.stage_cache(config)  # {}: per layer, its tuple
            cache = caches[name]
        with torch.no_grad():
            if op == "call":
                out = model.get_submodule(names[0])(*args, **kwargs)
            else:
                out = None
                hidden = args[0] if args else kwargs.pop("hidden_states")
                rest = args[1:]
                for name in names:
                    held = cache.get(name) if isinstance(cache, dict) else cache
                    extra = {_cache_name(model.get_submodule(name)): held} if cache is not None else {}
                    out = model.get_submodule(name)(hidden, *rest, **kwargs, **extra)
                    hidden = out[0] if isinstance(out, tuple) else out
                    if isinstance(cache, dict):
                        out = kv.keep_present(out, cache, name)
                out = kv.stage_cache_out(out, cache)
        _send(out, 0)


def _cache_op(caches: dict, kept: set, op: str, params: tuple) -> None:
    """One of :func:`cache_ops`'s operations on this rank's caches."""
    if op == "adopt":
        kept.add(params[0])
    elif op == "stack":
        batch, newcomer, width = params
        if caches.get(batch) is not None and caches.get(newcomer) is not None:
            kv.stack(caches[batch], caches[newcomer], width)
        caches.pop(newcomer, None)
        kept.discard(newcomer)
    elif op == "select":
        name, rows, first = params
        if caches.get(name) is not None:
            kv.select(caches[name], rows, first)
    elif op == "forget":
        caches.pop(params[0], None)
        kept.discard(params[0])


def _cache_name(block: nn.Module) -> str:
    import inspect

    params = inspect.signature(block.forward).parameters
    return next((k for k in KV_NAMES if k in params), "past_key_values")


# --------------------------------------------------------------------------- before loading
def agree(ranks: Ranks, plan: Plan, model_dir: Any) -> None:
    """Every rank has the same plan and a checkpoint it can read, before any rank loads a weight: else
    every rank stops with the same line, naming the rank that cannot."""
    import hashlib
    import json

    import torch.distributed as dist

    from fitmap.model.inventory import inventory

    digest = hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True).encode()).hexdigest()
    try:
        inv = inventory(model_dir)
        problem = "" if inv.weight_format != "none" else f"{model_dir} holds no weights"
    except FitmapError as e:
        problem = str(e)
    status: list[Any] = [None] * ranks.world
    try:
        dist.all_gather_object(status, (digest, problem))
    except RuntimeError as e:
        raise RankFailed(f"the ranks did not all arrive: {_first_line(e)}") from None
    for r, (theirs, why) in enumerate(status):
        if why:
            raise RankFailed(f"rank {r} cannot load: {why}; nothing was loaded")
        if theirs != status[0][0]:
            raise RankFailed(
                f"rank {r}'s plan file differs from rank 0's: give every rank the same plan (one file for all hosts)"
            )


# --------------------------------------------------------------------------- loading a stage
def _resident() -> int:
    """Bytes of this process's resident memory (0 where /proc is not there)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _held(rank: int, model: Any, planned: int, before: int) -> None:
    """One line per rank after loading: the weights it holds, measured from its tensors per device, beside
    what the plan's units for this rank weigh, and its resident memory's growth."""
    import sys

    from fitmap.runtime.checkpoint import named_tensors
    from fitmap.sizes import fmt_bytes

    held: dict[str, int] = {}
    for _, t in named_tensors(model):
        if not t.is_meta:
            held[str(t.device)] = held.get(str(t.device), 0) + t.nbytes
    where = ", ".join(f"{fmt_bytes(n)} on {d}" for d, n in sorted(held.items())) or "nothing"
    grew = f"; resident memory grew by {fmt_bytes(max(0, _resident() - before))}" if before else ""
    print(
        f"fitmap rank {rank}: holds {where} (the plan's units for this rank: {fmt_bytes(planned)} of weights){grew}",
        file=sys.stderr,
        flush=True,
    )


def load_stage(model: str, model_dir: Any, plan: Plan, ranks: Ranks, trust_remote_code: bool, readahead: bool) -> Any:
    """Rank 0: its stage loaded, the others' units as proxies (close() stops the other ranks).
    Other ranks: their stage loaded and run until rank 0 is done; then :class:`StageDone`."""
    from fitmap.pipeline import prepare_for
    from fitmap.runtime.loader import load

    init(ranks)
    agree(ranks, plan, model_dir)
    sk = prepare_for(model, plan, trust_remote_code).skeleton
    blocks = [u.name for u in sk.units if u.layer is not None]
    stage = stages(plan, blocks, ranks.world)
    mine, remote = local_plan(plan, stage, ranks.rank)

    def announce(files: tuple[str, ...], nbytes: int) -> None:  # before this rank reads a weight
        import sys

        from fitmap.sizes import fmt_bytes

        names = ", ".join(files[:6]) + (f", ... ({len(files)} in all)" if len(files) > 6 else "")
        print(f"fitmap rank {ranks.rank}: reads {fmt_bytes(nbytes)} from {names}", file=sys.stderr, flush=True)

    before = _resident()
    loaded = load(
        model_dir,
        mine,
        trust_remote_code=trust_remote_code,
        readahead=readahead,
        remote=remote,
        announce=announce,
    )
    _held(ranks.rank, loaded.model, sum(u.weight_bytes for u in sk.units if u.name not in remote), before)
    if ranks.rank == 0:
        hosts = dict(enumerate(plan.hosts))
        attach_proxies(loaded.model, stage, blocks, loaded.input_device, hosts)
        ordered = {b: stage[b] for b in blocks if b in stage} | {u: r for u, r in stage.items() if u not in blocks}

        alive = _KeepAlive(ranks.world)
        alive.start()

        def stop_others() -> None:
            alive.done.set()
            loaded.closing_error = stop(ranks.world, ordered, hosts)

        loaded.on_close.append(stop_others)
        loaded.cache_ops = cache_ops(ranks.world, ordered, hosts)
        return loaded
    own = [b for b in blocks if stage[b] == ranks.rank]
    device = next(loaded.model.get_submodule(own[0]).parameters()).device if own else torch.device("cpu")
    try:
        serve_stage(loaded.model, device, sk.config)
    finally:
        loaded.close()
    raise StageDone("")
