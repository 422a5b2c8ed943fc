"""Replicas and their requests: each replica is loaded exactly once, by fitmap's loader, and
serves its requests on a thread of its own; a request goes to the replica with the fewest
requests waiting or running. A replica batches continuously (:mod:`fitmap.serve.batcher`):
requests join its running batch between two decode steps while the plan's cache-token budget has
room, and leave when done. Models whose cache cannot be batched step by step answer one
``generate`` at a time (greedy text requests queued together share one). Text streams out token
by token into the request's asyncio queue; a request whose client went away is stopped at its
next token and frees its place.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fitmap.errors import BadInput, FitmapError
from fitmap.runtime.prompting import Prompter
from fitmap.serve.jobs import END, AllDone, Cancelled, Push, PushRows, Request
from fitmap.serve.placement import ServePlan

if TYPE_CHECKING:
    from fitmap.runtime.loader import LoadedModel
    from fitmap.serve.batcher import Batch

UNCAPPED = 1 << 16  # rows of a batch when only the token budget limits them
_LOADING = threading.Lock()  # one replica loads at a time: building on meta patches torch process-wide


class QueueFull(FitmapError):
    """Every replica has as many requests waiting as the server allows."""


class Worker(threading.Thread):
    """One replica: loads once, then answers its queue in order."""

    def __init__(
        self, index: int, model_dir: Path, plan, base: Prompter, trust_remote_code: bool, max_batch: int = 8
    ) -> None:
        super().__init__(name=f"fitmap-replica-{index}", daemon=True)
        import copy

        # its own tokenizer/processor: a fast tokenizer is not safe to call from two threads at once
        self.index, self.model_dir, self.plan, self.base = index, model_dir, plan, copy.deepcopy(base)
        self.trust_remote_code = trust_remote_code
        self.max_batch = max_batch
        self.jobs: queue.Queue[Request | None] = queue.Queue()
        self.pending = 0  # waiting + running (the router's load)
        self.lock = threading.Lock()
        self.loads = 0
        self.served = 0
        self.tokens = 0
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loaded: LoadedModel | None = None
        self.own: str | None = None  # the model's own chat() form, if any (set once loaded)
        self.batches = 0  # forward passes of the batch (continuous), or generate calls
        self.lanes: list[Batch] = []  # the running batches (one, or one per pipeline stage)
        self.images_join = False  # image requests decode in the batch
        self.fatal: BaseException | None = None  # a failure that ends the server (another rank gone)
        self.micro_batches = 1  # continuous batches in flight under torchrun (--micro-batches)
        self.copies = 1  # replicas computing at once, this one included (they share the free cores)
        # how it serves, for the start-up line
        self.batching = "one generate at a time (greedy text requests together)" if max_batch > 1 else "one at a time"
        # cache tokens its plan holds: sequences x (prompt + new); Engine adds the images' tokens
        self.budget = plan.workload.batch * (plan.workload.prompt + plan.workload.new)

    def run(self) -> None:
        from fitmap.runtime.run import start

        try:
            with _LOADING:
                self.loaded, sampler = start(self.model_dir, self.plan, self.trust_remote_code)
            sampler.__exit__(None, None, None)
            self.loads += 1
            from fitmap.runtime.run import own_chat

            self.own = own_chat(self.loaded.model)
            from fitmap.serve.batcher import Batch, cache_kind

            kind = cache_kind(self.loaded.model) if self.own is None and self.max_batch > 1 else None
            if kind is not None:
                tok, model = self.base.tokenizer, self.loaded.model
                self.images_join = kind[1]
                ops = self.loaded.cache_ops  # other ranks' stages (torchrun): their caches follow the batch's
                batch = Batch(model, self.loaded.input_device, tok, _eos_ids(model, tok), kind[0], ops)
                failed = batch.probe()
                if failed is None:
                    self.batching = f"continuous batching, {self.budget} cache tokens"
                    self._lanes(batch)
                else:
                    self.max_batch = 1  # nor can generate decode it with padding
                    self.batching = f"one request at a time: the model fails on a padded batch ({failed})"
            elif self.own is not None:
                self.batching = "one request at a time: the model's own chat()"
        except BaseException as e:  # reported by Engine.wait_ready
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        if self.batch is None:
            self._one_generate_at_a_time()
        else:
            self._micro_batches()
        self.loaded.close()
        if self.loaded.closing_error is not None and self.fatal is None:  # a stage's rank found gone at the end
            self.fatal = self.loaded.closing_error

    def _lanes(self, first) -> None:
        """One continuous batch; under torchrun with ``--micro-batches N``, N, each run in a thread of
        its own, so that a stage computes one while another stage computes the next (not where this
        rank streams weights: its offload is not shared across threads)."""
        from fitmap.runtime.distributed import Ranks
        from fitmap.serve.batcher import Batch

        ranks = Ranks.from_env()
        count = self.micro_batches if ranks is not None and self._replica.offload_stats is None else 1
        same = (first.model, first.device, first.tok, first.eos, first.cache_arg, first.stages)
        self.lanes = [first] + [Batch(*same) for _ in range(count - 1)]
        if count > 1:
            self.batching += f", {count} micro-batches in flight"

    def _micro_batches(self) -> None:
        first, count = self.lanes[0], len(self.lanes)
        if count == 1:
            self._continuously(first, self.budget)
            return
        prefill = threading.Lock()
        share = (self.budget // count, prefill, -(-self.plan.workload.batch // count))
        others = [threading.Thread(target=self._continuously, args=(b, *share), daemon=True) for b in self.lanes[1:]]
        for t in others:
            t.start()
        self._continuously(first, *share)
        for t in others:
            t.join()

    def _one_generate_at_a_time(self) -> None:
        """Each request alone, or greedy text requests queued together in one ``generate`` (models
        whose cache cannot be batched step by step)."""
        later: list[Request | None] = []  # taken from the queue, not batchable with the batch before them
        while True:
            job = later.pop(0) if later else self.jobs.get()
            if job is None:
                break
            batch = [job]
            most = min(self.max_batch, self.plan.workload.batch)  # the sequences its plan holds
            if most > 1 and self._batchable(job):
                while len(batch) < most and not later:
                    try:
                        nxt = self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is not None and self._batchable(nxt):
                        batch.append(nxt)
                    else:
                        later.append(nxt)
            self._run(batch)
            if None in later:
                break

    def _continuously(self, batch, budget: int, prefill: Any = None, rows: int | None = None) -> None:
        """Continuous batching: between two decode steps, the requests waiting join while the
        ``budget`` of cache tokens has room (in arrival order; a request that must run alone waits
        for the batch to empty, and those behind it wait too); finished rows leave at once. Several
        of these may run at once on one replica (micro-batches in flight across pipeline stages):
        each takes a request from the queue only when it is about to admit one, and holds at most
        ``rows`` of them, its share."""
        from fitmap.runtime import threads

        tune = threads.Tuner(threads.current() or threads.choose((self.plan,)), self.copies)
        waiting: collections.deque[Request] = collections.deque()  # at most the one being admitted
        stopping = False
        while not stopping:
            while not stopping:
                if not waiting:
                    try:
                        job = self.jobs.get(block=not batch.rows)
                    except queue.Empty:
                        break
                    if job is None:
                        stopping = True
                        self.jobs.put(None)  # for the replica's other micro-batches, if any
                        break
                    waiting.append(job)
                job = waiting[0]
                if job.cancelled.is_set():
                    waiting.popleft()
                    self._ended(job)
                    continue
                if not self._joins(job):
                    if batch.rows:
                        break
                    waiting.popleft()
                    self._run([job])
                    continue
                if len(batch.rows) >= min(self.max_batch, rows or self.max_batch) or not self._room(batch, job, budget):
                    break
                waiting.popleft()
                if job.closed:  # its inputs could not be made, or it can never fit: answered already
                    self._ended(job)
                    continue
                try:
                    batch.join(job, job.inputs, prefill)
                except BaseException as e:  # this request fails (4xx/5xx); the batch goes on
                    job.emit(e)
                    job.closed = True
                    self._ended(job)
                    self._fatal(e)
                job.inputs = None
                self._count()
                self._finished(batch)
            if batch.rows and not stopping:
                tune()
                try:
                    batch.step()
                except BaseException as e:  # every request of the batch fails; the replica goes on
                    batch.fail(e)
                    self._fatal(e)
                self._count()
                self._finished(batch)
        gone = RuntimeError("the server is shutting down")
        batch.fail(gone)
        for job in waiting:
            job.emit(gone)
            job.closed = True
        self._finished(batch)

    def _count(self) -> None:
        with self.lock:
            self.batches += 1

    def _joins(self, job: Request) -> bool:
        """Whether ``job`` decodes in the batch (a model's own chat() and, where its forward needs
        more than tokens per step, image requests run alone)."""
        images = job.messages is not None and any(m["images"] for m in job.messages)
        return not images or self.images_join

    def _room(self, batch, job: Request, budget: int) -> bool:
        """``job``'s real inputs made (once); whether the batch's cache tokens with it stay within
        the plan's budget. A request that fails here, or could never fit, is answered (4xx) and
        closed: it leaves at once."""
        if job.inputs is None:
            try:
                job.inputs = self._inputs(job)
            except BaseException as e:
                job.emit(e)
                job.closed = True
                return True
        n = int(job.inputs["input_ids"].shape[1])
        if n + job.max_tokens > self.budget:
            job.emit(
                BadInput(
                    f"the request needs {n + job.max_tokens} tokens of cache ({n} prompt tokens as templated, "
                    f"images included, + max_tokens {job.max_tokens}); this replica was planned for "
                    f"{self.budget} (restart fitmap serve with a larger --prompt or --concurrency)"
                )
            )
            job.closed = True
            return True
        return not batch.rows or batch.footprint(n, job.max_tokens) <= budget

    @property
    def batch(self) -> Batch | None:
        """The (first) running batch, once loaded with continuous batching."""
        return self.lanes[0] if self.lanes else None

    @property
    def running(self) -> int:
        return sum(len(b.rows) for b in self.lanes)

    @property
    def in_flight(self) -> int:
        return sum(b.footprint() for b in self.lanes)

    def _finished(self, batch) -> None:
        for row in batch.take_ended():
            self._ended(row.job)

    def _ended(self, job: Request) -> None:
        if not job.closed:
            job.emit(END)
            job.closed = True
        with self.lock:
            self.pending -= 1
            self.served += 1
            self.tokens += job.completion_tokens

    def _run(self, batch: list[Request]) -> None:
        """Answer ``batch`` (one request, or greedy text requests decoded together); each request
        that fails gets its exception (a 5xx), the replica goes on."""
        live = [j for j in batch if not j.cancelled.is_set()]
        try:
            if len(live) == 1:
                self._answer(live[0])
            elif live:
                self._answer_together(live)
            for j in batch:
                if not j.closed:
                    j.emit(END)
        except BaseException as e:  # these requests fail (5xx); the replica keeps serving
            for j in batch:
                if not j.closed:
                    j.emit(e)
            self._fatal(e)
        finally:
            with self.lock:
                self.pending -= len(batch)
            self.served += len(batch)
            self.tokens += sum(j.completion_tokens for j in batch)
            self.batches += 1

    def _fatal(self, e: BaseException) -> None:
        """A stage's rank that failed (torchrun) cannot serve again: the server stops, and says why."""
        from fitmap.runtime.distributed import RankFailed

        if isinstance(e, RankFailed) and self.fatal is None:
            import os
            import signal

            self.fatal = e
            os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown; cmd_serve raises it then

    def _batchable(self, job: Request) -> bool:
        """Greedy text requests without stop strings share one generate (images and a model's own
        chat() go alone)."""
        if job.temperature > 0 or job.stop or job.cancelled.is_set():
            return False
        if job.messages is not None and (any(m["images"] for m in job.messages) or self.own is not None):
            return False
        return True

    def _inputs(self, job: Request) -> dict:
        """The request's model inputs on the replica's input device (the conversation through the
        model's template, or the raw prompt)."""
        if job.messages is None:
            return {
                k: v.to(self._replica.input_device)
                for k, v in self.base.tokenizer([job.prompt], return_tensors="pt").items()
            }
        return self._prompter(job).inputs(self._replica.input_device)

    @property
    def _replica(self) -> LoadedModel:
        """The loaded model: requests are answered only after ``run`` has loaded it."""
        assert self.loaded is not None  # run() loads before it takes the first request
        return self.loaded

    def _prompter(self, job: Request) -> Prompter:
        prompter = replace(self.base, messages=[])
        assert job.messages is not None  # called for chat requests only
        for m in job.messages:
            if m["role"] == "assistant":
                prompter.add_assistant(m["text"])
            elif m["role"] == "system":
                prompter.messages.append(
                    {"role": "system", "content": [{"type": "text", "text": m["text"]}], "images": []}
                )
            else:
                prompter.add_user(m["text"], m["images"])
        return prompter

    def _answer_together(self, jobs: list[Request]) -> None:
        """Greedy decoding of several requests in one ``generate``: prompts left-padded, each row's
        text streamed to its request, a row done at its own max_tokens or end-of-sequence token."""
        from transformers import StoppingCriteriaList

        tok = self.base.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = [self._inputs(j)["input_ids"][0] for j in jobs]
        width = max(r.numel() for r in rows)
        device = self._replica.input_device
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, width - r.numel() :] = r
            mask[i, width - r.numel() :] = 1
        for j, r in zip(jobs, rows):
            j.prompt_tokens = int(r.numel())
        push = PushRows(tok, jobs, _eos_ids(self._replica.model, tok))
        with torch.inference_mode():
            self._replica.model.generate(  # type: ignore[operator]  # a PreTrainedModel method
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(j.max_tokens for j in jobs),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
                streamer=push,
                stopping_criteria=StoppingCriteriaList([AllDone(push)]),
            )
        push.finish()

    def _answer(self, job: Request) -> None:
        from fitmap.runtime.run import OWN_IMAGE_FORMS, _own_chat, own_chat

        model = self._replica.model
        if job.messages is not None:
            prompter = self._prompter(job)
            form = own_chat(model)
            if form is not None and (form in OWN_IMAGE_FORMS or not prompter.has_images()):
                text, n, _ = _own_chat(self._replica, form, prompter, job.max_tokens, None)
                job.completion_tokens, job.finish_reason = n, "length" if n >= job.max_tokens else "stop"
                job.emit(text)
                return
            inputs = prompter.inputs(self._replica.input_device)
        else:
            inputs = self._inputs(job)
        job.prompt_tokens = int(inputs["input_ids"].shape[1])
        tok = self.base.tokenizer
        sample = job.temperature > 0
        settings: dict[str, Any] = dict(
            max_new_tokens=job.max_tokens, do_sample=sample, pad_token_id=tok.pad_token_id or tok.eos_token_id
        )
        if sample:
            settings.update(temperature=job.temperature, top_p=job.top_p)
            if job.seed is not None:
                torch.manual_seed(job.seed)
        else:
            settings.update(temperature=None, top_p=None, top_k=None)
        if job.stop:
            settings.update(stop_strings=list(job.stop), tokenizer=tok)
        from transformers import StoppingCriteriaList

        with torch.inference_mode():
            out = model.generate(  # type: ignore[operator]  # a PreTrainedModel method
                **inputs,
                **settings,
                streamer=Push(tok, job),
                stopping_criteria=StoppingCriteriaList([Cancelled(job)]),
            )
        new = out[0, job.prompt_tokens :]
        job.completion_tokens = int(new.numel())
        ended = new.numel() and int(new[-1]) in _eos_ids(model, tok)
        job.finish_reason = "length" if job.completion_tokens >= job.max_tokens and not ended else "stop"


def _image_tokens(config, images) -> int:
    """Tokens the plan's images add to a sequence (0 where their count cannot be made)."""
    from fitmap.planning.images import image_shape

    try:
        return sum(image_shape(config, w, h).tokens for w, h in images)
    except Exception:
        return 0


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return set(ids if isinstance(ids, (list, tuple)) else [ids]) - {None}


class Engine:
    """The replicas of one model and the router in front of them."""

    def __init__(
        self,
        model_dir: Path,
        plan: ServePlan,
        trust_remote_code: bool = False,
        max_queue: int = 64,
        max_batch: int | None = None,
        micro_batches: int = 1,
    ) -> None:
        self.model_dir, self.plan, self.max_queue = model_dir, plan, max_queue
        from fitmap.model.build import load_config
        from fitmap.model.inventory import inventory

        config = load_config(inventory(model_dir), trust_remote_code)
        self.base = Prompter.for_model(model_dir, config, trust_remote_code)
        self.config = config
        # a replica decodes together at most the requests its plan holds KV and activations for
        self.workers = [
            Worker(i, model_dir, r.plan, self.base, trust_remote_code, UNCAPPED if max_batch is None else max_batch)
            for i, r in enumerate(plan.replicas)
        ]
        for w in self.workers:  # the images each request may carry add their tokens to the budget
            w.copies, w.micro_batches = len(self.workers), micro_batches
            w.budget += w.plan.workload.batch * _image_tokens(config, w.plan.workload.images)
        self.started = time.time()
        self.rejected = 0

    def start(self) -> None:
        for w in self.workers:
            w.start()
        for w in self.workers:
            w.ready.wait()
        failed = next((w.error for w in self.workers if w.error is not None), None)
        if failed is not None:
            self.stop()
            raise failed

    def stop(self) -> None:
        for w in self.workers:
            if w.is_alive():
                w.jobs.put(None)
        for w in self.workers:
            if w.is_alive():
                w.join(timeout=30)

    @property
    def fatal(self) -> BaseException | None:
        return next((w.fatal for w in self.workers if w.fatal is not None), None)

    def retry_after(self) -> int:
        """Seconds a client turned away should wait: the time the server, at the rate it has
        answered requests so far, takes to answer those waiting or running (1 to 60)."""
        served = sum(w.served for w in self.workers)
        each = (time.time() - self.started) / served if served else 1.0
        return max(1, min(60, math.ceil(each * self.queued)))

    @property
    def queued(self) -> int:
        return sum(w.pending for w in self.workers)

    def submit(self, job: Request) -> None:
        """Route ``job`` to the least-loaded replica; :class:`QueueFull` when all are full."""
        if self.queued >= self.max_queue:
            self.rejected += 1
            raise QueueFull(
                f"{self.queued} requests are waiting or running, the server's limit "
                f"(--max-queue {self.max_queue}); retry later"
            )
        w = min(self.workers, key=lambda x: (x.pending, x.index))
        with w.lock:
            w.pending += 1
        job.replica = w.index
        w.jobs.put(job)

    @property
    def context(self) -> tuple[int, int]:
        """(prompt tokens, new tokens) every replica's plan was made for."""
        w = self.plan.replicas[0].plan.workload
        return w.prompt, w.new

    def check_images(self, images: list) -> None:
        if images and self.base.processor is None and self.base.image_processor is None and not self.base.own_images:
            raise BadInput("this model takes no images")
