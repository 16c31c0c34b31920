"""The server under concurrent load: a tiny table classifier served by uvicorn in a thread of
this process, hit by httpx.AsyncClient with 64 requests in flight.

Every request is one table row; every 200 must carry the label and probabilities that
`Predictor.predict` gives the same row alone, no request may get a 5xx or lose its connection,
and the danlu_batch_size histogram in /metrics must show model calls with more than one input
(the dynamic batcher gathered concurrent requests). A second server with a queue of two inputs
refuses part of the same load with 429 + Retry-After and still answers the rest correctly.
The full 10,000-request run is marked slow; benchmarks/serve_load.py measures throughput.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from live import LiveServer

import danlu
from conftest import tiny_config
from danlu.serve.predictor import Predictor
from danlu.serve.server import ServeSettings, create_app

pytestmark = pytest.mark.usefixtures("one_thread")
CONCURRENCY = 64
CLASSES = ("ant", "bee", "cat")


def state(live: LiveServer) -> Any:
    """The served app's shared state (models, batchers, metrics)."""
    return live.server.config.app.state.danlu


# ------------------------------------------------------------------------ the model


def write_table(path: Path) -> Path:
    """Three classes around three centres of (a, b) and a colour that mostly follows them."""
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    points = np.array([[0, 0], [4, 4], [0, 4]])[y] + rng.normal(0, 0.6, size=(120, 2))
    colour = np.array(["red", "green", "blue"])[(y + (rng.random(120) < 0.2)) % 3]
    rows = zip(points, colour, y, strict=True)
    lines = [f"{p[0]:.4f},{p[1]:.4f},{c},{CLASSES[k]}" for p, c, k in rows]
    path.write_text("a,b,colour,kind\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def table_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("load")
    env = pytest.MonkeyPatch()
    env.setenv("DANLU_CACHE", str(root / "cache"))
    cfg = tiny_config(str(write_table(root / "table.csv")), data={"label": "kind"})
    run = danlu.train(cfg, run_dir=root / "table", show_progress=False).run.path
    env.undo()
    return run


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    """200 distinct rows spread over the whole input space (some between the classes)."""
    rng = np.random.default_rng(7)
    colours = ["red", "green", "blue"]
    return [
        {"a": round(float(a), 4), "b": round(float(b), 4), "colour": colours[i % 3]}
        for i, (a, b) in enumerate(rng.uniform(-1.5, 5.5, size=(200, 2)))
    ]


@pytest.fixture(scope="module")
def expected(table_run: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What Predictor.predict gives each row on its own."""
    predictor = Predictor.load(table_run)
    out = []
    for row in rows:
        rec = predictor.predict([row]).to_dict("records")[0]
        out.append({"label": rec["label"], "probs": [rec[f"prob_{c}"] for c in CLASSES]})
    assert len({e["label"] for e in out}) == 3  # the rows reach every class
    return out


@pytest.fixture(scope="module")
def server(table_run: Path) -> Iterator[LiveServer]:
    settings = ServeSettings(max_batch_size=32, max_wait_ms=5.0, max_queue=256)
    with LiveServer(create_app([table_run], settings, load="now")) as live:
        yield live


# --------------------------------------------------------------------------- the load


async def fire(url: str, rows: list[dict], n: int, deadline_s: float = 240.0) -> list[tuple]:
    """`n` one-row POST /v1/predict at CONCURRENCY in flight, request i sending row i % len:
    (i, status, JSON body or None, Retry-After header) per request, in completion order."""
    bodies = [json.dumps({"inputs": [row]}).encode() for row in rows]
    results: list[tuple] = []
    counter = iter(range(n))
    stop_at = time.monotonic() + deadline_s
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()  # plain http; shared: each client would load the CAs
    headers = {"content-type": "application/json"}

    async def worker() -> None:  # its own client: one pool of 64 costs ~10 ms CPU a request
        async with httpx.AsyncClient(limits=limits, timeout=60.0, verify=tls) as client:
            await requests_from(client)

    async def requests_from(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.monotonic() > stop_at:
                return
            try:
                r = await client.post(f"{url}/v1/predict", content=bodies[i % len(rows)],
                                      headers=headers)  # fmt: skip
            except httpx.TransportError as e:
                results.append((i, type(e).__name__, None, None))
                continue
            body = r.json() if r.headers.get("content-type") == "application/json" else None
            results.append((i, r.status_code, body, r.headers.get("retry-after")))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    assert len(results) == n, "the load stopped at its deadline"
    return results


def check_answers(results: list[tuple], expected: list[dict]) -> Counter:
    """Every 200 matches Predictor.predict on the same row; the status counts."""
    for i, status, body, _ in results:
        if status != 200:
            continue
        want = expected[i % len(expected)]
        (got,) = body["predictions"]
        assert got["label"] == want["label"], f"request {i}"
        probs = [got["probabilities"][c] for c in CLASSES]
        np.testing.assert_allclose(probs, want["probs"], atol=1e-5, err_msg=f"request {i}")
        assert got["confidence"] == pytest.approx(max(want["probs"]), abs=1e-5)
    return Counter(status for _, status, _, _ in results)


def metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """One sample of the Prometheus text exposition (labels in any order); `default` when
    the series does not exist yet."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    if default is not None:
        return default
    raise AssertionError(f"no sample {name}{labels} in /metrics")


# ------------------------------------------------------------------------------ tests


def test_concurrent_requests_are_batched_and_all_answered_correctly(server, rows, expected):
    before = httpx.get(f"{server.url}/metrics").text
    n = 2000
    results = asyncio.run(fire(server.url, rows, n))
    statuses = check_answers(results, expected)
    assert statuses == {200: n}

    text = httpx.get(f"{server.url}/metrics").text
    model = "table"
    calls = metric(text, "danlu_batch_size_count", model=model)
    calls -= metric(before, "danlu_batch_size_count", 0.0, model=model)
    inputs = metric(text, "danlu_batch_size_sum", model=model)
    inputs -= metric(before, "danlu_batch_size_sum", 0.0, model=model)
    singles = metric(text, "danlu_batch_size_bucket", model=model, le="1.0")
    singles -= metric(before, "danlu_batch_size_bucket", 0.0, model=model, le="1.0")
    assert inputs == n  # every input ran through the model exactly once
    assert calls < n and singles < calls  # some model calls held several requests
    assert metric(text, "danlu_batch_size_bucket", model=model, le="32.0") == metric(
        text, "danlu_batch_size_count", model=model
    )  # and none more than max_batch_size
    ok = metric(text, "danlu_requests_total", endpoint="/v1/predict", status="200")
    assert ok >= n
    assert 'status="5' not in text  # no 5xx recorded by the server either
    assert state(server).batchers[model].depth == 0


def test_a_full_queue_answers_429_with_retry_after_and_no_5xx(table_run, rows, expected):
    settings = ServeSettings(max_batch_size=4, max_wait_ms=20.0, max_queue=2)
    with LiveServer(create_app([table_run], settings, load="now")) as live:
        results = asyncio.run(fire(live.url, rows, 400))
        after = httpx.post(f"{live.url}/v1/predict", json={"inputs": [rows[0]]})
    statuses = check_answers(results, expected)
    assert set(statuses) == {200, 429}, statuses
    assert statuses[429] > 0 and statuses[200] > 0
    for _, status, body, retry_after in results:
        if status == 429:
            assert int(retry_after) >= 1
            assert body["error"]["type"] == "overloaded"
            assert body["error"]["code"] == 429
            assert "retry after" in body["error"]["message"]
    assert after.status_code == 200  # the queue drained: the server answers again
    assert after.json()["predictions"][0]["label"] == expected[0]["label"]


@pytest.mark.slow
def test_ten_thousand_requests_at_concurrency_64(server, rows, expected):
    n = 10_000
    results = asyncio.run(fire(server.url, rows, n, deadline_s=900.0))
    assert check_answers(results, expected) == {200: n}
