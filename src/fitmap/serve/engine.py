"""Replicas and their requests: each replica is loaded exactly once, by fitmap's loader, and
runs its requests one at a time on a thread of its own; a request goes to the replica with
the fewest requests waiting or running. Text streams out token by token (transformers'
``TextStreamer`` decoding) into the request's asyncio queue; a request whose client went
away is stopped at its next token and frees the replica.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fitmap.errors import BadInput, FitmapError
from fitmap.runtime.prompting import Prompter
from fitmap.serve.placement import ServePlan

if TYPE_CHECKING:
    from fitmap.runtime.loader import LoadedModel

END = object()  # the last item of a request's stream
_LOADING = threading.Lock()  # one replica loads at a time: building on meta patches torch process-wide


class QueueFull(FitmapError):
    """Every replica has as many requests waiting as the server allows."""


@dataclass
class Request:
    """One completion: its conversation (OpenAI messages as fitmap's prompter takes them) or raw
    prompt, its sampling settings, and where its text goes."""

    messages: list[dict] | None
    prompt: str | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    loop: asyncio.AbstractEventLoop | None = None
    chunks: asyncio.Queue | None = None  # text pieces, then END (or an exception)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    replica: int = -1
    closed: bool = False  # END sent (a batch row finished before its batch)

    def emit(self, item: Any) -> None:
        assert self.loop is not None and self.chunks is not None  # set by the server before it submits the job
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)


class _Push:
    """transformers' ``TextStreamer`` decoding, each finished piece of text pushed to the request."""

    def __init__(self, tokenizer, request: Request) -> None:
        from transformers import TextStreamer

        self.inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

        def push(text: str, stream_end: bool = False) -> None:
            if text:
                request.emit(text)

        self.inner.on_finalized_text = push  # type: ignore[method-assign]  # text goes to the request
        self.request = request
        self.first = True

    def put(self, value) -> None:
        if self.first:  # the prompt
            self.first = False
            self.inner.put(value)
            return
        self.request.completion_tokens += int(value.numel())
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


class _PushRows:
    """A batch's streamer: row i's new tokens decoded and pushed to request i until its own
    max_tokens or an end-of-sequence token; then its request is finished (END) at once."""

    def __init__(self, tokenizer, jobs: list[Request], eos: set[int]) -> None:
        self.tok, self.jobs, self.eos = tokenizer, jobs, eos
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
        self.done = [False] * len(jobs)
        self.first = True

    def put(self, value) -> None:
        if self.first:  # the prompts
            self.first = False
            return
        for i, token in enumerate(value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            if self.done[i]:
                continue
            job = self.jobs[i]
            if token in self.eos:
                self._close(i, "stop")
                continue
            self.ids[i].append(token)
            job.completion_tokens = len(self.ids[i])
            text = self.tok.decode(self.ids[i], skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(self.sent[i]):
                job.emit(text[len(self.sent[i]) :])
                self.sent[i] = text
            if len(self.ids[i]) >= job.max_tokens:
                self._close(i, "length")

    def _close(self, i: int, reason: str) -> None:
        text = self.tok.decode(self.ids[i], skip_special_tokens=True)
        if len(text) > len(self.sent[i]):
            self.jobs[i].emit(text[len(self.sent[i]) :])
        self.jobs[i].finish_reason = reason
        self.jobs[i].completion_tokens = len(self.ids[i])
        self.done[i] = True
        self.jobs[i].closed = True
        self.jobs[i].emit(END)  # this request is answered; the batch goes on for the others

    @property
    def all_done(self) -> bool:
        return all(d or j.cancelled.is_set() for d, j in zip(self.done, self.jobs))

    def end(self) -> None:
        pass

    def finish(self) -> None:
        for i in range(len(self.jobs)):
            if not self.done[i]:
                self._close(i, "length" if len(self.ids[i]) >= self.jobs[i].max_tokens else "stop")


class _AllDone:
    """Stops a batch once every row is finished or its client gone (a StoppingCriteria)."""

    def __init__(self, push: _PushRows) -> None:
        self.push = push

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.push.all_done, dtype=torch.bool, device=input_ids.device)


class _Cancelled:
    """Stops generation once the client has gone (a StoppingCriteria)."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full(
            (input_ids.shape[0],), self.request.cancelled.is_set(), dtype=torch.bool, device=input_ids.device
        )


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
        self.batches = 0  # generate calls (a batch of requests counts once)

    def run(self) -> None:
        from fitmap.runtime.run import start

        try:
            with _LOADING:
                self.loaded, sampler = start(self.model_dir, self.plan, self.trust_remote_code)
            sampler.__exit__(None, None, None)
            self.loads += 1
            from fitmap.runtime.run import own_chat

            self.own = own_chat(self.loaded.model)
        except BaseException as e:  # reported by Engine.wait_ready
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        later: list[Request | None] = []  # taken from the queue, not batchable with the batch before them
        while True:
            job = later.pop(0) if later else self.jobs.get()
            if job is None:
                break
            batch = [job]
            if self.max_batch > 1 and self._batchable(job):
                while len(batch) < self.max_batch and not later:
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
        self.loaded.close()

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
        finally:
            with self.lock:
                self.pending -= len(batch)
            self.served += len(batch)
            self.tokens += sum(j.completion_tokens for j in batch)
            self.batches += 1

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
        push = _PushRows(tok, jobs, _eos_ids(self._replica.model, tok))
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
                stopping_criteria=StoppingCriteriaList([_AllDone(push)]),
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
                streamer=_Push(tok, job),
                stopping_criteria=StoppingCriteriaList([_Cancelled(job)]),
            )
        new = out[0, job.prompt_tokens :]
        job.completion_tokens = int(new.numel())
        ended = new.numel() and int(new[-1]) in _eos_ids(model, tok)
        job.finish_reason = "length" if job.completion_tokens >= job.max_tokens and not ended else "stop"


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return set(ids if isinstance(ids, (list, tuple)) else [ids]) - {None}


class Engine:
    """The replicas of one model and the router in front of them."""

    def __init__(
        self, model_dir: Path, plan: ServePlan, trust_remote_code: bool = False, max_queue: int = 64, max_batch: int = 8
    ) -> None:
        self.model_dir, self.plan, self.max_queue = model_dir, plan, max_queue
        from fitmap.model.build import load_config
        from fitmap.model.inventory import inventory

        config = load_config(inventory(model_dir), trust_remote_code)
        self.base = Prompter.for_model(model_dir, config, trust_remote_code)
        self.config = config
        # a replica decodes together at most the requests its plan holds KV and activations for
        self.workers = [
            Worker(i, model_dir, r.plan, self.base, trust_remote_code, max(1, min(max_batch, r.plan.workload.batch)))
            for i, r in enumerate(plan.replicas)
        ]
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
