"""The server facing faults: bad requests, wrong keys, clients that leave, slow models, SIGTERM.

One server (module scope, API key required, 50 kB body limit) serves a tiny table classifier
and a tiny character GPT. Each fault must get its status and error body (`{"error": {message,
type, param, code}}`), and after EVERY fault the same server still answers a normal
prediction with `Predictor.predict`'s label and a greedy completion with the text it gave
before the faults. A client that drops a stream after its first chunk stops the generation
(the model stops at its next piece and the worker takes the next request); a second server
with a 0.5 s timeout answers 504 to a slowed predictor and a slowed generator. Last, `danlu
serve` in a subprocess gets SIGTERM while requests wait in its batcher: they all complete with
200, new connections are refused, and the process exits with code 0.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from live import LiveServer

import danlu
from conftest import tiny_config, tiny_gpt_config
from danlu.serve.predictor import Predictor
from danlu.serve.server import ServeSettings, create_app, free_port

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-faults-test"
ROW = {"a": 3.9, "b": 4.2, "colour": "red"}
PROMPT = {"model": "gpt", "prompt": "the cat", "max_tokens": 12, "temperature": 0}
JSON = {"content-type": "application/json"}


def state(live: LiveServer) -> Any:
    """The served app's shared state (models, batchers, generation worker)."""
    return live.server.config.app.state.danlu


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll `condition` every 50 ms for up to `seconds` (a bound, not a timing assertion)."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what} after {seconds:g} s")


# ------------------------------------------------------------------------- the models


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    env = pytest.MonkeyPatch()
    env.setenv("DANLU_CACHE", str(root / "cache"))
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    points = np.array([[0, 0], [4, 4], [0, 4]])[y] + rng.normal(0, 0.5, size=(90, 2))
    colour = np.array(["red", "green", "blue"])[y]
    rows = zip(points, colour, y, strict=True)
    lines = [f"{p[0]:.3f},{p[1]:.3f},{c},{'abc'[k]}" for p, c, k in rows]
    (root / "table.csv").write_text("a,b,colour,kind\n" + "\n".join(lines) + "\n")
    configs = {
        "table": tiny_config(str(root / "table.csv"), data={"label": "kind"}),
        "gpt": tiny_gpt_config(root, 40, dim=32),
    }
    out = {}
    for name, cfg in configs.items():
        out[name] = danlu.train(cfg, run_dir=root / name, show_progress=False).run.path
    env.undo()
    return out


@pytest.fixture(scope="module")
def row_label(runs: dict[str, Path]) -> str:
    return str(Predictor.load(runs["table"]).predict([ROW])["label"][0])


@pytest.fixture(scope="module")
def server(runs: dict[str, Path]) -> Iterator[LiveServer]:
    settings = ServeSettings(api_keys=[KEY], max_body_mb=0.05, max_wait_ms=2.0)
    with LiveServer(create_app(list(runs.values()), settings, load="now")) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def healthy(client: httpx.Client, row_label: str) -> Callable[[], None]:
    """Asserts the server answers a prediction and a greedy completion as it did at first."""
    first = client.post("/v1/completions", json=PROMPT)
    assert first.status_code == 200, first.text
    completion = first.json()["choices"][0]["text"]
    assert completion  # the tiny GPT continues the prompt

    def check() -> None:
        r = client.post("/v1/predict", json={"model": "table", "inputs": [ROW]})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] == row_label
        r = client.post("/v1/completions", json=PROMPT)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == completion

    return check


def error(response: httpx.Response, status: int, kind: str, param: str | None = None) -> str:
    """Asserts the status and the error body; its message."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert (body["code"], body["type"], body["param"]) == (status, kind, param), body
    assert body["message"]
    return body["message"]


class SlowGenerator:
    """The served generator, sleeping `delay` s before each piece it produces (so a generation
    lasts long enough to be interrupted); `pieces` counts what it produced."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay, self.pieces = inner, delay, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, texts: list[str], *, stream: Any = None, **options: Any) -> list[str]:
        def slow(row: int, piece: str) -> None:
            time.sleep(self.delay)
            self.pieces += 1
            if stream is not None:
                stream(row, piece)

        return self.inner(texts, stream=slow, **options)


# ------------------------------------------------------------------------- bad requests


def test_malformed_json_is_400(client, healthy):
    r = client.post("/v1/predict", content=b'{"inputs": [', headers=JSON)
    assert "not valid JSON" in error(r, 400, "invalid_request_error")
    healthy()


def test_wrong_types_are_422_naming_the_field(client, healthy):
    r = client.post("/v1/predict", json={"model": "table", "inputs": [5]})
    assert "table model takes objects" in error(r, 422, "invalid_request_error", "inputs.0")
    r = client.post("/v1/predict", json={"model": "table", "inputs": [ROW, {**ROW, "a": "x"}]})
    assert "must be a number" in error(r, 422, "invalid_request_error", "inputs.1.a")
    r = client.post("/v1/predict", json={"model": "table", "inputs": "a row"})
    error(r, 422, "invalid_request_error", "inputs")
    r = client.post("/v1/completions", json={**PROMPT, "max_tokens": "many"})
    error(r, 422, "invalid_request_error", "max_tokens")
    healthy()


def test_empty_inputs_are_422(client, healthy):
    r = client.post("/v1/predict", json={"model": "table", "inputs": []})
    assert "inputs is empty" in error(r, 422, "invalid_request_error", "inputs")
    healthy()


def test_unknown_model_is_404(client, healthy):
    r = client.post("/v1/predict", json={"model": "nope", "inputs": [ROW]})
    message = error(r, 404, "not_found", "model")
    assert "'nope'" in message and "table" in message and "gpt" in message
    healthy()


def test_oversize_bodies_are_413_with_or_without_content_length(client, healthy):
    big = json.dumps({"model": "table", "inputs": [ROW] * 2000}).encode()  # ~80 kB > 50 kB
    r = client.post("/v1/predict", content=big, headers=JSON)
    assert "larger than 0.05 MB" in error(r, 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    r = client.post("/v1/predict", content=chunks(), headers=JSON)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in r.request.headers
    assert "larger than 0.05 MB" in error(r, 413, "request_too_large")
    healthy()


def test_api_keys(server, healthy, row_label):
    body = {"model": "table", "inputs": [ROW]}
    r = httpx.post(f"{server.url}/v1/predict", json=body)
    assert "API key is required" in error(r, 401, "authentication_error")
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(f"{server.url}/v1/predict", json=body, headers={"Authorization": "Bearer x"})
    assert "not valid" in error(r, 403, "permission_error")
    r = httpx.post(f"{server.url}/v1/predict", json=body, headers={"X-API-Key": KEY})
    assert r.status_code == 200
    assert r.json()["predictions"][0]["label"] == row_label
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert sorted(m["id"] for m in models.json()["data"]) == ["gpt", "table"]
    healthy()


# --------------------------------------------------------------------- clients and time


def test_a_client_leaving_mid_stream_frees_the_generation_worker(
    server, client, healthy, monkeypatch
):
    whole = client.post("/v1/completions", json={**PROMPT, "max_tokens": 400}).json()
    assert whole["choices"][0]["finish_reason"] == "length"  # left alone, it runs 400 tokens
    assert whole["usage"]["completion_tokens"] == 400
    gpt = state(server).models["gpt"]
    slow = SlowGenerator(gpt.generator, delay=0.01)
    monkeypatch.setattr(gpt, "generator", slow)
    body = {**PROMPT, "max_tokens": 400, "stream": True}
    leaver = httpx.Client(base_url=server.url, headers=client.headers, timeout=30)
    with leaver, leaver.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"]  # a first piece came
    # the connection is closed: the model stops at its next piece and frees the worker
    wait_for(lambda: state(server).generation.waiting == 0, 20, "the generation to stop")
    assert slow.pieces < 400  # stopped early, not run to its 400 tokens
    monkeypatch.undo()
    healthy()


@pytest.fixture(scope="module")
def impatient(runs: dict[str, Path]) -> Iterator[LiveServer]:
    settings = ServeSettings(timeout_s=0.5, max_wait_ms=1.0)
    with LiveServer(create_app(list(runs.values()), settings, load="now")) as live:
        yield live


def test_a_slow_prediction_is_504_and_the_server_goes_on(impatient, row_label, monkeypatch):
    predictor = state(impatient).models["table"].predictor
    fast = predictor.predict
    monkeypatch.setattr(predictor, "predict", lambda items: (time.sleep(1.5), fast(items))[1])
    body = {"model": "table", "inputs": [ROW]}
    r = httpx.post(f"{impatient.url}/v1/predict", json=body, timeout=30)
    assert "no answer within 0.5 s" in error(r, 504, "timeout")
    monkeypatch.undo()
    wait_for(lambda: state(impatient).batchers["table"].depth == 0, 20, "the batch to end")
    r = httpx.post(f"{impatient.url}/v1/predict", json=body, timeout=30)
    assert r.status_code == 200
    assert r.json()["predictions"][0]["label"] == row_label


def test_a_slow_generation_is_504_and_stops(impatient, monkeypatch):
    gpt = state(impatient).models["gpt"]
    normal = httpx.post(f"{impatient.url}/v1/completions", json=PROMPT, timeout=30)
    assert normal.status_code == 200
    slow = SlowGenerator(gpt.generator, delay=0.02)
    monkeypatch.setattr(gpt, "generator", slow)
    r = httpx.post(f"{impatient.url}/v1/completions", json={**PROMPT, "max_tokens": 200},
                   timeout=30)  # fmt: skip
    error(r, 504, "timeout")
    wait_for(lambda: state(impatient).generation.waiting == 0, 20, "the generation to stop")
    assert slow.pieces < 200
    monkeypatch.undo()
    again = httpx.post(f"{impatient.url}/v1/completions", json=PROMPT, timeout=30)
    assert again.status_code == 200
    assert again.json()["choices"][0]["text"] == normal.json()["choices"][0]["text"]


# ------------------------------------------------------------------------ graceful stop


def in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return float(re.search(r"^danlu_in_flight_requests (\S+)$", text, re.M).group(1))


def test_sigterm_drains_in_flight_requests_and_exits_0(runs, row_label, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    danlu_cli = Path(sys.executable).with_name("danlu")
    command = [str(danlu_cli), "serve", str(runs["table"]), "--port", str(port),
               "--max-wait-ms", "3000", "--max-batch-size", "64", "--no-playground"]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        return ready(url)

    try:
        wait_for(up, 120, "`danlu serve` to get ready")
        answers: list[httpx.Response] = []

        def ask() -> None:  # waits in the batcher for company, up to 3 s
            body = {"inputs": [ROW]}
            answers.append(httpx.post(f"{url}/v1/predict", json=body, timeout=60))

        askers = [threading.Thread(target=ask) for _ in range(4)]
        for t in askers:
            t.start()
        wait_for(lambda: in_flight(url) >= 5, 20, "4 requests in flight")  # + this /metrics
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            # A probe that reaches the listening socket as it closes is accepted by the kernel
            # and then reset: not served either, so it counts as refused (any server does this).
            try:
                httpx.get(f"{url}/health", timeout=2)
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                return True
            return False

        wait_for(refused, 20, "new connections to be refused")
        for t in askers:
            t.join(timeout=60)
        assert [a.status_code for a in answers] == [200] * 4
        assert {a.json()["predictions"][0]["label"] for a in answers} == {row_label}
        assert proc.wait(timeout=60) == 0
        assert refused()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
