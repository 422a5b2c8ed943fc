"""fitmap serve: the real server process on loopback, the official ``openai`` client, the demo's
tiny VLM on the CPU in two replicas; and the serving placement on full-size catalog models."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.serve.server import free_port, running_server  # noqa: E402  (after the skips)

KEY = "test-key"
NEW = 12


def _get(url: str, key: str | None = KEY) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fitmap.cli.demo import demo_checkpoint

    model = demo_checkpoint(tmp_path_factory.mktemp("serve"))
    port = free_port()
    args = [str(model), "--cpu", "4GiB", "--replicas", "2", "--new", str(NEW), "--prompt", "256"]
    args += ["--image", "64x48", "--api-key", KEY, "--max-queue", "40"]  # room for the one image a request carries
    with running_server(args, port):
        base = f"http://127.0.0.1:{port}"
        yield base, openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120), str(model)


def _data_url(size=(64, 48)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _metric(base: str, name: str) -> dict[str, float]:
    _, text = _get(base + "/metrics")
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_text_streaming_and_an_image_through_the_openai_client(server):
    base, client, model = server
    assert [m.id for m in client.models.list().data] == [os.path.basename(model)]  # the directory's name
    msgs = [{"role": "user", "content": "what is in this image ?"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=6)
    text = r.choices[0].message.content
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0 and r.choices[0].finish_reason == "length"
    streamed = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text  # greedy: the same text
    image = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_url()}},
                {"type": "text", "text": "what is in this image ?"},
            ],
        }
    ]
    r = client.chat.completions.create(model=model, messages=image, max_tokens=4)
    assert r.usage.prompt_tokens > 6 and r.choices[0].message.content is not None
    c = client.completions.create(model=model, prompt="hello there", max_tokens=3)
    assert c.choices[0].text is not None and c.usage.completion_tokens <= 3


def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(server):
    base, client, model = server
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=msgs, max_tokens=NEW + 1)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="data URLs"):
        client.chat.completions.create(
            model=model,
            max_tokens=2,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ],
        )
    with pytest.raises(openai.BadRequestError, match="not a readable image"):
        client.chat.completions.create(
            model=model,
            max_tokens=2,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ],
        )
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model, messages=msgs, max_tokens=2, temperature=7)
    with pytest.raises(openai.BadRequestError, match="'max_tokens' is -1; it must be at least 1"):
        client.chat.completions.create(model=model, messages=msgs, max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="prompt has about"):
        client.chat.completions.create(
            model=model, max_tokens=2, messages=[{"role": "user", "content": "hello " * 400}]
        )
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=b"{not json",
        method="POST",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(req, timeout=10)
    assert http.value.code == 400 and json.loads(http.value.read())["error"]["type"] == "invalid_request_error"
    for path, method, status in (("/v1/nope", "GET", 404), ("/v1/chat/completions", "GET", 405)):
        req = urllib.request.Request(base + path, method=method, headers={"Authorization": f"Bearer {KEY}"})
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(req, timeout=10)
        assert http.value.code == status and path in json.loads(http.value.read())["error"]["message"]
    assert client.chat.completions.create(model=model, messages=msgs, max_tokens=2).choices[0].message is not None


def test_api_key_guards_every_endpoint_but_health(server):
    base, _, model = server
    assert _get(base + "/health", None)[0] == 200
    assert _get(base + "/v1/models", None)[0] == 401
    assert _get(base + "/metrics", "wrong")[0] == 401
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_two_replicas_loaded_once_share_concurrent_requests_with_identical_greedy_text(server):
    """A bounded load test: 16 clients x 2 identical requests, all answered, the same text, both replicas used,
    each loaded exactly once."""
    base, client, model = server
    before = _metric(base, "fitmap_replica_requests_total")
    msgs = [{"role": "user", "content": "what is in this image ?"}]
    texts, errors = [], []

    def one_client():
        try:
            for _ in range(2):
                r = client.chat.completions.create(model=model, messages=msgs, max_tokens=4)
                texts.append(r.choices[0].message.content)
        except Exception as e:  # noqa: BLE001  (collected and asserted below)
            errors.append(e)

    threads = [threading.Thread(target=one_client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and len(texts) == 32 and len(set(texts)) == 1
    after = _metric(base, "fitmap_replica_requests_total")
    served = {k: after[k] - before.get(k, 0) for k in after}
    assert len(served) == 2 and all(v > 0 for v in served.values()) and sum(served.values()) == 32
    assert set(_metric(base, "fitmap_replica_loads_total").values()) == {1.0}


def test_mixed_requests_arriving_at_random_times_get_what_they_get_alone(server):
    """Continuous batching through the official openai client: greedy and seeded sampled requests,
    a stop string, images, streamed or not, different lengths, sent at random moments so that they
    join running batches; each gets the text and finish reason it gets when it is the only request."""
    import random

    base, client, model = server

    def user(text: str, image: bool = False) -> list[dict]:
        parts = [{"type": "text", "text": text}]
        if image:
            parts.insert(0, {"type": "image_url", "image_url": {"url": _data_url()}})
        return [{"role": "user", "content": parts}]

    asks = [
        {"messages": user("what is in this image ?"), "max_tokens": NEW},
        {"messages": user("hello there"), "max_tokens": 5, "temperature": 0.9, "seed": 11},
        {"messages": user("what is in this image ?", image=True), "max_tokens": 9},
        {"messages": user("describe the colour"), "max_tokens": NEW, "temperature": 1.0, "top_p": 0.8, "seed": 5},
        {"messages": user("a b c", image=True), "max_tokens": 7, "temperature": 0.7, "seed": 3, "stream": True},
        {"messages": user("is it red ?"), "max_tokens": 3, "stream": True},
    ]
    greedy = client.chat.completions.create(model=model, **asks[0]).choices[0].message.content
    words = greedy.split()
    asks.append({"messages": user("what is in this image ?"), "max_tokens": NEW, "stop": [words[len(words) // 2]]})

    def send(ask: dict) -> tuple[str, str]:
        if ask.get("stream"):
            text, finish = "", None
            for c in client.chat.completions.create(model=model, **ask):
                text += c.choices[0].delta.content or ""
                finish = c.choices[0].finish_reason or finish
            return text, finish
        r = client.chat.completions.create(model=model, **ask)
        return r.choices[0].message.content, r.choices[0].finish_reason

    alone = [send(a) for a in asks]
    assert alone[-1][1] == "stop" and words[len(words) // 2] not in alone[-1][0]
    assert alone[0] == send(asks[0])  # greedy twice: the same
    before = sum(_metric(base, "fitmap_replica_batches_total").values())
    rng = random.Random(0)
    got: list[tuple[int, tuple[str, str]]] = []
    delays = {k: rng.random() * 0.3 for k in range(2 * len(asks))}

    def late(k: int, i: int) -> None:
        time.sleep(delays[k])
        got.append((i, send(asks[i])))

    order = [i for i in range(len(asks)) for _ in range(2)]  # each one twice, so that batches form
    threads = [threading.Thread(target=late, args=(k, i)) for k, i in enumerate(order)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(got) == len(order) and all(answer == alone[i] for i, answer in got)
    assert sum(_metric(base, "fitmap_replica_batches_total").values()) - before < sum(a["max_tokens"] for a in asks) * 2
    tokens = _metric(base, "fitmap_replica_tokens_budget")
    assert len(tokens) == 2 and all(v > 0 for v in tokens.values())
    assert set(_metric(base, "fitmap_replica_tokens_in_flight").values()) == {0.0}  # all answered, nothing held


def test_a_client_that_disconnects_mid_stream_frees_its_replica(server):
    import http.client

    base, client, model = server
    port = int(base.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": NEW, "stream": True}
    )
    conn.request(
        "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.close()  # gone after the first event
    deadline = time.time() + 30
    while time.time() < deadline and sum(_metric(base, "fitmap_replica_pending").values()) > 0:
        time.sleep(0.2)
    assert sum(_metric(base, "fitmap_replica_pending").values()) == 0
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message is not None


@pytest.mark.parametrize("model,gpus,replicas", [("llama-3.1-8b", "4x24GiB", 4), ("llama-3.1-70b", "4x40GiB", 1)])
def test_serving_placement_replicas_or_one_split_copy(model, gpus, replicas, capsys):
    from fitmap.cli import main

    assert main(["plan", model, "--gpus", gpus, "--serve", "--json", "--estimate", "analytic"]) == 0
    sp = json.loads(capsys.readouterr().out)
    assert len(sp["replicas"]) == replicas and sp["reasons"] and sp["choice"]
    groups = [tuple(r["gpus"]) for r in sp["replicas"]]
    assert sorted(g for grp in groups for g in grp) == [0, 1, 2, 3]  # disjoint, all GPUs used
    for r in sp["replicas"]:
        assert {str(d) for d in r["device_map"].values()} <= {str(g) for g in r["gpus"]}
    assert main(["plan", model, "--gpus", gpus, "--serve", "--replicas", "3", "--estimate", "analytic"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_a_request_that_fails_in_its_replica_is_a_500_and_nothing_leaks(tmp_path, monkeypatch):
    """In process (FastAPI's TestClient): a replica whose prefill raises answers that request with a
    server_error and serves the next; twenty requests leave no tensor behind."""
    import gc

    import torch
    from fastapi.testclient import TestClient

    from fitmap import pipeline
    from fitmap.cli.demo import demo_checkpoint
    from fitmap.planning.devices import make_machine
    from fitmap.planning.workload import Workload
    from fitmap.serve import engine as eng
    from fitmap.serve.app import create_app
    from fitmap.serve.batcher import Batch
    from fitmap.serve.placement import serve_plan

    model = demo_checkpoint(tmp_path)
    req = pipeline.PlanRequest(str(model), make_machine(None, "4GiB"), Workload(1, 128, 4), estimate="analytic")
    engine = eng.Engine(model, serve_plan(req), max_queue=4)
    engine.start()
    real = Batch.join

    def sometimes(self, job, inputs, prefill=None):
        if job.messages and "boom" in job.messages[-1]["text"]:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, job, inputs, prefill)

    monkeypatch.setattr(Batch, "join", sometimes)
    try:
        client = TestClient(create_app(engine, "m"))
        ask = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "boom"}]}
        r = client.post("/v1/chat/completions", json=ask)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "out of memory" in r.json()["error"]["message"]
        ask["messages"][0]["content"] = "what is in this image ?"

        def tensors() -> int:
            import warnings

            gc.collect()
            with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op warns
                warnings.simplefilter("ignore")
                return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

        assert client.post("/v1/chat/completions", json=ask).status_code == 200
        before = tensors()
        for _ in range(20):
            assert client.post("/v1/chat/completions", json=ask).status_code == 200
        assert tensors() <= before
        assert engine.queued == 0
    finally:
        engine.stop()


def test_requests_decoded_together_answer_as_they_would_alone(tmp_path, monkeypatch):
    """Greedy text requests queued at one replica decode in one continuous batch (prompts of
    different lengths, left-padded; max_tokens 3-5 each): every request gets the text, token count
    and finish reason ``generate`` gives it alone (``--max-batch 1``), in fewer decode steps than
    tokens."""
    import asyncio

    from fitmap import pipeline
    from fitmap.cli.demo import demo_checkpoint
    from fitmap.planning.devices import make_machine
    from fitmap.planning.workload import Workload
    from fitmap.runtime import threads
    from fitmap.serve import engine as eng
    from fitmap.serve.placement import serve_plan

    # one thread for both ways: greedy ties of a random model must not turn on the thread count
    monkeypatch.setattr(threads, "_fixed", threads.Threads(1, "--threads"))
    model = demo_checkpoint(tmp_path)
    req = pipeline.PlanRequest(str(model), make_machine(None, "4GiB"), Workload(1, 128, 8), estimate="analytic")
    prompts = ["what is in this image ?", "hello there", "what is in this image ? and the colour ?", "a b c d"]

    def answers(max_batch: int) -> tuple[list, int]:
        engine = eng.Engine(model, serve_plan(req, concurrency=8), max_queue=40, max_batch=max_batch)
        engine.start()
        loop = asyncio.new_event_loop()

        async def go():
            jobs = []
            for i in range(8):
                j = eng.Request([{"role": "user", "text": prompts[i % 4], "images": []}], None, 3 + i % 3)
                j.loop, j.chunks = loop, asyncio.Queue()
                jobs.append(j)
            for j in jobs:
                engine.submit(j)
            out = []
            for j in jobs:
                parts = []
                while (item := await j.chunks.get()) is not eng.END:
                    parts.append(item)
                out.append(("".join(parts), j.completion_tokens, j.finish_reason))
            return out

        try:
            got = loop.run_until_complete(go())
            deadline = time.time() + 10
            while engine.queued and time.time() < deadline:
                time.sleep(0.05)
            w = engine.workers[0]
            return got, (w.batches if w.batch is None else w.batch.steps)
        finally:
            engine.stop()
            loop.close()

    alone, calls_alone = answers(1)
    together, calls_together = answers(8)
    assert together == alone and calls_alone == 8 and calls_together < sum(n for _, n, _ in alone)


def test_a_serve_plan_written_by_plan_is_read_back(tmp_path, capsys):
    from fitmap.cli import main
    from fitmap.serve.placement import ServePlan

    out = tmp_path / "serve.json"
    assert (
        main(
            [
                "plan",
                "llama-3.1-8b",
                "--gpus",
                "2x24GiB",
                "--serve",
                "--concurrency",
                "2",
                "--estimate",
                "analytic",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    sp = ServePlan.from_json(json.loads(out.read_text()))
    assert len(sp.replicas) == 2 and sp.concurrency == 2 and sp.replicas[1].gpus == (1,)
    assert ServePlan.from_json(sp.to_json()) == sp
    plain = tmp_path / "plain.json"
    assert main(["plan", "llama-3.1-8b", "--gpus", "1x24GiB", "--estimate", "analytic", "--out", str(plain)]) == 0
    capsys.readouterr()
    assert main(["serve", "llama-3.1-8b", "--plan", str(plain)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1


def test_a_port_in_use_is_one_line_before_anything_loads(tmp_path, capsys):
    from fitmap.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "llama-3.1-8b", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose another --port" in err[0]
