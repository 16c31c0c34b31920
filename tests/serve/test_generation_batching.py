"""Generation requests that wait together run as one batched call, each as it would alone.

Generator.run_batch is checked directly (deterministic): per request its own token limit, stop
strings, seed, stream and cancellation, and the same text as the request run by itself. Then a
live server under concurrent requests: every answer equals its solo answer, /metrics shows
model calls that carried several prompts, and `--max-batch-size 1` keeps them one at a time.
"""

from __future__ import annotations

import re
import threading

import httpx
import pytest
from live import LiveServer

import danlu
from conftest import tiny_gpt_config
from danlu.config_serve import ServeSettings
from danlu.serve.generate import Generator, Part
from danlu.serve.server import create_app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    cfg = tiny_gpt_config(root, 60, dim=16)
    return danlu.train(cfg, run_dir=root / "lm", show_progress=False).run.path


@pytest.fixture(scope="module")
def gen(lm):
    return Generator(lm)


def parts_with_streams(specs: list[dict]) -> tuple[list[Part], list[list[str]]]:
    """Parts whose streamed pieces are kept per row: pieces[part][row]."""
    pieces: list[list[str]] = [[""] * len(spec["texts"]) for spec in specs]

    def keep(k: int, row: int, piece: str) -> None:
        pieces[k][row] += piece

    parts = [
        Part(**spec, stream=lambda row, piece, k=k: keep(k, row, piece))
        for k, spec in enumerate(specs)
    ]
    return parts, pieces


SPECS = [
    {"texts": ["the cat"], "max_new_tokens": 12, "stop": [], "seed": 1},
    {"texts": ["the dog ran", "the dog ran"], "max_new_tokens": 5, "stop": [], "seed": 2},
    {"texts": ["on the"], "max_new_tokens": 20, "stop": ["."], "seed": 3},
]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_each_request_in_a_batch_gets_what_it_gets_alone(gen, temperature):
    parts, pieces = parts_with_streams(SPECS)
    together = gen.run_batch(parts, temperature=temperature)
    for spec, texts, streamed in zip(SPECS, together, pieces, strict=True):
        alone = gen(
            spec["texts"], max_new_tokens=spec["max_new_tokens"], stop=spec["stop"],
            seed=spec["seed"], temperature=temperature,
        )  # fmt: skip
        assert texts == alone
        assert streamed == texts
        assert gen.count_tokens(texts[0]) <= spec["max_new_tokens"]  # its own limit
    assert "." not in together[2][0]  # its own stop string, cut before
    assert gen.count_tokens(together[1][0]) == 5  # the shortest limit did not end the others
    assert gen.count_tokens(together[0][0]) == 12


def test_a_request_whose_client_left_stops_while_the_others_go_on(gen):
    specs = [*SPECS[:1], {"texts": ["the mat"], "max_new_tokens": 12, "stop": [], "seed": 4}]
    parts, _ = parts_with_streams(specs)
    gone = threading.Event()
    sent: list[str] = []
    parts[1].stream = lambda row, piece: (sent.append(piece), gone.set())
    parts[1].cancelled = gone.is_set  # the client leaves after its first piece
    together = gen.run_batch(parts, temperature=0.0)
    assert together[0] == gen(["the cat"], max_new_tokens=12, temperature=0.0)
    assert len(sent) == 1  # nothing was sent after it left
    assert gen.count_tokens(together[0][0]) == 12


def metric(text: str, name: str) -> float:
    found = re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    return sum(float(v) for v in found)


def concurrent(url: str, bodies: list[dict]) -> list[dict]:
    answers: list[dict] = [{} for _ in bodies]

    def ask(i: int) -> None:
        r = httpx.post(f"{url}/v1/completions", json=bodies[i], timeout=60)
        answers[i] = r.json() if r.status_code == 200 else {"status": r.status_code, "body": r.text}

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    failed = [a for a in answers if "choices" not in a]
    assert not failed, failed
    return answers


def bodies() -> list[dict]:
    prompts = ["the cat", "the dog", "on the mat", "the", "ran to", "sat on", "a cat", "dog."]
    out = []
    for i, prompt in enumerate(prompts):
        body = {"model": "lm", "prompt": prompt, "max_tokens": 24 + 2 * i, "temperature": 0}
        if i % 2:  # sampled with a seed: reproducible, batched or not
            body |= {"temperature": 1.0, "seed": 100 + i}
        out.append(body)
    return out


@pytest.mark.parametrize("max_batch", [16, 1])
def test_a_live_server_batches_concurrent_requests_without_changing_answers(lm, gen, max_batch):
    settings = ServeSettings(max_batch_size=max_batch, max_new_tokens=64)
    with LiveServer(create_app([str(lm)], settings, names=["lm"])) as live:
        rows = 0.0
        for _ in range(5):  # a round of 8 at once; the first runs while the rest queue
            before = httpx.get(f"{live.url}/metrics").text
            answers = concurrent(live.url, bodies())
            after = httpx.get(f"{live.url}/metrics").text
            calls = metric(after, "danlu_batch_size_count") - metric(
                before, "danlu_batch_size_count"
            )
            rows = metric(after, "danlu_batch_size_sum") - metric(before, "danlu_batch_size_sum")
            assert rows == 8
            for body, answer in zip(bodies(), answers, strict=True):
                alone = gen([body["prompt"]], max_new_tokens=body["max_tokens"],
                            temperature=body["temperature"], seed=body.get("seed", 0))  # fmt: skip
                assert answer["choices"][0]["text"] == alone[0], body
            if max_batch == 1 or calls < 8:
                break
        if max_batch == 1:
            assert calls == 8  # one prompt per model call
        else:
            assert calls < 8  # at least one call carried several requests


def test_when_a_batched_call_fails_each_request_runs_alone(lm, gen, monkeypatch):
    failed: list[int] = []

    def broken(self, parts, **options):
        failed.append(len(parts))
        raise RuntimeError("a batched call failed")

    monkeypatch.setattr(Generator, "run_batch", broken)
    settings = ServeSettings(max_batch_size=16, max_new_tokens=64)
    with LiveServer(create_app([str(lm)], settings, names=["lm"])) as live:
        for _ in range(5):  # until requests met in the queue and a batched call was tried
            answers = concurrent(live.url, bodies())  # every request still gets its answer
            if failed:
                break
    assert failed and min(failed) > 1
    for body, answer in zip(bodies(), answers, strict=True):
        alone = gen([body["prompt"]], max_new_tokens=body["max_tokens"],
                    temperature=body["temperature"], seed=body.get("seed", 0))  # fmt: skip
        assert answer["choices"][0]["text"] == alone[0]
