"""The OpenAI Python client, pointed at danlu's server, completes and streams unchanged."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from live import LiveServer

import danlu
from conftest import tiny_gpt_config
from danlu.config_serve import ServeSettings
from danlu.serve.generate import generate
from danlu.serve.server import create_app

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    run = danlu.train(tiny_gpt_config(root, 60, dim=16), run_dir=root / "lm", show_progress=False)
    settings = ServeSettings(api_keys=["sk-test"], max_new_tokens=64)
    with LiveServer(create_app([str(run.run.path)], settings, names=["tiny-lm"])) as live:
        live.run = run.run.path
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0)


def test_completion_equals_danlu_generate(server, client):
    expected = generate(server.run, "the cat", max_new_tokens=12, temperature=0.0)[0]
    out = client.completions.create(model="tiny-lm", prompt="the cat", max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == "tiny-lm"
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == 7  # a character tokenizer: one token per character
    assert out.usage.completion_tokens == len(expected)
    assert [m.id for m in client.models.list().data] == ["tiny-lm"]


def test_streamed_completion_joins_to_the_whole_text(client):
    whole = (
        client.completions.create(model="tiny-lm", prompt="the dog", max_tokens=16, temperature=0)
        .choices[0]
        .text
    )
    chunks = list(
        client.completions.create(
            model="tiny-lm", prompt="the dog", max_tokens=16, temperature=0, stream=True
        )
    )
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert "".join(pieces) == whole
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_completion_and_stream(client):
    messages = [{"role": "user", "content": "the cat"}]
    out = client.chat.completions.create(
        model="tiny-lm", messages=messages, max_tokens=10, temperature=0
    )
    text = out.choices[0].message.content
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert isinstance(text, str) and len(text) > 0
    stream = client.chat.completions.create(
        model="tiny-lm", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_sampling_is_seeded(client):
    kwargs = {"model": "tiny-lm", "prompt": "the", "max_tokens": 12, "temperature": 1.5}
    a = client.completions.create(seed=3, **kwargs).choices[0].text
    b = client.completions.create(seed=3, **kwargs).choices[0].text
    assert a == b
    many = client.completions.create(seed=3, n=3, **kwargs)
    assert len(many.choices) == 3 and [c.index for c in many.choices] == [0, 1, 2]


def test_client_errors_are_openai_errors(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "no model named 'nope'" in e.value.message
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model="tiny-lm", prompt="x", max_tokens=1000)
    assert "above this server's limit 64" in e.value.message
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        bad.completions.create(model="tiny-lm", prompt="x", max_tokens=2)


def test_danlu_generate_endpoint_streams_server_sent_events(server):
    headers = {"Authorization": "Bearer sk-test"}
    body = {"prompt": "the cat", "max_new_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/generate", json=body, headers=headers) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"finish_reason"' in lines[-2]
    body["stream"] = False
    whole = httpx.post(f"{server.url}/v1/generate", json=body, headers=headers).json()
    import json

    pieces = [json.loads(line[6:])["text"] for line in lines[:-2]]
    assert "".join(pieces) == whole["completions"][0]["text"]
    assert Path(server.run).is_dir()
