"""fitmap serve against hostile clients, all at once, on one real server process (loopback only):
normal chat requests through the official ``openai`` client while raw sockets send malformed JSON,
wrong types, NaN and infinities, huge numbers, deep nesting, invalid UTF-8, an oversize body, a
request sent half and stalled, and streams dropped mid-way. No answer is a 5xx, every 4xx is in
OpenAI's error shape, the normal requests get the (greedy) text they get alone, and the server is
healthy after with its memory about where it was. Bounded: every socket has a timeout, every loop
a count."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.serve.server import free_port, running_server  # noqa: E402
from tests.serve.test_serve import KEY, NEW, _get, _metric  # noqa: E402

MSGS = [{"role": "user", "content": "what is in this image ?"}]
RSS_GROWTH = 200 << 20  # generous: allocator caches, the tokenizer's, Python's free lists
TIMEOUT = 20.0  # per socket operation


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fitmap.cli.demo import demo_checkpoint

    model = demo_checkpoint(tmp_path_factory.mktemp("hostile"))
    port = free_port()
    args = [str(model), "--cpu", "4GiB", "--replicas", "2", "--new", str(NEW), "--prompt", "256"]
    args += ["--host", "127.0.0.1", "--api-key", KEY, "--max-queue", "64"]
    with running_server(args, port) as proc:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
        yield proc, port, client, str(model)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _head(port: int, length: int | None, path: str = "/v1/chat/completions", extra: str = "") -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Authorization: Bearer {KEY}",
        "Content-Type: application/json",
        "Connection: close",
    ]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def _exchange(port: int, data: bytes, chunks: tuple[bytes, ...] = ()) -> tuple[int, bytes]:
    """Send ``data`` (then ``chunks``, if any), read the whole answer: (status, body); 0 when none came."""
    got = []
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        try:
            s.sendall(data)
            for c in chunks:
                s.sendall(c)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) before the whole body was sent: read its answer
        for _ in range(10_000):
            try:
                b = s.recv(1 << 16)
            except (ConnectionResetError, TimeoutError):
                break
            if not b:
                break
            got.append(b)
    raw = b"".join(got)
    if not raw.startswith(b"HTTP/1.1 "):
        return 0, raw
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _post(port: int, body: bytes, path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    return _exchange(port, _head(port, len(body), path) + body)


def _chat(**extra) -> bytes:
    return json.dumps({"messages": MSGS, "max_tokens": 4} | extra).encode()


HOSTILE: list[tuple[str, bytes]] = [
    ("malformed", b"{not json"),
    ("truncated", b'{"messages": [{"role": "user", "content": "hi"'),
    ("empty", b""),
    ("array", b"[1, 2, 3]"),
    ("messages-string", _chat(messages="hi")),
    ("role-number", _chat(messages=[{"role": 5, "content": "hi"}])),
    ("content-number", _chat(messages=[{"role": "user", "content": 12}])),
    ("parts-numbers", _chat(messages=[{"role": "user", "content": [1, 2]}])),
    ("max-tokens-string", _chat(max_tokens="ten")),
    ("max-tokens-bool", _chat(max_tokens=True)),
    ("max-tokens-float", _chat(max_tokens=2.5)),
    ("stop-number", _chat(stop=5)),
    ("temperature-string", _chat(temperature="hot")),
    ("nan", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("inf", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}'),
    ("minus-inf", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}'),
    ("float-overflow", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}'),
    ("huge-int", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}"),
    ("big-int", _chat(max_tokens=10**30)),
    ("big-seed", _chat(seed=2**80)),
    ("big-temperature", _chat(temperature=1e308)),
    ("deep-array", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("deep-object", b'{"x": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}"),
    ("deep-content", _chat(messages=[{"role": "user", "content": [{"type": "text", "text": [[[[[["hi"]]]]]]}]}])),
    ("invalid-utf8", b'{"messages": [{"role": "user", "content": "\xff\xfe\xc3("}]}'),
    ("lone-surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("nul", b'{"messages": [{"role": "user", "content": "a\\u0000b"}], "model": "\\u0000"}'),
    ("completions-prompt-dict", b'{"prompt": {"a": 1}, "max_tokens": 2}'),
]


def _is_openai_error(status: int, body: bytes) -> bool:
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


def test_hostile_clients_do_not_disturb_the_server(server):
    proc, port, client, model = server
    base = f"http://127.0.0.1:{port}"

    def ask() -> str:
        r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=NEW)
        return r.choices[0].message.content

    alone = ask()  # greedy (temperature 0): the text every normal request below must get
    rss_before = _rss(proc.pid)
    t0 = time.time()

    answers: dict[str, list[tuple[int, bytes]]] = {}
    texts: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def record(name: str, status: int, body: bytes) -> None:
        with lock:
            answers.setdefault(name, []).append((status, body[:300]))

    def normal() -> None:
        try:
            for _ in range(4):
                got = ask()
                with lock:
                    texts.append(got)
        except Exception as e:  # noqa: BLE001  (collected and asserted below)
            errors.append(f"normal: {type(e).__name__}: {e}")

    def hostile() -> None:
        try:
            for _ in range(3):
                for name, body in HOSTILE:
                    path = "/v1/completions" if name.startswith("completions") else "/v1/chat/completions"
                    record(name, *_post(port, body, path))
        except Exception as e:  # noqa: BLE001
            errors.append(f"hostile: {type(e).__name__}: {e}")

    def oversize() -> None:
        try:
            limit = 16 << 20
            # declared over the limit, body never sent in full: refused from the header
            record("oversize-declared", *_exchange(port, _head(port, limit + 1) + b'{"messages": '))

            # chunked, no length: read to the limit and refused
            def chunk(piece: bytes) -> bytes:
                return f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

            head = _head(port, None, extra="Transfer-Encoding: chunked\r\n") + chunk(b'{"a": "')
            record("oversize-chunked", *_exchange(port, head, (chunk(b"x" * (1 << 20)),) * 17 + (b"0\r\n\r\n",)))
        except Exception as e:  # noqa: BLE001
            errors.append(f"oversize: {type(e).__name__}: {e}")

    stalled: list[socket.socket] = []

    def slow() -> None:
        """Half a request and then nothing, held open while the others run: a body half sent, and
        headers half sent."""
        try:
            for data in (_head(port, 200) + _chat()[:20], _head(port, 200)[:40]):
                s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                s.sendall(data)
                stalled.append(s)
        except Exception as e:  # noqa: BLE001
            errors.append(f"slow: {type(e).__name__}: {e}")

    def dropper() -> None:
        """Streams dropped after their first event, and a non-streamed request dropped before its answer."""
        try:
            for i in range(4):
                body = json.dumps({"model": model, "messages": MSGS, "max_tokens": NEW, "stream": i % 2 == 0})
                s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                s.sendall(_head(port, len(body)) + body.encode())
                if i % 2 == 0:
                    first = s.recv(4096)
                    record("dropped-stream", int(first.split(b" ", 2)[1]) if first.startswith(b"HTTP/") else 0, b"")
                s.close()
        except Exception as e:  # noqa: BLE001
            errors.append(f"dropper: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=normal) for _ in range(4)]
    threads += [threading.Thread(target=f) for f in (hostile, hostile, oversize, slow, dropper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.time() - t0
    healthy_while_stalled = _get(base + "/health", None)[0]
    for s in stalled:
        s.close()
    assert not any(t.is_alive() for t in threads), "a client thread is still running after 120 s"
    assert healthy_while_stalled == 200

    assert errors == []
    assert texts == [alone] * 16  # the same greedy text as alone, while the hostile clients ran
    fives = {name: got for name, got in answers.items() if any(status >= 500 for status, _ in got)}
    assert fives == {}
    for name, _ in HOSTILE:
        for status, body in answers[name]:
            assert 400 <= status < 500 and _is_openai_error(status, body), (name, status, body)
    for name in ("oversize-declared", "oversize-chunked"):
        assert [s for s, _ in answers[name]] == [413], (name, answers[name])
        assert _is_openai_error(413, answers[name][0][1])
    assert [s for s, _ in answers["dropped-stream"]] == [200, 200]

    # the server is still healthy, serving, and the stalled and dropped requests hold no replica
    assert _get(base + "/health", None)[0] == 200
    deadline = time.time() + 30
    while time.time() < deadline and sum(_metric(base, "fitmap_replica_pending").values()) > 0:
        time.sleep(0.2)
    assert sum(_metric(base, "fitmap_replica_pending").values()) == 0
    assert ask() == alone
    growth = _rss(proc.pid) - rss_before
    assert growth < RSS_GROWTH, f"the server's RSS grew by {growth >> 20} MiB"
    assert proc.poll() is None
    assert elapsed < 90, f"the hostile round took {elapsed:.0f} s"
