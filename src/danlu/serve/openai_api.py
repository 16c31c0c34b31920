"""Language models over HTTP: /v1/generate and the OpenAI-compatible /v1/completions and
/v1/chat/completions, with server-sent-event streaming.

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="tiny-chat", messages=[...], stream=True)

Generation runs on one worker thread (a bounded queue: 429 when full). Requests that wait
while it works are continued together in one batched call when they share the model and the
sampling options (up to serve.max_batch_size prompts; GenerationRunner); each keeps its own
stop strings, token limit, seed and stream. A streamed reply sends each piece as the model
produces it; when the client goes away or the request times out, its rows stop being followed
(alone, the model stops at its next piece). Chat requests are rendered
with the run's chat template (chat runs); a plain language model gets the conversation as a
"role: text" transcript, a seq2seq model the last user message.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from danlu.errors import DanluError
from danlu.serve.batching import Overloaded, ShuttingDown
from danlu.serve.generation_queue import Cancelled, GenerationRunner
from danlu.serve.http import ApiError, error_body
from danlu.serve.schemas import ChatRequest, CompletionRequest, GenerateRequest

# ------------------------------------------------------------------------------- requests


class Job:
    """One generation request: prompts, options, and what came back."""

    def __init__(
        self,
        state: Any,
        model: Any,
        texts: list[str],
        options: dict,
        rendered: bool,
        endpoint: str = "/v1/generate",
    ):
        cap = state.settings.max_new_tokens
        if options["max_new_tokens"] > cap:
            raise ApiError(
                422,
                f"max tokens {options['max_new_tokens']} is above this server's limit {cap}",
                "invalid_request_error",
                param="max_tokens",
            )
        if options.get("seed") is None:
            options["seed"] = secrets.randbits(31)
        self.state, self.model, self.texts = state, model, texts
        self.options, self.rendered, self.endpoint = options, rendered, endpoint
        self.cancel = threading.Event()
        self.started = time.time()

    @property
    def key(self) -> tuple | None:
        """Requests with equal keys can be continued in one call; None: this one runs alone
        (seq2seq and beam search)."""
        o = self.options
        if self.model.generator.seq2seq or o.get("num_beams", 1) != 1:
            return None
        sample = (o["temperature"], o.get("top_k"), o.get("top_p"), o.get("repetition_penalty"))
        return (id(self.model), self.rendered, *sample)

    def run(self, stream: Callable[[int, str], None] | None = None) -> list[str]:
        def guarded(row: int, piece: str) -> None:
            if self.cancel.is_set():
                raise Cancelled()
            if stream is not None:
                stream(row, piece)

        gen = self.model.generator
        return gen(self.texts, stream=guarded, rendered=self.rendered, **self.options)

    def finish(self, text: str, index: int = 0) -> tuple[str, int]:
        """(finish_reason, completion tokens) of one returned text; logged when the server
        keeps a request log."""
        n = self.model.generator.count_tokens(text)
        self.state.metrics.tokens.labels(self.model.name).inc(n)
        reason = "length" if n >= self.options["max_new_tokens"] else "stop"
        if self.state.log is not None:
            from danlu.serve.requestlog import record

            prompt = self.texts[index]
            summary = {"kind": "text", "chars": len(prompt)}
            summary["tokens"] = self.model.generator.count_tokens(prompt)
            output = {"finish_reason": reason, "completion_tokens": n}
            ms = 1000 * (time.time() - self.started)
            self.state.log.append(record(self.model.name, self.endpoint, summary, output, ms))
        return reason, n

    async def result(self) -> list[str]:
        runner, timeout = self.state.generation, self.state.settings.timeout_s
        _reserve(runner)
        future = runner.submit(self, None)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self.cancel.set()
            raise ApiError(504, f"no answer within {timeout:g} s", "timeout") from None
        except Cancelled:
            raise ApiError(504, f"no answer within {timeout:g} s", "timeout") from None

    async def pieces(self) -> AsyncIterator[tuple[int, str] | list[str]]:
        """(row, piece) as produced, then the list of whole texts. The caller reserved."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def push(row: int, piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (row, piece))

        future = self.state.generation.submit(self, push)

        def done(f: asyncio.Future) -> None:
            if not f.cancelled():
                f.exception()  # retrieved here; raised below when the stream is still wanted
            queue.put_nowait(None)

        future.add_done_callback(done)
        deadline = time.monotonic() + self.state.settings.timeout_s
        try:
            while True:
                item = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0))
                if item is None:
                    break
                yield item
            yield future.result()
        finally:
            self.cancel.set()  # the client left, or a timeout: stop at the next piece


def _reserve(runner: GenerationRunner) -> None:
    try:
        runner.reserve()
    except Overloaded as e:
        raise ApiError(
            429,
            f"the server is busy ({e.queued} generation requests waiting); retry after "
            f"{e.retry_after:.0f} s",
            "overloaded",
            retry_after=e.retry_after,
        ) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", "not_ready") from None


def _generator(state: Any, name: str | None) -> Any:
    model = state.model(name)
    if model.generator is None:
        raise ApiError(
            422,
            f"model '{model.name}' is a {model.spec.task} model: use /v1/predict",
            "invalid_request_error",
            param="model",
        )
    return model


def _options(body: Any, max_new_tokens: int) -> dict[str, Any]:
    out = {"max_new_tokens": max_new_tokens, "temperature": body.temperature}
    out |= {"top_p": body.top_p if body.top_p not in (None, 1.0) else None}
    out |= {"stop": body.stop, "seed": body.seed}
    return out


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _stream_response(chunks: AsyncIterator[str]) -> Any:
    from fastapi.responses import StreamingResponse

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)


async def _guarded(job: Job, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream that ends with an error event instead of breaking the connection."""
    try:
        async for event in events:
            yield event
    except TimeoutError:
        timeout = job.state.settings.timeout_s
        yield _sse(error_body(504, f"no answer within {timeout:g} s", "timeout"))
    except DanluError as e:
        yield _sse(error_body(422, str(e), "invalid_request_error"))
    yield _sse("[DONE]")


# ---------------------------------------------------------------------------- endpoints


async def danlu_generate(state: Any, body: GenerateRequest) -> Any:
    model = _generator(state, body.model)
    texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    options = _options(body, body.max_new_tokens)
    options |= {"top_k": body.top_k, "repetition_penalty": body.repetition_penalty}
    options["num_beams"] = body.num_beams
    job = Job(state, model, texts, options, rendered=False)
    if not body.stream:
        out = []
        for i, text in enumerate(await job.result()):
            reason, n = job.finish(text, i)
            out.append({"text": text, "finish_reason": reason, "completion_tokens": n})
        return {"model": model.name, "completions": out}
    if len(texts) != 1:
        raise ApiError(422, "stream one prompt at a time", "invalid_request_error", "prompt")
    _reserve(state.generation)

    async def events() -> AsyncIterator[str]:
        async for item in job.pieces():
            if isinstance(item, tuple):
                yield _sse({"text": item[1]})
            else:
                yield _sse({"finish_reason": job.finish(item[0], 0)[0]})

    return _stream_response(_guarded(job, events()))


def routes(state: Any) -> Any:
    from fastapi import APIRouter

    router = APIRouter(tags=["openai"])

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        model = _generator(state, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        texts = [p for p in prompts for _ in range(body.n)]
        options = _options(body, body.max_tokens or 16)
        job = Job(state, model, texts, options, rendered=False, endpoint="/v1/completions")
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion"}
        head |= {"created": int(job.started), "model": model.name}
        echo = texts if body.echo else [""] * len(texts)
        if body.stream:
            _reserve(state.generation)
            return _stream_response(_guarded(job, _completion_chunks(job, head, echo, body)))
        outs = await job.result()
        choices, used = [], 0
        for i, text in enumerate(outs):
            reason, n = job.finish(text, i)
            used += n
            choices.append(
                {"text": echo[i] + text, "index": i, "logprobs": None, "finish_reason": reason}
            )
        return head | {"choices": choices, "usage": _usage(model, prompts, used)}

    @router.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        model = _generator(state, body.model)
        prompt, rendered = _conversation(model, body)
        limit = body.max_completion_tokens or body.max_tokens or min(256, state.settings.max_new_tokens)  # fmt: skip
        job = Job(state, model, [prompt] * body.n, _options(body, limit), rendered, "/v1/chat/completions")  # fmt: skip
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion"}
        head |= {"created": int(job.started), "model": model.name}
        if body.stream:
            _reserve(state.generation)
            head["object"] = "chat.completion.chunk"
            return _stream_response(_guarded(job, _chat_chunks(job, head, body)))
        choices, used = [], 0
        for i, text in enumerate(await job.result()):
            reason, n = job.finish(text, i)
            used += n
            message = {"role": "assistant", "content": text}
            choices.append({"index": i, "message": message, "finish_reason": reason})
        return head | {"choices": choices, "usage": _usage(model, [prompt], used)}

    return router


def _conversation(model: Any, body: ChatRequest) -> tuple[str, bool]:
    """The prompt for a conversation, and whether it is already in the chat template."""
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    task = model.spec.task
    if task == "chat":
        return model.generator.render_chat(messages), True
    if task == "seq2seq":
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ApiError(422, "no user message to translate", "invalid_request_error",
                           param="messages")  # fmt: skip
        return users[-1], False
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"]), False


def _usage(model: Any, prompts: list[str], completion: int) -> dict[str, int]:
    prompt = sum(model.generator.count_tokens(p) for p in prompts)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


async def _completion_chunks(job: Job, head: dict, echo: list[str], body: Any):
    for i, text in enumerate(echo):
        if text:
            yield _sse(head | {"choices": [_piece(i, text)]})
    used = 0
    async for item in job.pieces():
        if isinstance(item, tuple):
            yield _sse(head | {"choices": [_piece(*item)]})
            continue
        for i, text in enumerate(item):
            reason, n = job.finish(text, i)
            used += n
            yield _sse(head | {"choices": [_piece(i, "", reason)]})
    if (body.stream_options or {}).get("include_usage"):
        usage = _usage(job.model, job.texts[:: body.n], used)
        yield _sse(head | {"choices": [], "usage": usage})


def _piece(index: int, text: str, reason: str | None = None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": reason}


async def _chat_chunks(job: Job, head: dict, body: ChatRequest):
    for i in range(body.n):
        delta = {"role": "assistant", "content": ""}
        yield _sse(head | {"choices": [{"index": i, "delta": delta, "finish_reason": None}]})
    used = 0
    async for item in job.pieces():
        if isinstance(item, tuple):
            delta = {"content": item[1]}
            choice = {"index": item[0], "delta": delta, "finish_reason": None}
            yield _sse(head | {"choices": [choice]})
            continue
        for i, text in enumerate(item):
            reason, n = job.finish(text, i)
            used += n
            yield _sse(head | {"choices": [{"index": i, "delta": {}, "finish_reason": reason}]})
    if (body.stream_options or {}).get("include_usage"):
        usage = _usage(job.model, job.texts[:1], used)
        yield _sse(head | {"choices": [], "usage": usage})
