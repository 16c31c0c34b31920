"""The generation queue of `danlu serve`: one worker thread, requests batched when they can be.

When the worker comes free it takes the oldest waiting request and every waiting one it can
continue together with it (the same model and sampling options, up to serve.max_batch_size
prompts) in one Generator.run_batch call; requests that arrive meanwhile form the next call.
A failed batched call runs its requests again one by one (except those already streaming),
so only the one at fault gets the error. At most serve.max_queue requests wait (429 beyond).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from danlu.serve.batching import Overloaded, ShuttingDown, settle


class Cancelled(Exception):
    """The client left or the request timed out: stop generating."""


class GenerationRunner:
    """One worker thread runs generation; at most `max_queue` requests wait. When it comes
    free it takes the oldest request and every waiting one it can continue together with it
    (same model and sampling options; up to `max_rows` prompts): one batched call instead of
    one after another (Generator.run_batch). Nothing waits for company: requests that arrive
    while a call runs form the next one."""

    def __init__(self, max_queue: int, max_rows: int = 1, metrics: Any = None) -> None:
        self.max_queue, self.max_rows, self.metrics = max_queue, max_rows, metrics
        self.waiting = 0
        self.pending: deque[_Entry] = deque()
        self.lock = threading.Condition()
        self.closing = False
        self.seconds = 1.0  # running mean per call, for Retry-After
        self.worker = threading.Thread(target=self._work, name="danlu-generate", daemon=True)
        self.worker.start()

    def reserve(self) -> None:
        with self.lock:
            if self.closing:
                raise ShuttingDown()
            if self.waiting >= self.max_queue:
                raise Overloaded(self.waiting, retry_after=max(1.0, self.seconds * self.waiting))
            self.waiting += 1

    def submit(self, job: Any, push: Callable[[int, str], None] | None) -> asyncio.Future:
        """Queue `job` (after `reserve`); its future gets the texts, or the error. A job
        cancelled while it waits is skipped (Cancelled)."""
        entry = _Entry(job, push, asyncio.get_running_loop())
        entry.future = entry.loop.create_future()
        with self.lock:
            self.pending.append(entry)
            self.lock.notify()
        return entry.future

    def close(self, timeout: float | None = None) -> None:
        """Take no more requests; the waiting ones still run."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.worker.join(timeout)

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.pending and not self.closing:
                    self.lock.wait()
                if not self.pending:
                    return
                group = self._take()
            start = time.perf_counter()
            self._run(group)
            with self.lock:
                self.waiting -= len(group)
                self.seconds = 0.8 * self.seconds + 0.2 * (time.perf_counter() - start)

    def _take(self) -> list[_Entry]:
        """The oldest waiting request and those that can run with it (under the lock)."""
        group = [self.pending.popleft()]
        key, rows = group[0].job.key, len(group[0].job.texts)
        if key is None:
            return group
        for entry in list(self.pending):
            if entry.job.key == key and rows + len(entry.job.texts) <= self.max_rows:
                self.pending.remove(entry)
                group.append(entry)
                rows += len(entry.job.texts)
        return group

    def _run(self, group: list[_Entry]) -> None:
        live = []
        for entry in group:
            if entry.job.cancel.is_set():
                entry.settle(error=Cancelled())
            else:
                live.append(entry)
        if len(live) > 1:
            try:
                t0 = time.perf_counter()
                results = _run_together(live)
                self._observe(live, time.perf_counter() - t0)
            except Exception as e:  # a bad request among them: each alone, so only it fails
                for entry in [x for x in live if x.streamed]:  # a stream cannot start over
                    entry.settle(error=e)
                live = [x for x in live if not x.streamed]
            else:
                for entry, texts in zip(live, results, strict=True):
                    entry.settle(texts)
                return
        for entry in live:
            t0 = time.perf_counter()
            try:
                texts = entry.job.run(entry.push)
            except BaseException as e:  # to the request that caused it
                entry.settle(error=e)
            else:
                self._observe([entry], time.perf_counter() - t0)
                entry.settle(texts)

    def _observe(self, entries: list[_Entry], seconds: float) -> None:
        if self.metrics is not None:
            rows = sum(len(e.job.texts) for e in entries)
            self.metrics.observe_batch(entries[0].job.model.name, rows, seconds)


@dataclass
class _Entry:
    """A queued request: the job, where its pieces go, and the future its caller awaits."""

    job: Any  # danlu.serve.openai_api.Job
    push: Callable[[int, str], None] | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(init=False)
    streamed: bool = False  # pieces went out: a failed batch cannot re-run it from the start

    def send(self, row: int, piece: str) -> None:
        self.streamed = True
        if self.push is not None:
            self.push(row, piece)

    def settle(self, texts: list[str] | None = None, error: BaseException | None = None) -> None:
        settle(self.loop, self.future, texts, error)


def _run_together(entries: list[_Entry]) -> list[list[str]]:
    """One Generator.run_batch call for the prompts of several waiting requests."""
    from danlu.serve.generate import Part

    first = entries[0].job
    parts = []
    for entry in entries:
        job, options = entry.job, entry.job.options
        stop = options.get("stop")
        parts.append(
            Part(
                texts=job.texts,
                max_new_tokens=options["max_new_tokens"],
                stop=[stop] if isinstance(stop, str) else list(stop or []),
                seed=options["seed"],
                stream=entry.send if entry.push is not None else None,
                cancelled=job.cancel.is_set,
            )
        )
    sample = {k: first.options.get(k) for k in ("temperature", "top_k", "top_p")}
    sample["repetition_penalty"] = first.options.get("repetition_penalty", 1.0)
    return first.model.generator.run_batch(parts, rendered=first.rendered, **sample)
