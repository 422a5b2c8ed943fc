"""``fitmap serve --served-model-name``: the real server process on loopback and the official
``openai`` client; and the default name (the model directory's, not its full path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

NAME = "acme/tiny-chat"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fitmap.cli.demo import demo_checkpoint

    model = demo_checkpoint(tmp_path_factory.mktemp("named"))
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fitmap.cli", "serve", str(model), "--served-model-name", NAME, "--cpu", "4GiB"]
        + ["--new", "8", "--prompt", "128", "--max-batch", "1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fitmap serve exited: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("fitmap serve did not come up in 180 s")
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    yield client, str(model), proc
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_models_lists_the_served_name_and_a_request_naming_it_is_answered(server):
    client, _, _ = server
    assert [m.id for m in client.models.list().data] == [NAME]
    msgs = [{"role": "user", "content": "what is in this image ?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=4)
    assert r.model == NAME and r.usage.completion_tokens == 4 and r.choices[0].message.content is not None
    streamed = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=4, stream=True)
    chunks = list(streamed)
    assert {c.model for c in chunks} == {NAME}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    c = client.completions.create(model=NAME, prompt="hello there", max_tokens=2)
    assert c.model == NAME and c.choices[0].text is not None


def test_the_model_as_given_is_still_accepted_and_any_other_name_is_not_found(server):
    client, model, _ = server
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    assert r.model == NAME  # responses carry the served name whichever accepted name was asked for
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and NAME in e.value.body["message"]


def test_default_name_is_the_directory_name_or_the_id_as_given(tmp_path, monkeypatch):
    from fitmap.cli.run_commands import served_name
    from fitmap.errors import BadInput

    model = tmp_path / "my-model"
    model.mkdir()
    assert served_name(str(model)) == "my-model"
    assert served_name(str(model) + "/") == "my-model"
    monkeypatch.chdir(model)
    assert served_name(".") == "my-model"
    assert served_name("Qwen/Qwen2-VL-7B-Instruct") == "Qwen/Qwen2-VL-7B-Instruct"  # not a directory here
    assert served_name("llama-3.1-8b") == "llama-3.1-8b"
    assert served_name(str(model), "mine") == "mine"
    with pytest.raises(BadInput, match="served-model-name"):
        served_name(str(model), " ")
