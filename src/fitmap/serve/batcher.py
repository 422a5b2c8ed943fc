"""Continuous batching on one replica, over the model's own forward and transformers' ``DynamicCache``.

A request joins the running batch at the next step: its prompt (and images) is prefilled alone
into a cache of its own, then that cache is left-padded to the batch's width and stacked under
the batch's rows, layer by layer, where each layer's KV already lives (one GPU, several, or the
CPU: the placement's hooks move activations as they do for ``generate``). Every step then decodes
one token for every row; a row leaves as soon as it is done (its end-of-sequence token, a stop
string, its ``max_tokens``, or its client gone) and the columns no row needs any more are cut.

Each row samples with its own temperature, top-p and ``torch.Generator`` (seeded from the request's
``seed``), so a seeded request gets the same text alone or in a batch. Positions are each row's
own: its real tokens so far plus the offset its prefill left (multimodal RoPE's ``rope_deltas``).

Why not transformers' continuous batching (``generate_batch`` / ``init_continuous_batching``): its
paged cache is one tensor on one device (it cannot hold a plan split across GPUs or offloaded),
it switches the model's attention to a paged implementation for every request of the replica,
and it has one seed for the whole manager.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fitmap.runtime import kv
from fitmap.runtime.kv import key

if TYPE_CHECKING:
    from fitmap.serve.jobs import Request

# forward parameters a decode step does without (prefill takes what the processor made); a model
# whose forward takes anything else per step (cross-attention masks, ...) runs image requests alone
_PREFILL_ONLY = ("pixel", "image", "video", "grid", "mm_", "token_type_ids", "second_per_grid", "vision_feature")
_STEP = {
    "input_ids",
    "attention_mask",
    "position_ids",
    "past_key_values",
    "cache",
    "inputs_embeds",
    "labels",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "cache_position",
    "logits_to_keep",
    "rope_deltas",
    "kwargs",
}


def cache_kind(model) -> tuple[str, bool] | None:
    """(the forward's cache argument, whether image requests may join a batch), or None where
    this model cannot be batched step by step: its forward takes no attention mask or positions
    (BLIP-2's kind), it is an encoder-decoder, or its cache is not plain full-attention
    ``DynamicLayer``s (sliding windows, state-space or quantized layers, transformers before 4.56).
    A model's own ``chat()`` (remote code) is the caller's to check."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # transformers of the remote-code era
        return None
    params = set(inspect.signature(model.forward).parameters)
    name = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    if name is None or not {"attention_mask", "position_ids", "input_ids"} <= params:
        return None
    if getattr(model.config, "is_encoder_decoder", False):
        return None
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:
        return None
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    images = all(p in _STEP or p.startswith(_PREFILL_ONLY) for p in params)
    return name, images


@dataclass
class Row:
    """One request in the batch: its tokens in the cache, what it has generated and sent."""

    job: Request
    length: int  # real tokens in the cache
    delta: int  # position offset its prefill left (multimodal RoPE); 0 for text
    ids: list[int] = field(default_factory=list)  # generated, end-of-sequence excluded
    sent: str = ""  # text given to the client so far
    generator: torch.Generator | None = None
    done: bool = False


class Batch:
    """The rows one replica decodes together, and their cache."""

    def __init__(
        self, model, device: torch.device, tokenizer, eos: set[int], cache_arg: str, stages: Callable | None = None
    ) -> None:
        """``stages``: where other processes run some of the layers (torchrun), what keeps their caches'
        rows in step with this one's (``LoadedModel.cache_ops``)."""
        self.model, self.device, self.tok, self.eos, self.cache_arg = model, device, tokenizer, eos, cache_arg
        self.stages = stages
        params = inspect.signature(model.forward).parameters
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, width]: 1 where a row has a real token
        self.next: torch.Tensor | None = None  # [rows, 1]: each row's token for the next step
        self.steps = 0
        self.ended: list[Row] = []  # rows done since the caller last looked (:meth:`take_ended`)

    def probe(self) -> str | None:
        """Whether this model decodes a left-padded batch: one forward of two rows of two tokens,
        the first padded. None if it does, else why not (transformers 5.25's DeepSeek-V3, for one,
        fails in its attention with a padding mask, in ``generate`` too)."""
        from transformers.cache_utils import DynamicCache

        ids = torch.zeros((2, 2), dtype=torch.long, device=self.device)
        mask = torch.tensor([[0, 1], [1, 1]], device=self.device)
        positions = torch.tensor([[0, 0], [0, 1]], device=self.device)
        cache = DynamicCache(config=self.model.config)
        try:
            with torch.inference_mode():
                self.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, **{self.cache_arg: cache}, **self.keep
                )
        except Exception as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return None

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def _stages(self, op: str, *params) -> None:
        if self.stages is not None:
            self.stages(op, *params)

    def footprint(self, prompt: int = 0, new: int = 0) -> int:
        """Cache tokens the batch needs until its last row ends, with a request of ``prompt``
        tokens and ``new`` new tokens added (left padding included)."""
        rows = len(self.rows) + (1 if prompt or new else 0)
        if not rows:
            return 0
        left = max([r.job.max_tokens - len(r.ids) for r in self.rows] + [new])
        return rows * (max(self.width, prompt) + left)

    @property
    def tokens(self) -> int:
        """Real tokens in flight: every row's cache and what it may still generate."""
        return sum(r.length + r.job.max_tokens - len(r.ids) for r in self.rows)

    def join(self, job: Request, inputs: dict, prefill: Any = None) -> None:
        """Prefill ``job`` alone, sample its first token; it joins the batch unless already done.
        ``prefill``: a lock held around the prefill (batches sharing a model in several threads: the
        model keeps what its prefill leaves, multimodal RoPE's ``rope_deltas``)."""
        import contextlib

        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self._stages("adopt", key(cache))  # another rank keeps its layers' rows of it until stacked
        n = int(inputs["input_ids"].shape[1])
        job.prompt_tokens = n
        if "attention_mask" not in inputs:  # as generate passes it: the same attention kernels
            inputs = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
        with prefill if prefill is not None else contextlib.nullcontext():
            inner = getattr(self.model, "model", None)
            if inner is not None and hasattr(inner, "rope_deltas"):
                inner.rope_deltas = None  # what the last prefill left must not shift this one
            try:
                with torch.inference_mode():
                    out = self.model(**inputs, **{self.cache_arg: cache}, use_cache=True, **self.keep)
            except BaseException:
                self._stages("forget", key(cache))
                raise
            deltas = getattr(inner, "rope_deltas", None) if inner is not None else None
        delta = int(deltas.reshape(-1)[0]) if isinstance(deltas, torch.Tensor) else 0
        row = Row(job, n, delta)
        if job.temperature > 0:
            row.generator = torch.Generator(out.logits.device)
            # an unseeded request draws its seed from the OS, leaving torch's global generator alone
            row.generator.manual_seed(job.seed % 2**63 if job.seed is not None else secrets.randbits(63))
        token = self._sample([row], out.logits[:, -1])[0]
        del out
        self._take(row, token)
        if row.done:
            self._stages("forget", key(cache))
            return
        try:
            self._stack(row, cache, token)
        except BaseException as e:  # out of memory half-way through the layers: no row's cache is whole
            self.fail(e)
            raise

    def _stack(self, row: Row, cache, token: int) -> None:
        """``row``'s own cache under the batch's, both left-padded to the wider."""
        width = max(self.width, row.length)
        mask = torch.ones((1, row.length), dtype=torch.long, device=self.device)
        nxt = torch.tensor([[token]], dtype=torch.long, device=self.device)
        if self.cache is None:  # adopted by the other ranks at its prefill
            self.cache, self.mask, self.next = cache, mask, nxt
        else:
            assert self.mask is not None and self.next is not None  # set with the cache
            kv.stack(self.cache, cache, width)
            self._stages("stack", key(self.cache), key(cache), width)
            self.mask = torch.cat([kv.pad(self.mask, width, dim=1), kv.pad(mask, width, dim=1)])
            self.next = torch.cat([self.next, nxt])
        self.rows.append(row)

    def step(self) -> None:
        """One token for every row; finished rows leave."""
        assert self.mask is not None and self.next is not None  # only a batch with rows steps
        rows = len(self.rows)
        self.mask = torch.cat([self.mask, torch.ones((rows, 1), dtype=torch.long, device=self.device)], dim=1)
        positions = torch.tensor([[r.length + r.delta] for r in self.rows], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(
                input_ids=self.next,
                attention_mask=self.mask,
                position_ids=positions,
                **{self.cache_arg: self.cache},
                use_cache=True,
                **self.keep,
            )
        tokens = self._sample(self.rows, out.logits[:, -1])
        del out
        self.steps += 1
        for r, t in zip(self.rows, tokens):
            r.length += 1
            if not r.done:
                self._take(r, t)
        self.next = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
        self.drop()

    def drop(self) -> None:
        """Rows done or cancelled leave; columns that only they needed are cut."""
        for r in self.rows:
            if r.job.cancelled.is_set() and not r.done:
                r.done = True
                self.ended.append(r)
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        assert self.mask is not None and self.next is not None
        index = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(dim=0).long().argmax())  # the first column a remaining row needs
        kv.select(self.cache, keep, first)
        self._stages("select", key(self.cache), keep, first)
        self.mask, self.next = mask[:, first:], self.next.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]

    def clear(self) -> None:
        self.ended += [r for r in self.rows if r not in self.ended]
        if self.cache is not None:
            self._stages("forget", key(self.cache))
        self.rows, self.cache, self.mask, self.next = [], None, None, None

    def take_ended(self) -> list[Row]:
        ended, self.ended = self.ended, []
        return ended

    def fail(self, error: BaseException) -> None:
        """A step that raised: every row gets the error; the batch is empty after."""
        for r in self.rows:
            if not r.job.closed:
                r.job.emit(error)
                r.job.closed = True
        self.clear()

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """One token per row: greedy rows by argmax together, the others with their own settings."""
        picks = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            if r.generator is None:
                continue
            scores = logits[i].float() / r.job.temperature
            if r.job.top_p < 1.0:
                ordered, order = scores.sort(descending=True)
                tail = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1) > r.job.top_p  # keeps at least one
                scores = scores.scatter(0, order[tail], float("-inf"))
            picks[i] = int(torch.multinomial(scores.softmax(-1), 1, generator=r.generator))
        return picks

    def _take(self, row: Row, token: int) -> None:
        """``token`` for ``row``: its text streamed, held back where it may begin a stop string."""
        job = row.job
        if token in self.eos:
            return self._finish(row, "stop", self._text(row))
        row.ids.append(token)
        job.completion_tokens = len(row.ids)
        text = self._text(row)
        for s in job.stop:
            at = text.find(s, max(0, len(row.sent) - len(s)))
            if at >= 0:
                return self._finish(row, "stop", text[:at])
        if len(row.ids) >= job.max_tokens:
            return self._finish(row, "length", text)
        hold = max((n for s in job.stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        ready = text[: len(text) - hold]
        if not ready.endswith("\ufffd") and len(ready) > len(row.sent):
            job.emit(ready[len(row.sent) :])
            row.sent = ready

    def _text(self, row: Row) -> str:
        return self.tok.decode(row.ids, skip_special_tokens=True)

    def _finish(self, row: Row, reason: str, text: str) -> None:
        job = row.job
        if len(text) > len(row.sent) and text.startswith(row.sent):
            job.emit(text[len(row.sent) :])
        job.finish_reason = reason
        job.completion_tokens = len(row.ids)
        row.done = True
        self.ended.append(row)
