"""Bad request bodies (issue 27) are 400s in OpenAI's error shape naming the field, never a 200 or a 500.

Raw HTTP against the real app (FastAPI's TestClient) over the demo's tiny VLM, planned for one
64x48 image per request; its replicas are never started: every request here is refused before
one would reach them, and a valid control request gets as far as the queue (429 from a full one)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from fitmap import pipeline
    from fitmap.cli.demo import demo_checkpoint
    from fitmap.planning.devices import make_machine
    from fitmap.planning.workload import Workload
    from fitmap.serve import engine as eng
    from fitmap.serve.app import create_app
    from fitmap.serve.placement import serve_plan

    model = demo_checkpoint(tmp_path_factory.mktemp("bad-requests"))
    workload = Workload(1, 128, 4, ((64, 48),))
    req = pipeline.PlanRequest(str(model), make_machine(None, "4GiB"), workload, estimate="analytic")
    engine = eng.Engine(model, serve_plan(req), max_queue=0)  # not started; a request that passes gets a 429
    return TestClient(create_app(engine, "m"))


def _post(client, body: bytes | dict, path: str = "/v1/chat/completions"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


def _ask(**fields) -> dict:
    return {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **fields}


def _refused(r, param: str | None, needle: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert needle in error["message"] and "\n" not in error["message"], error


def _data_url(size=(64, 48)) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _with_images(count: int) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": _data_url()}} for _ in range(count)]
    return _ask(messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "what is it ?"}]}])


def test_a_valid_request_passes_every_check(client):
    full = _post(client, _ask(n=1, stream=False, seed=2**63 - 1, temperature=0.5, top_p=1))
    assert full.status_code == 429 and 1 <= int(full.headers["retry-after"]) <= 60  # when to come back
    assert full.json()["error"]["type"] == "rate_limit_error"
    assert _post(client, _with_images(1)).status_code == 429  # the one image the plan holds


@pytest.mark.parametrize(
    "raw,param",
    [
        (b'"temperature": NaN', "temperature"),
        (b'"temperature": Infinity', "temperature"),
        (b'"temperature": -Infinity', "temperature"),
        (b'"temperature": 1e999', "temperature"),
        (b'"top_p": NaN', "top_p"),
    ],
)
def test_a_number_that_is_not_finite_is_refused_by_name(client, raw, param):
    body = b'{"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], ' + raw + b"}"
    _refused(_post(client, body), param, "must be a finite number")
    _refused(
        _post(
            client,
            body.replace(b'"messages": [{"role": "user", "content": "hi"}]', b'"prompt": "hi"'),
            "/v1/completions",
        ),
        param,
        "must be a finite number",
    )


def test_n_above_one_is_refused(client):
    _refused(_post(client, _ask(n=5)), "n", "only n=1 is supported")
    _refused(_post(client, _ask(n="1")), "n", "only n=1 is supported")


@pytest.mark.parametrize("value", ["false", "true", 0, 1, [], {}])
def test_stream_must_be_a_json_boolean(client, value):
    _refused(_post(client, _ask(stream=value)), "stream", "must be a boolean")


@pytest.mark.parametrize("value", [2**70, 2**63, -(2**63) - 1])
def test_a_seed_beyond_64_bits_is_refused(client, value):
    _refused(_post(client, _ask(seed=value)), "seed", "64-bit integer")


def test_text_that_cannot_be_encoded_is_refused(client):
    body = b'{"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    _refused(_post(client, body), "messages[0].content", "cannot be encoded")
    body = b'{"model": "m", "max_tokens": 2, "prompt": "\\udfff"}'
    _refused(_post(client, body, "/v1/completions"), "prompt", "cannot be encoded")
    _refused(_post(client, b'{"\\ud800": 1, "prompt": "hi"}', "/v1/completions"), "the request body", "cannot be")


@pytest.mark.parametrize("depth", [100, 5000, 200_000])
def test_json_nested_too_deep_is_refused(client, depth):
    nested = b"[" * depth + b"]" * depth
    body = b'{"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], "x": ' + nested + b"}"
    _refused(_post(client, body), None, "levels deep")
    bare = _post(client, b"[" * depth + b"]" * depth)  # not an object either: one of the two is said
    _refused(bare, None, "levels deep" if depth > 1000 else "must be a JSON object")


def test_an_integer_too_long_to_read_is_invalid_json(client):
    body = b'{"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000
    _refused(_post(client, body + b"}"), None, "not valid JSON")


def test_more_images_than_the_plan_holds_are_refused_with_the_number_allowed(client):
    _refused(_post(client, _with_images(3)), "messages", "carries 3 image(s); this server was planned for 1")


def test_a_huge_value_is_not_echoed_whole(client):
    r = _post(client, _ask(stream="x" * 1_000_000))
    _refused(r, "stream", "must be a boolean")
    assert len(r.json()["error"]["message"]) < 300
