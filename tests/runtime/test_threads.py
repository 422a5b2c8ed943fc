"""torch's CPU threads for run, chat and serve: chosen from the work a token gives the CPU, the
user's ``--threads`` / ``OMP_NUM_THREADS`` kept; set in the thread that generates."""

from __future__ import annotations

import threading

import pytest
import torch

from fitmap.planning.plan import DeviceLedger, Plan
from fitmap.planning.workload import Workload
from fitmap.runtime import threads

MiB = 1 << 20


def _plan(weights: dict[str, int], execution_device: str = "cpu") -> Plan:
    ledgers = tuple(DeviceLedger(d, 64 << 30, w, 0, 0, 0, 0, w) for d, w in weights.items())
    return Plan(
        "m", True, "balanced", "float32", "analytic", Workload(1, 8, 8), {}, ledgers, execution_device=execution_device
    )


@pytest.fixture(autouse=True)
def _restore_threads():
    count = torch.get_num_threads()
    yield
    threads.fix(None)
    torch.set_num_threads(count)


def test_a_small_model_on_the_cpu_gets_one_thread_a_large_one_a_thread_per_share_of_its_weights():
    assert threads.choose([_plan({"cpu": 100 * MiB})], available=16, env={}).count == 1  # the demo's size
    big = _plan({"cpu": 4 * threads.BYTES_PER_THREAD, "disk": 2 * threads.BYTES_PER_THREAD})
    assert threads.choose([big], available=16, env={}).count == 6
    assert threads.choose([big], available=4, env={}).count == 4  # at most the cores
    assert threads.choose([big, big], available=4, env={}).count == 2  # replicas share the cores
    assert threads.choose([big] * 8, available=4, env={}).count == 1


def test_the_model_on_gpus_gets_one_thread_even_with_offloaded_weights():
    gpu = _plan({"0": 10 << 30, "cpu": 8 << 30}, execution_device="0")  # the cpu tier runs on GPU 0
    chosen = threads.choose([gpu], available=16, env={})
    assert chosen.count == 1 and "GPU" in chosen.why


def test_the_users_count_wins():
    big = _plan({"cpu": 8 << 30})
    assert threads.choose([big], requested=3, available=16, env={}) == threads.Threads(3, "--threads")
    kept = threads.choose([big], available=16, env={"OMP_NUM_THREADS": "5"})
    assert kept.why == "OMP_NUM_THREADS" and kept.count == torch.get_num_threads()


def test_apply_sets_the_thread_that_runs_and_threads_started_after():
    seen: dict[str, int] = {}

    def run(plan: Plan, key: str) -> None:
        torch.ones(4).sum()  # this thread has run an op: its count is its own from here on
        threads.apply(plan)
        seen[key] = torch.get_num_threads()

    worker = threading.Thread(target=run, args=(_plan({"cpu": 10 * MiB}), "small"))
    worker.start()
    worker.join()
    assert seen["small"] == 1
    threads.fix(threads.Threads(2, "--threads"))  # serve's choice for all replicas, before they start
    worker = threading.Thread(target=run, args=(_plan({"cpu": 10 * MiB}), "fixed"))
    worker.start()
    worker.join()
    assert seen["fixed"] == 2 and torch.get_num_threads() == 2


def test_run_with_threads_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    from fitmap.cli import main
    from fitmap.cli.demo import demo_checkpoint

    path = demo_checkpoint(tmp_path)
    assert main(["run", str(path), "--prompt", "describe this image .", "--new", "2", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    assert main(["run", str(path), "--prompt", "describe this image .", "--new", "2"]) == 0
    assert torch.get_num_threads() == 1  # the demo's ~100 MiB of weights on the CPU: one thread
    assert main(["run", str(path), "--prompt", "hi", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_the_tuner_uses_the_cores_other_processes_leave_free(monkeypatch):
    """Between decode steps: all of ``most`` on a quiet machine, one thread when other processes
    keep the cores busy, shared among the copies that compute at once; a fixed count is kept."""
    big = _plan({"cpu": 100 * MiB})
    chosen = threads.choose([big], available=2, env={})
    assert chosen.count == 1 and chosen.most == 2 and "up to 2" in chosen.why
    clock = {"t": 0.0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["t"])
    samples = iter(
        [
            (0, 0, 0, 2),
            (200, 20, 18, 2),  # quiet: others 2 of 200 ticks on 2 CPUs -> 0.02 cores busy
            (400, 220, 118, 2),  # others 100 of 200 ticks -> 1 core busy, 1 free
            (600, 420, 158, 2),  # others 160 of 200 ticks -> 1.6 cores busy
            (0, 0, 0, 2),
            (200, 20, 18, 2),  # quiet again, two copies computing at once: one thread each
        ]
    )
    monkeypatch.setattr(threads, "_jiffies", lambda: next(samples))
    monkeypatch.setattr(threads, "cores", lambda: 2)
    seen = []

    def run() -> None:
        for copies, steps in ((1, 4), (2, 2)):
            tune = threads.Tuner(chosen, copies=copies, every=0.5)  # sampled each call (1 s apart)
            for _ in range(steps):
                tune()
                seen.append(torch.get_num_threads())
                clock["t"] += 1.0

    t = threading.Thread(target=run)  # the count is per OS thread: tuned where it computes
    t.start()
    t.join()
    assert seen[1:4] == [2, 1, 1] and seen[5] == 1
    idle = threads.Tuner(chosen, every=0.5)
    idle.last = (clock["t"] - 60.0, 0, 0, 0)  # a sample from before a minute idle
    monkeypatch.setattr(threads, "_jiffies", lambda: (100, 10, 9, 2))
    torch.set_num_threads(2)
    idle()
    assert idle.last is not None and idle.last[0] == clock["t"] and torch.get_num_threads() == chosen.count
    assert threads.Tuner(threads.Threads(3, "--threads")).most == 0  # the user's count is left alone
    floor = threads.Tuner(threads.Threads(2, "6 GiB a token", most=4), every=0.5)  # cores taken
    floor.free, floor.last = 0.4, (clock["t"], 0, 0, 0)
    floor()
    assert torch.get_num_threads() == 2  # never below the count the model's work chose
