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
from typing import Any

import torch

from fitmap.errors import BadInput, FitmapError
from fitmap.prompting import Prompter
from fitmap.serve.placement import ServePlan

END = object()      # the last item of a request's stream
_LOADING = threading.Lock()   # one replica loads at a time: building on meta patches torch process-wide


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
    chunks: asyncio.Queue | None = None            # text pieces, then END (or an exception)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    replica: int = -1

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)


class _Push:
    """transformers' ``TextStreamer`` decoding, each finished piece of text pushed to the request."""

    def __init__(self, tokenizer, request: Request) -> None:
        from transformers import TextStreamer

        self.inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.inner.on_finalized_text = lambda text, stream_end=False: text and request.emit(text)
        self.request = request
        self.first = True

    def put(self, value) -> None:
        if self.first:            # the prompt
            self.first = False
            self.inner.put(value)
            return
        self.request.completion_tokens += int(value.numel())
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


class _Cancelled:
    """Stops generation once the client has gone (a StoppingCriteria)."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.request.cancelled.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class Worker(threading.Thread):
    """One replica: loads once, then answers its queue in order."""

    def __init__(self, index: int, model_dir: Path, plan, base: Prompter, trust_remote_code: bool) -> None:
        super().__init__(name=f"fitmap-replica-{index}", daemon=True)
        import copy

        # its own tokenizer/processor: a fast tokenizer is not safe to call from two threads at once
        self.index, self.model_dir, self.plan, self.base = index, model_dir, plan, copy.deepcopy(base)
        self.trust_remote_code = trust_remote_code
        self.jobs: queue.Queue[Request | None] = queue.Queue()
        self.pending = 0                  # waiting + running (the router's load)
        self.lock = threading.Lock()
        self.loads = 0
        self.served = 0
        self.tokens = 0
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loaded = None

    def run(self) -> None:
        from fitmap.run import start

        try:
            with _LOADING:
                self.loaded, sampler = start(self.model_dir, self.plan, self.trust_remote_code)
            sampler.__exit__(None, None, None)
            self.loads += 1
        except BaseException as e:        # reported by Engine.wait_ready
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        while True:
            job = self.jobs.get()
            if job is None:
                break
            try:
                if not job.cancelled.is_set():
                    self._answer(job)
                job.emit(END)
            except BaseException as e:     # this request fails (5xx); the replica keeps serving
                job.emit(e)
            finally:
                with self.lock:
                    self.pending -= 1
                self.served += 1
                self.tokens += job.completion_tokens
        self.loaded.close()

    def _answer(self, job: Request) -> None:
        from fitmap.run import _own_chat, own_chat

        prompter = replace(self.base, messages=[])
        model = self.loaded.model
        if job.messages is not None:
            for m in job.messages:
                if m["role"] == "assistant":
                    prompter.add_assistant(m["text"])
                elif m["role"] == "system":
                    prompter.messages.append({"role": "system", "content": [{"type": "text", "text": m["text"]}],
                                              "images": []})
                else:
                    prompter.add_user(m["text"], m["images"])
            form = own_chat(model)
            if form is not None and (form in ("internvl", "minicpmv", "cogvlm") or not prompter.has_images()):
                text, n, _ = _own_chat(self.loaded, form, prompter, job.max_tokens, None)
                job.completion_tokens, job.finish_reason = n, "length" if n >= job.max_tokens else "stop"
                job.emit(text)
                return
            inputs = prompter.inputs(self.loaded.input_device)
        else:
            inputs = {k: v.to(self.loaded.input_device)
                      for k, v in self.base.tokenizer([job.prompt], return_tensors="pt").items()}
        job.prompt_tokens = int(inputs["input_ids"].shape[1])
        tok = self.base.tokenizer
        sample = job.temperature > 0
        settings: dict[str, Any] = dict(max_new_tokens=job.max_tokens, do_sample=sample,
                                        pad_token_id=tok.pad_token_id or tok.eos_token_id)
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
            out = model.generate(**inputs, **settings, streamer=_Push(tok, job),
                                 stopping_criteria=StoppingCriteriaList([_Cancelled(job)]))
        new = out[0, job.prompt_tokens:]
        job.completion_tokens = int(new.numel())
        ended = new.numel() and int(new[-1]) in _eos_ids(model, tok)
        job.finish_reason = "length" if job.completion_tokens >= job.max_tokens and not ended else "stop"


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return set(ids if isinstance(ids, (list, tuple)) else [ids]) - {None}


class Engine:
    """The replicas of one model and the router in front of them."""

    def __init__(self, model_dir: Path, plan: ServePlan, trust_remote_code: bool = False,
                 max_queue: int = 64) -> None:
        self.model_dir, self.plan, self.max_queue = model_dir, plan, max_queue
        from fitmap.inventory import inventory
        from fitmap.skeleton import load_config

        config = load_config(inventory(model_dir), trust_remote_code)
        self.base = Prompter.for_model(model_dir, config, trust_remote_code)
        self.config = config
        self.workers = [Worker(i, model_dir, r.plan, self.base, trust_remote_code)
                        for i, r in enumerate(plan.replicas)]
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
            raise QueueFull(f"{self.queued} requests are waiting or running, the server's limit "
                            f"(--max-queue {self.max_queue}); retry later")
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
