"""Dynamic batching: requests that arrive close together run through the model as one batch.

    batcher = Batcher(run_batch, max_batch_size=32, max_wait_s=0.005, max_queue=256)
    results = await batcher.submit(items)      # one result per item, in order

One worker thread owns the model. It takes the oldest waiting request, waits up to
`max_wait_s` for more until `max_batch_size` items are gathered, runs them together and hands
each request its share. A request larger than the batch size runs alone, whole. Requests whose
caller has gone (timeout, disconnect) are dropped before they run. If a batch fails with a
user error, its requests run again one by one, so only the request at fault gets the error.

The queue is bounded in items: `submit` raises `Overloaded` (the server answers 429 with
Retry-After) instead of letting latency grow without limit. `close()` stops taking work and
finishes what is queued: graceful shutdown loses no accepted request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from danlu.errors import DanluError

log = logging.getLogger("danlu")


class Overloaded(Exception):
    """The queue is full; `retry_after` (seconds) is a fair time to come back."""

    def __init__(self, queued: int, retry_after: float) -> None:
        self.queued = queued
        self.retry_after = retry_after
        super().__init__(f"{queued} inputs are waiting")


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


def settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future,
    result: Any = None,
    error: BaseException | None = None,
) -> None:
    """From a worker thread: give the future of a request awaited on `loop` its result."""

    def set_() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(set_)


@dataclass
class _Job:
    items: list[Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def gone(self) -> bool:
        return self.future.cancelled() or self.future.done()

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        settle(self.loop, self.future, result, error)


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        name: str = "model",
        on_batch: Callable[[int, float], None] | None = None,
        after: Callable[[list[Any], list[Any], float], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch  # (batch size, seconds): for metrics
        self.after = after  # (items, results, seconds), after answering: e.g. the request log
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # items waiting
        self._busy = 0  # items running
        self._cv = threading.Condition()
        self._closing = False
        self._seconds_per_item = 0.001  # running estimate, for Retry-After
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Inputs waiting or running."""
        return self._queued + self._busy

    async def submit(self, items: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        job = _Job(list(items), loop.create_future(), loop)
        with self._cv:
            if self._closing:
                raise ShuttingDown()
            if self._queued and self._queued + len(items) > self.max_queue:
                wait = self._seconds_per_item * (self._queued + self._busy)
                raise Overloaded(self._queued, retry_after=max(1.0, wait))
            self._jobs.append(job)
            self._queued += len(job.items)
            self._cv.notify()
        return await job.future

    def close(self, timeout: float | None = None) -> None:
        """Take no more work; finish the queued jobs (up to `timeout` seconds)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            self._run(jobs)

    def _take(self) -> list[_Job] | None:
        """The next batch: the oldest job plus whatever fits, after waiting for company."""
        with self._cv:
            while not self._jobs and not self._closing:
                self._cv.wait()
            if not self._jobs:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while not self._closing and self._queued < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            jobs, size = [], 0
            while self._jobs:
                n = len(self._jobs[0].items)
                if jobs and size + n > self.max_batch_size:
                    break
                jobs.append(self._jobs.popleft())
                size += n
            self._queued -= size
            self._busy = size
            return jobs

    def _run(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if not j.gone()]
        try:
            if live:
                self._answer(live)
        finally:
            with self._cv:
                self._busy = 0

    def _answer(self, jobs: list[_Job]) -> None:
        items = [item for job in jobs for item in job.items]
        start = time.perf_counter()
        try:
            results = self.run_batch(items)
        except DanluError as e:
            if len(jobs) == 1:
                jobs[0].settle(error=e)
                return
            for job in jobs:  # find the request at fault: each runs on its own
                self._answer([job])
            return
        except Exception as e:  # a bug, not the caller's fault: every caller gets a 500
            log.exception("batch of %d inputs failed", len(items))
            for job in jobs:
                job.settle(error=e)
            return
        seconds = time.perf_counter() - start
        self._seconds_per_item = 0.8 * self._seconds_per_item + 0.2 * seconds / len(items)
        if self.on_batch is not None:
            self.on_batch(len(items), seconds)
        i = 0
        for job in jobs:
            job.settle(results[i : i + len(job.items)])
            i += len(job.items)
        if self.after is not None:
            try:
                self.after(items, results, seconds)
            except Exception:  # a logging failure must not stop serving
                log.exception("after-batch hook failed")
