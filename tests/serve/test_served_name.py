"""``fitmap serve --served-model-name``: the real server process on loopback and the official
``openai`` client; and the default name (the model directory's, not its full path)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.serve.server import free_port, running_server  # noqa: E402  (after the skips)

NAME = "acme/tiny-chat"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fitmap.cli.demo import demo_checkpoint

    model = demo_checkpoint(tmp_path_factory.mktemp("named"))
    port = free_port()
    args = [str(model), "--served-model-name", NAME, "--cpu", "4GiB", "--new", "8", "--prompt", "128"]
    with running_server([*args, "--max-batch", "1"], port, drop_env=("OMP_NUM_THREADS",)) as proc:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        yield client, str(model), proc


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
