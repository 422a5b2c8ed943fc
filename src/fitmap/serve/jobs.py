"""A request as a replica sees it (its settings, where its text goes) and the streamers that push
generated text to it: one request's (transformers' ``TextStreamer`` decoding) or a ``generate``
batch's rows'."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

END = object()  # the last item of a request's stream


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
    closed: bool = False  # END (or its error) sent
    inputs: dict | None = None  # its model inputs, made when it is first considered for the batch

    def emit(self, item: Any) -> None:
        assert self.loop is not None and self.chunks is not None  # set by the server before it submits the job
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)


class Push:
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


class PushRows:
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


class AllDone:
    """Stops a batch once every row is finished or its client gone (a StoppingCriteria)."""

    def __init__(self, push: PushRows) -> None:
        self.push = push

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.push.all_done, dtype=torch.bool, device=input_ids.device)


class Cancelled:
    """Stops generation once the client has gone (a StoppingCriteria)."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full(
            (input_ids.shape[0],), self.request.cancelled.is_set(), dtype=torch.bool, device=input_ids.device
        )
