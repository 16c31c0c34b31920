"""The server's HTTP edges: one error shape, API keys, body-size limits, request metrics.

Every error answer is `{"error": {"message", "type", "param", "code"}}` (the OpenAI shape,
so OpenAI clients raise their usual exceptions). The limits run as plain ASGI middleware in
front of FastAPI: a body over `max_body_mb` is refused with 413 from its Content-Length, or
as soon as a chunked body passes the limit, before anything parses it.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from danlu.errors import DanluError

log = logging.getLogger("danlu")
OPEN_PATHS = ("/health", "/ready", "/metrics", "/", "/docs", "/openapi.json", "/favicon.ico")
ENDPOINTS = {
    "/health", "/ready", "/metrics", "/v1/models", "/v1/predict", "/v1/generate",
    "/v1/completions", "/v1/chat/completions", "/",
}  # fmt: skip


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.retry_after = param, retry_after


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def install_errors(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def answer(status: int, message: str, kind: str, param=None, headers=None) -> Any:
        return JSONResponse(error_body(status, message, kind, param), status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Any, e: ApiError) -> Any:
        headers = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after else None
        return answer(e.status, e.message, e.kind, e.param, headers)

    @app.exception_handler(DanluError)
    async def user_error(request: Any, e: DanluError) -> Any:
        message = f"{e.message}. {e.fix}" if e.fix else e.message
        first = e.message.split(" ", 1)[0]
        param = first if first == "inputs" or first.startswith("inputs.") else None
        return answer(422, message, "invalid_request_error", param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Any, e: RequestValidationError) -> Any:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return answer(400, "the request body is not valid JSON", "invalid_request_error")
        param = ".".join(loc) or None
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        what = f"{param}: {msg}" if param else msg
        return answer(422, what, "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Any, e: HTTPException) -> Any:
        kind = {404: "not_found", 405: "invalid_request_error"}.get(e.status_code, "error")
        return answer(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def bug(request: Any, e: Exception) -> Any:
        log.exception("unexpected error on %s", request.url.path)
        return answer(500, f"internal error: {type(e).__name__}", "server_error")


def endpoint_of(path: str) -> str:
    """A bounded label for metrics (never the raw path of a random 404)."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{name}"
    if path.startswith("/static/"):
        return "/static"
    return path if path in ENDPOINTS else "other"


def install_limits(app: Any, state: Any) -> None:
    app.add_middleware(Edge, state=state)


class Edge:
    """ASGI middleware: API keys, body size, in-flight count and per-request metrics."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings, metrics = self.state.settings, self.state.metrics
        path, start, status = scope["path"], time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        metrics.in_flight.inc()
        try:
            refused = self._refuse(scope, settings)
            limit = int(settings.max_body_mb * 1024 * 1024)
            if refused is None and not _has_length(scope):  # chunked: read it, up to the limit
                receive, refused = await _buffered(receive, limit)
            if refused is not None:
                await _send_json(send_status, *refused)
                return
            await self.app(scope, receive, send_status)
        finally:
            metrics.in_flight.dec()
            metrics.observe_request(endpoint_of(path), status[0], time.perf_counter() - start)

    def _refuse(self, scope: dict, settings: Any) -> tuple[int, dict, dict] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if settings.api_keys and scope["path"].startswith("/v1/"):
            key = headers.get("x-api-key")
            auth = headers.get("authorization", "")
            if key is None and auth.lower().startswith("bearer "):
                key = auth[7:].strip()
            if not key:
                msg = "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key'"
                return (
                    401,
                    error_body(401, msg, "authentication_error"),
                    {"www-authenticate": "Bearer"},
                )
            if not any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.api_keys):
                return 403, error_body(403, "the API key is not valid", "permission_error"), {}
        length = headers.get("content-length")
        limit = int(settings.max_body_mb * 1024 * 1024)
        if length is not None and length.isdigit() and int(length) > limit:
            return _too_large(limit)
        return None


def _too_large(limit: int) -> tuple[int, dict, dict]:
    mb = limit / 1024 / 1024
    msg = f"the request body is larger than {mb:.4g} MB (serve.max_body_mb)"
    return 413, error_body(413, msg, "request_too_large"), {}


def _has_length(scope: dict) -> bool:
    return scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") or any(
        k.lower() == b"content-length" for k, _ in scope["headers"]
    )


async def _buffered(receive: Any, limit: int) -> tuple[Any, tuple | None]:
    """A body without Content-Length, read whole (refused once it passes `limit`)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return receive, _too_large(limit)
        if not message.get("more_body", False):
            break
    body, sent = b"".join(chunks), [False]

    async def replay() -> dict:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay, None


async def _send_json(send: Any, status: int, body: dict, headers: dict) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})
