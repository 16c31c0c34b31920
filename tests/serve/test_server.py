"""The HTTP server in-process (FastAPI TestClient): predictions equal Predictor's, every error
has one shape and the right status, dynamic batching groups requests, /metrics counts them."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

import danlu
from conftest import make_images, tiny_config, tiny_gpt_config, write_idx_folder
from danlu.config_serve import ServeSettings
from danlu.errors import DataError
from danlu.serve.batching import Batcher, Overloaded
from danlu.serve.predictor import Predictor
from danlu.serve.server import create_app

pytestmark = pytest.mark.usefixtures("one_thread")


def _table_csv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    a = rng.normal(y * 3.0, 0.5)
    b = rng.normal(-y * 2.0, 0.5)
    colour = np.array(["red", "green", "blue"])[y]
    pd.DataFrame({"a": a, "b": b, "colour": colour, "kind": np.array(["ant", "bee", "cat"])[y]}).to_csv(path, index=False)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    csv = _table_csv(root / "blobs.csv")
    cfg = tiny_config(str(csv), data={"label": "kind"})
    out["table"] = danlu.train(cfg, run_dir=root / "table", show_progress=False).run.path
    texts = root / "texts.csv"
    rows = ["text,label"] + [f"good great fine day {i},pos" for i in range(30)]
    rows += [f"bad awful poor night {i},neg" for i in range(30)]
    texts.write_text("\n".join(rows) + "\n")
    cfg = tiny_config(
        str(texts),
        data={"task": "classification", "text": "text", "label": "label",
              "tokenizer": {"type": "char", "max_length": 24}},
        model={"type": "rnn", "cell": "gru", "hidden_size": 8, "dim": 8},
    )  # fmt: skip
    del cfg["model"]["hidden_sizes"]
    out["text"] = danlu.train(cfg, run_dir=root / "text", show_progress=False).run.path
    idx = write_idx_folder(root / "idx")
    cfg = tiny_config(str(idx), model={"type": "cnn", "channels": [4], "head_sizes": [8]})
    del cfg["model"]["hidden_sizes"]
    out["image"] = danlu.train(cfg, run_dir=root / "image", show_progress=False).run.path
    gpt = root / "gpt"
    gpt.mkdir()
    cfg = tiny_gpt_config(gpt, 40, dim=16)
    out["gpt"] = danlu.train(cfg, run_dir=gpt / "run", show_progress=False).run.path
    return out


def _client(refs, **settings) -> TestClient:
    app = create_app([str(r) for r in refs], ServeSettings(**settings), load="now")
    return TestClient(app)


def _png(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_table_predictions_equal_the_predictor(runs):
    rows = [{"a": 0.1, "b": 0.2, "colour": "red"}, {"a": 6.0, "b": -4.0, "colour": "blue"}]
    expected = Predictor.load(runs["table"]).predict(pd.DataFrame(rows))
    with _client([runs["table"]]) as c:
        r = c.post("/v1/predict", json={"inputs": rows})
        assert r.status_code == 200
        body = r.json()
    assert body["model"] == "table"
    assert [p["label"] for p in body["predictions"]] == list(expected["label"])
    for p, (_, e) in zip(body["predictions"], expected.iterrows(), strict=True):
        assert p["confidence"] == pytest.approx(e["confidence"], abs=1e-6)
        assert set(p["probabilities"]) == {"ant", "bee", "cat"}
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_text_and_image_predictions_equal_the_predictor(runs):
    texts = ["good great day", "awful poor night"]
    expected = Predictor.load(runs["text"]).predict(texts)
    with _client([runs["text"]]) as c:
        body = c.post("/v1/predict", json={"inputs": texts}).json()
        one = c.post("/v1/predict", json={"input": texts[0]}).json()
    assert [p["label"] for p in body["predictions"]] == list(expected["label"])
    assert one["predictions"][0] == body["predictions"][0]
    x, _ = make_images(4, seed=3)
    expected = Predictor.load(runs["image"]).predict(x[:, 0])
    with _client([runs["image"]]) as c:
        items = [_png(img[0]) for img in x]
        items[1] = "data:image/png;base64," + items[1]
        body = c.post("/v1/predict", json={"inputs": items}).json()
    got = [p["confidence"] for p in body["predictions"]]
    np.testing.assert_allclose(got, expected["confidence"], atol=1e-6)


def test_models_list_and_info(runs):
    with _client([runs["table"], runs["gpt"]]) as c:
        listed = c.get("/v1/models").json()
        info = c.get("/v1/models/table").json()
        gpt = c.get("/v1/models/run").json()
        assert c.get("/ready").json() == {"status": "ready", "models": ["table", "run"]}
        assert c.get("/openapi.json").json()["paths"]["/v1/predict"]
    assert [m["id"] for m in listed["data"]] == ["table", "run"]
    assert listed["object"] == "list"
    assert info["kind"] == "classifier" and info["input"] == "table"
    assert info["info"]["classes"] == ["ant", "bee", "cat"]
    features = {f["name"]: f for f in info["info"]["features"]}
    assert features["a"]["type"] == "number"
    assert features["colour"] == {"name": "colour", "type": "category",
                                  "values": ["blue", "green", "red"]}  # fmt: skip
    assert info["info"]["lineage"]["config_hash"]
    assert gpt["kind"] == "generator" and gpt["task"] == "language_modeling"


@pytest.mark.parametrize(
    ("body", "status", "param", "text"),
    [
        ({"inputs": []}, 422, "inputs", "inputs is empty"),
        ({"inputs": ["x"]}, 422, "inputs.0", "a table model takes objects"),
        ({"inputs": [{"a": 1, "b": 2}]}, 422, "inputs.0", "no column 'colour'"),
        ({"inputs": [{"a": "x", "b": 2, "colour": "red"}]}, 422, "inputs.0.a", "must be a number"),
        ({"inputs": "x"}, 422, "inputs", "valid list"),
        ({}, 422, None, "either 'inputs'"),
        ({"input": {"a": 1}, "extra": 1}, 422, "extra", "Extra inputs"),
        ({"model": "nope", "inputs": [{}]}, 404, "model", "no model named 'nope'"),
    ],
)
def test_bad_requests_get_one_clear_error(runs, body, status, param, text):
    with _client([runs["table"]]) as c:
        r = c.post("/v1/predict", json=body)
        ok = c.post("/v1/predict", json={"input": {"a": 1, "b": 2, "colour": "red"}})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == status and error["param"] == param
    assert text in error["message"]
    assert ok.status_code == 200  # and the server keeps serving


def test_malformed_json_oversize_body_and_wrong_endpoint(runs):
    with _client([runs["table"], runs["gpt"]], max_body_mb=0.001) as c:
        r = c.post("/v1/predict", content=b"{nope", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = c.post("/v1/predict", json={"model": "table", "inputs": ["x" * 2000]})
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
        r = c.post("/v1/predict", json={"model": "run", "inputs": ["the"]})
        assert r.status_code == 422 and "/v1/generate" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "table", "prompt": "x"})
        assert r.status_code == 422 and "/v1/predict" in r.json()["error"]["message"]
        r = c.post("/v1/predict", json={"inputs": [{"a": 1, "b": 2, "colour": "red"}]})
        assert r.status_code == 422 and r.json()["error"]["param"] == "model"


def test_api_keys(runs, monkeypatch):
    monkeypatch.setenv("DANLU_API_KEYS", "k1, k2")
    row = {"input": {"a": 1, "b": 2, "colour": "red"}}
    with _client([runs["table"]]) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
        r = c.post("/v1/predict", json=row)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/predict", json=row, headers={"X-API-Key": "k3"}).status_code == 403
        assert c.post("/v1/predict", json=row, headers={"X-API-Key": "k2"}).status_code == 200
        ok = c.get("/v1/models", headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200


def test_ready_waits_for_the_models(runs):
    app = create_app([str(runs["table"])])  # loads in the background at startup
    with TestClient(app) as c:
        deadline = time.monotonic() + 30
        while c.get("/ready").status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/ready").json()["status"] == "ready"
    app = create_app(["no/such/run"])
    with TestClient(app) as c:
        deadline = time.monotonic() + 30
        while c.get("/ready").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.get("/ready")
        assert r.status_code == 503 and "no/such/run" in r.json()["error"]
        r = c.post("/v1/predict", json={"inputs": ["x"]})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]


def test_metrics_count_requests_and_batches(runs):
    with _client([runs["table"]]) as c:
        for _ in range(3):
            c.post("/v1/predict", json={"inputs": [{"a": 1, "b": 2, "colour": "red"}] * 2})
        c.post("/v1/predict", json={"inputs": []})
        text = c.get("/metrics").text
    assert 'danlu_requests_total{endpoint="/v1/predict",status="200"} 3.0' in text
    assert 'danlu_requests_total{endpoint="/v1/predict",status="422"} 1.0' in text
    assert 'danlu_batch_size_sum{model="table"} 6.0' in text
    assert 'danlu_queue_depth{model="table"} 0.0' in text
    assert "danlu_request_seconds_bucket" in text


# ----------------------------------------------------------------------- the batcher


def test_batcher_groups_concurrent_requests_and_keeps_order():
    seen: list[int] = []

    def run(items):
        seen.append(len(items))
        time.sleep(0.01)
        return [i * 10 for i in items]

    batcher = Batcher(run, max_batch_size=8, max_wait_s=0.05, max_queue=100)

    async def main():
        return await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(10)))

    results = asyncio.run(main())
    batcher.close()
    assert results == [[i * 10, (i + 100) * 10] for i in range(10)]
    assert sum(seen) == 20 and max(seen) == 8 and len(seen) < 10


def test_batcher_isolates_the_request_at_fault():
    def run(items):
        if "bad" in items:
            raise DataError("inputs.0 is bad")
        return [len(x) for x in items]

    batcher = Batcher(run, max_batch_size=16, max_wait_s=0.05, max_queue=100)

    async def main():
        jobs = [batcher.submit(["aa"]), batcher.submit(["bad"]), batcher.submit(["abc"])]
        return await asyncio.gather(*jobs, return_exceptions=True)

    ok1, bad, ok2 = asyncio.run(main())
    batcher.close()
    assert ok1 == [2] and ok2 == [3]
    assert isinstance(bad, DataError)


def test_batcher_refuses_work_beyond_its_queue_and_drains_on_close():
    gate = threading.Event()

    def run(items):
        gate.wait(5)
        return items

    batcher = Batcher(run, max_batch_size=1, max_wait_s=0, max_queue=3)

    async def main():
        tasks = [asyncio.ensure_future(batcher.submit([0]))]
        await asyncio.sleep(0.2)  # it runs, held at the gate
        tasks += [asyncio.ensure_future(batcher.submit([i])) for i in (1, 2, 3)]
        await asyncio.sleep(0.1)  # three wait: the queue is full
        with pytest.raises(Overloaded) as e:
            await batcher.submit([99])
        assert e.value.retry_after >= 1
        gate.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [[0], [1], [2], [3]]
    batcher.close(timeout=5)
    assert batcher.depth == 0


def test_request_log_records_every_served_input(runs, tmp_path):
    from danlu.serve.requestlog import RequestLog

    rows = [{"a": 0.1, "b": 0.2, "colour": "red"}, {"a": 6.0, "b": -4.0, "colour": "blue"}]
    with _client([runs["table"], runs["gpt"]], request_log=str(tmp_path / "log")) as c:
        labels = [p["label"] for p in c.post("/v1/predict", json={"model": "table", "inputs": rows}).json()["predictions"]]  # fmt: skip
        body = {"model": "run", "prompt": "the cat", "max_tokens": 5, "temperature": 0}
        c.post("/v1/completions", json=body)
    records = list(RequestLog(tmp_path / "log").read())
    assert [r["endpoint"] for r in records] == ["/v1/predict", "/v1/predict", "/v1/completions"]
    assert [r["output"]["label"] for r in records[:2]] == labels
    assert records[0]["input"]["values"] == {"a": 0.1, "b": 0.2, "colour": "red"}
    assert records[2]["input"] == {"kind": "text", "chars": 7, "tokens": 7}
    assert records[2]["output"]["completion_tokens"] == 5
    assert all(r["latency_ms"] >= 0 for r in records)
