"""Placement for serving: one copy split across the GPUs, or k replicas on disjoint GPU groups.

The throughput model is the server's own (:mod:`fitmap.serve.engine`): each copy of the
model decodes its running batch one step at a time, its units one after another. A split
copy over g GPUs therefore keeps one GPU busy at a time; k replicas decode k batches at
once. So, for the same requests, k replicas give about k times the decode throughput of one
split copy, provided each replica holds its share of the concurrent requests (batch =
ceil(concurrency / k), the workload's prompt, new tokens and images: its cache-token
budget) on its own GPUs without offloading. The most replicas that fit are chosen; the plan
says, in numbers, why each larger count did not fit. ``replicas=`` overrides the choice (it
must fit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fitmap.errors import BadInput, DoesNotFit
from fitmap.planning.plan import Plan
from fitmap.sizes import fmt_bytes


@dataclass(frozen=True)
class Replica:
    gpus: tuple[int, ...]  # torch indices of its GPU group (empty: the CPU)
    plan: Plan


@dataclass(frozen=True)
class ServePlan:
    replicas: tuple[Replica, ...]
    concurrency: int
    choice: str  # one line: what was chosen
    reasons: tuple[str, ...]  # per option tried, in numbers

    def to_json(self) -> dict:
        return {
            "fitmap_serve_plan": 1,
            "choice": self.choice,
            "reasons": list(self.reasons),
            "concurrency": self.concurrency,
            "replicas": [
                {
                    "gpus": list(r.gpus),
                    "device_map": r.plan.device_map,
                    "devices": r.plan.to_json()["devices"],
                    "plan": r.plan.to_json(),
                }
                for r in self.replicas
            ],
        }

    @classmethod
    def from_json(cls, d: dict) -> ServePlan:
        try:
            return cls(
                tuple(Replica(tuple(r["gpus"]), Plan.from_json(r["plan"])) for r in d["replicas"]),
                int(d["concurrency"]),
                d["choice"],
                tuple(d.get("reasons", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BadInput(
                f"not a fitmap serve plan (missing or wrong field {e}); make one with fitmap plan --serve --out"
            ) from None


def serve_plan(req, concurrency: int = 1, replicas: int | None = None, prep=None) -> ServePlan:
    """Choose between one split copy and k replicas for ``req`` (a ``pipeline.PlanRequest``)."""
    from fitmap import pipeline

    if concurrency < 1:
        raise BadInput(f"--concurrency must be at least 1 (got {concurrency})")
    prep = prep or pipeline.prepare(req)
    gpus = req.machine.gpus
    n = len(gpus)
    if replicas is not None:
        if replicas < 1 or (n and (replicas > n or n % replicas)):
            raise BadInput(
                f"--replicas {replicas} does not divide the {n} GPU(s) into equal groups; "
                f"use one of {', '.join(str(k) for k in _divisors(n))}"
                if n
                else f"--replicas must be at least 1 (got {replicas})"
            )
        options = [replicas]
    else:
        options = sorted(_divisors(n), reverse=True) if n else [1]
    reasons = []
    for k in options:
        group = n // k if n else 0
        batch = math.ceil(concurrency / k)
        plans = []
        for i in range(k):
            machine = replace(req.machine, gpus=gpus[i * group : (i + 1) * group], cpu=req.machine.cpu // k)
            r = replace(req, machine=machine, workload=replace(req.workload, batch=batch))
            plans.append(pipeline.plan(r, prep))
        first = plans[0]
        offloaded = sum(d.weights_bytes for d in first.devices if d.device in ("cpu", "disk")) if n else 0
        need = max((d.total_bytes for d in first.devices if d.device.isdigit()), default=0)
        name = _option(k, group, n)
        if all(p.fits for p in plans) and (k == 1 or not offloaded):
            each = " each" if k > 1 else ""
            reasons.append(
                f"{name}: fits, {batch} concurrent request(s){each}, at most {fmt_bytes(need)} per GPU"
                + (f" ({fmt_bytes(offloaded)} of weights offloaded)" if offloaded else "")
            )
            rel = (
                (
                    f"; about {k}x the decode throughput of one split copy (each replica decodes its own "
                    "requests; a split copy runs one GPU at a time)"
                )
                if k > 1 and n > 1
                else ""
            )
            return ServePlan(
                tuple(
                    Replica(tuple(g.index for g in gpus[i * group : (i + 1) * group]), p) for i, p in enumerate(plans)
                ),
                concurrency,
                f"{name}{rel}",
                tuple(reasons),
            )
        why = (
            f"each would offload {fmt_bytes(offloaded)} of weights to RAM/disk"
            if plans[0].fits
            else f"needs {fmt_bytes(first.shortfall_bytes)} more per replica"
        )
        reasons.append(f"{name} with {batch} concurrent request(s){' each' if k > 1 else ''}: does not fit ({why})")
    raise DoesNotFit(
        f"no placement serves {concurrency} concurrent request(s): "
        + "; ".join(reasons)
        + (f". {plans[0].advice}" if plans and plans[0].advice else "")
    )


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _option(k: int, group: int, n: int) -> str:
    if not n:
        return f"{k} replica(s) on the CPU"
    if k == 1:
        return f"one copy split across {n} GPU(s)" if n > 1 else "one copy on 1 GPU"
    return f"{k} replicas of {group} GPU(s) each"
