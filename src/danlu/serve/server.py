"""The HTTP server: `danlu serve REF` (FastAPI + uvicorn).

    app = create_app(["runs/fashion_cnn"], ServeSettings(max_batch_size=32))
    serve(["sentiment:prod"], ServeSettings(port=8000))        # blocks; Ctrl-C drains

Routes: /v1/predict (classifiers, regressors; dynamically batched), /v1/generate and the
OpenAI-compatible /v1/completions and /v1/chat/completions (language models; SSE streaming,
see openai_api.py), /v1/models, /health, /ready, /metrics (Prometheus), the playground at /
and the OpenAPI schema at /openapi.json (/docs to try it).

Models load in a background thread, so /health answers at once and /ready says when the models
are in memory. Every error is `{"error": {"message", "type", "param", "code"}}` with the status
that fits: 401/403 keys, 404 unknown model, 413 body too large, 422 bad input (naming the field),
429 queue full (with Retry-After), 503 not ready or stopping, 504 timeout. On SIGTERM/SIGINT
uvicorn stops accepting connections, in-flight requests finish (up to `drain_s`), then the
batchers finish their queues and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Response

from danlu.config_serve import ServeSettings
from danlu.errors import ServeError
from danlu.serve.batching import Batcher, Overloaded, ShuttingDown
from danlu.serve.http import ApiError, install_errors, install_limits
from danlu.serve.metrics import ServerMetrics
from danlu.serve.schemas import GenerateRequest, PredictRequest
from danlu.serve.served import ServedModel, rows_to_predictions

log = logging.getLogger("danlu")
STATIC = Path(__file__).parent / "static"

__all__ = ["ServeSettings", "create_app", "serve"]


class State:
    """What the routes share: the models (once loaded), their batchers, metrics, settings."""

    def __init__(self, refs: list[str], settings: ServeSettings, names: list[str] | None) -> None:
        self.refs = refs
        self.settings = settings
        self.names = names
        self.models: dict[str, ServedModel] = {}
        self.batchers: dict[str, Batcher] = {}
        self.metrics = ServerMetrics()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.stopping = False
        self.log = None  # danlu.serve.requestlog.RequestLog when settings.request_log is set
        from danlu.serve.generation_queue import GenerationRunner

        self.generation = GenerationRunner(
            settings.max_queue, settings.max_batch_size, self.metrics
        )

    # ---------------------------------------------------------------------- loading

    def load(self) -> None:
        try:
            if self.settings.request_log:
                from danlu.serve.requestlog import RequestLog

                self.log = RequestLog(self.settings.request_log)
            for i, ref in enumerate(self.refs):
                name, run = resolve_ref(ref, self.settings)
                name = self.names[i] if self.names else name
                if name in self.models:
                    raise ServeError(
                        f"two served models are named '{name}'", fix="serve them with --name"
                    )
                model = ServedModel.load(name, run)
                self.models[name] = model
                if model.predictor is not None:
                    self.batchers[name] = self._batcher(model)
                log.info("loaded %s from %s", name, run.path)
        except Exception as e:  # shown by /ready and the log; the process keeps answering
            self.load_error = str(e)
            log.error("could not load the models: %s", e)
            raise
        finally:
            self.ready.set()

    def _batcher(self, model: ServedModel) -> Batcher:
        s = self.settings
        regression = model.spec.task == "regression"

        def run_batch(items: list[Any]) -> list[dict[str, Any]]:
            return rows_to_predictions(model.predictor.predict(items), regression)

        return Batcher(
            run_batch,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue=s.max_queue,
            name=model.name,
            on_batch=lambda n, sec: self.metrics.observe_batch(model.name, n, sec),
            after=self._logger(model) if self.log is not None else None,
        )

    def _logger(self, model: ServedModel) -> Any:
        from danlu.serve.requestlog import record, summarize

        def after(items: list[Any], results: list[Any], seconds: float) -> None:
            summaries = summarize(model.predictor, model.predictor.collect(items))
            per_input = 1000 * seconds / max(len(items), 1)
            for summary, output in zip(summaries, results, strict=True):
                out = {k: output[k] for k in ("label", "confidence", "prediction") if k in output}
                self.log.append(record(model.name, "/v1/predict", summary, out, per_input))

        return after

    def model(self, name: str | None) -> ServedModel:
        if not self.ready.is_set() or (self.load_error is None and not self.models):
            raise ApiError(503, "the models are still loading", "not_ready", retry_after=1)
        if self.load_error is not None:
            raise ApiError(503, f"the models failed to load: {self.load_error}", "not_ready")
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise ApiError(
                422,
                f"several models are served ({', '.join(self.models)}): name one",
                "invalid_request_error",
                param="model",
            )
        if name not in self.models:
            served = ", ".join(self.models)
            raise ApiError(
                404, f"no model named '{name}' is served (served: {served})", "not_found",
                param="model",
            )  # fmt: skip
        return self.models[name]

    def close(self) -> None:
        self.stopping = True
        for batcher in self.batchers.values():
            batcher.close(timeout=self.settings.drain_s)
        self.generation.close(timeout=self.settings.drain_s)


def resolve_ref(ref: str, settings: ServeSettings) -> tuple[str, Any]:
    """A run directory or a registry reference → (served name, RunDir); with a trusted key,
    the run's signature (or the registry version's recorded signer) must verify."""
    from danlu.serve.store import resolve

    return resolve(ref, root=settings.registry, trusted_key=settings.trusted_key)


def create_app(
    refs: list[str | Path],
    settings: ServeSettings | None = None,
    *,
    names: list[str] | None = None,
    load: str = "background",
) -> Any:
    """The FastAPI app serving `refs`. `load`: "background" (the default; /ready says when
    done) or "now" (load before returning: errors raise here)."""
    from fastapi import FastAPI

    settings = settings or ServeSettings()
    if not settings.api_keys and os.environ.get("DANLU_API_KEYS"):
        keys = [k.strip() for k in os.environ["DANLU_API_KEYS"].split(",") if k.strip()]
        settings = settings.model_copy(update={"api_keys": keys})
    state = State([str(r) for r in refs], settings, names)
    if load == "now":
        state.load()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not state.ready.is_set():
            threading.Thread(target=_quiet(state.load), name="danlu-load", daemon=True).start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.close)

    app = FastAPI(
        title="danlu",
        version=_version(),
        description="danlu model server: predictions, generation, OpenAI-compatible API.",
        lifespan=lifespan,
    )
    app.state.danlu = state
    install_errors(app)
    install_limits(app, state)
    _routes(app, state)
    from danlu.serve.openai_api import routes as openai_routes

    app.include_router(openai_routes(state))
    if settings.playground:
        _playground(app)
    return app


def _routes(app: Any, state: State) -> None:
    @app.get("/health", tags=["ops"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    def ready(response: Response) -> dict[str, Any]:
        if state.stopping:
            response.status_code = 503
            return {"status": "stopping"}
        if not state.ready.is_set():
            response.status_code = 503
            return {"status": "loading"}
        if state.load_error is not None:
            response.status_code = 503
            return {"status": "failed", "error": state.load_error}
        return {"status": "ready", "models": list(state.models)}

    @app.get("/metrics", tags=["ops"])
    def metrics() -> Response:
        _read_drift(state)
        depths = {name: b.depth for name, b in state.batchers.items()}
        body, kind = state.metrics.render(depths)
        return Response(body, media_type=kind)

    @app.get("/v1/models", tags=["models"])
    def list_models() -> dict[str, Any]:
        if not state.ready.is_set():
            return {"object": "list", "data": []}
        return {"object": "list", "data": [m.card() for m in state.models.values()]}

    @app.get("/v1/models/{name}", tags=["models"])
    def show_model(name: str) -> dict[str, Any]:
        return state.model(name).card(info=True)

    @app.post("/v1/predict", tags=["predict"])
    async def predict(body: PredictRequest) -> dict[str, Any]:
        start = time.perf_counter()
        model = state.model(body.model)
        if model.predictor is None:
            raise ApiError(
                422,
                f"model '{model.name}' is a {model.spec.task} model: use /v1/generate, "
                "/v1/completions or /v1/chat/completions",
                "invalid_request_error",
                param="model",
            )
        if len(body.items) > state.settings.max_inputs:
            raise ApiError(
                413,
                f"{len(body.items)} inputs in one request; the limit is "
                f"{state.settings.max_inputs}",
                "request_too_large",
                param="inputs",
            )
        items = model.items(body.items)
        predictions = await _submit(state, state.batchers[model.name], items)
        ms = 1000 * (time.perf_counter() - start)
        return {"model": model.name, "predictions": predictions, "latency_ms": round(ms, 3)}

    @app.post("/v1/generate", tags=["generate"])
    async def generate(body: GenerateRequest) -> Any:
        from danlu.serve.openai_api import danlu_generate

        return await danlu_generate(state, body)


async def _submit(state: State, batcher: Batcher, items: list[Any]) -> list[Any]:
    try:
        return await asyncio.wait_for(batcher.submit(items), state.settings.timeout_s)
    except Overloaded as e:
        raise ApiError(
            429,
            f"the server is busy ({e.queued} inputs waiting); retry after {e.retry_after:.0f} s",
            "overloaded",
            retry_after=e.retry_after,
        ) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", "not_ready") from None
    except TimeoutError:
        raise ApiError(504, f"no answer within {state.settings.timeout_s:g} s", "timeout") from None


def _read_drift(state: State) -> None:
    """The latest `danlu monitor` results in the request log folder, as gauges."""
    if not state.settings.request_log:
        return
    import json

    path = Path(state.settings.request_log) / "monitor" / "drift.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    from danlu.serve.drift import gauges

    name = report.get("model") if isinstance(report, dict) else None
    with contextlib.suppress(Exception):  # an older or partial report: skip it
        if name in state.models:
            state.metrics.set_drift(name, gauges(report))


def _playground(app: Any) -> None:
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    @app.get("/", include_in_schema=False)
    def index() -> Any:
        return FileResponse(STATIC / "index.html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _quiet(fn: Any) -> Any:
    def run() -> None:
        with contextlib.suppress(Exception):  # recorded in state.load_error
            fn()

    return run


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("danlu")
    except PackageNotFoundError:
        return "0"


# -------------------------------------------------------------------------------- serve


def serve(
    refs: list[str | Path],
    settings: ServeSettings | None = None,
    *,
    names: list[str] | None = None,
    announce: Any = print,
) -> None:
    """Serve until SIGINT/SIGTERM, then drain. Loads the models before listening, so a bad
    reference is one error line, not a server that never gets ready."""
    import uvicorn

    settings = settings or ServeSettings()
    if settings.port == 0:
        settings = settings.model_copy(update={"port": free_port(settings.host)})
    app = create_app(refs, settings, names=names, load="now")
    state: State = app.state.danlu
    url = f"http://{settings.host}:{settings.port}"
    for model in state.models.values():
        announce(f"serving {model.name} ({model.spec.task}) from {model.run.path}")
    announce(f"playground: {url}/   API: {url}/docs   metrics: {url}/metrics")
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=int(settings.drain_s) or None,
        limit_concurrency=None,
        access_log=False,
    )
    clean_stop = threading.current_thread() is threading.main_thread()
    if clean_stop:  # uvicorn re-raises the signal that stopped it once it has drained:
        previous = signal.signal(signal.SIGTERM, lambda *_: None)  # then exit 0, not -15
    try:
        uvicorn.Server(config).run()
    finally:
        if clean_stop:
            signal.signal(signal.SIGTERM, previous)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
