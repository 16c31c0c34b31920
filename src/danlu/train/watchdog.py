"""Turn a hang across processes into an error naming the rank that is behind and where.

Each rank marks (sequence number, step, phase, collective?, time) as it enters a phase: the
main thread only swaps a dict (no I/O on the hot path). A daemon thread pushes the newest mark
to the process group's store every `period` seconds and checks its own: once the rank has sat
in one collective longer than `timeout`, it reads every rank's mark, prints e.g.

    rank 1 has not reached backward all-reduce of step 3 (last: forward/backward of step 3,
    4 s ago); rank 0 is waiting in backward all-reduce of step 3 for 2 s

and ends the process with os._exit(3) (the main thread may be stuck inside a C++ collective).
All ranks enter the same collectives in the same order, so the rank that has entered the fewest
is the one behind.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

EXIT_CODE = 3
ABORT = "abort"  # store key: set by the rank that fired, every other rank's thread then exits


class Watchdog:
    def __init__(self, store: Any, rank: int, world: int, timeout: float) -> None:
        self.store, self.rank, self.world, self.timeout = store, rank, world, timeout
        self.period = min(0.5, timeout / 4)
        self.record: dict[str, Any] = _record(0, 0, "start-up", False)
        self._pushed: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="danlu-watchdog", daemon=True)
        self._thread.start()

    def mark(self, step: int | None, phase: str, collective: bool) -> None:
        old = self.record  # seq counts collectives: every rank enters the same ones in order
        seq = old["seq"] + int(collective)
        self.record = _record(seq, old["step"] if step is None else step, phase, collective)

    def aborted(self) -> bool:
        try:
            return bool(self.store.check([ABORT]))
        except Exception:  # the store is gone: the group is being torn down
            return True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            record = self.record
            try:
                if record is not self._pushed:
                    self.store.set(str(self.rank), json.dumps(record))
                    self._pushed = record
                if record["collective"] and time.time() - record["t"] > self.timeout:
                    self._fire(record)
                if self.store.check([ABORT]):  # another rank fired: do not wait for SIGKILL
                    os._exit(EXIT_CODE)
            except Exception:  # the store went away: the group is being torn down
                return

    def _fire(self, mine: dict[str, Any]) -> None:
        if self.aborted():  # another rank already said what happened
            os._exit(EXIT_CODE)
        records = {self.rank: mine}
        for r in range(self.world):
            if r != self.rank and self.store.check([str(r)]):
                records[r] = json.loads(self.store.get(str(r)))
        print(
            f"error: distributed training hung (train.collective_timeout_s={self.timeout:g}): "
            f"{diagnose(records, self.world, time.time())}",
            file=sys.stderr,
            flush=True,
        )
        self.store.set(ABORT, str(self.rank))
        os._exit(EXIT_CODE)


def _record(seq: int, step: int, phase: str, collective: bool) -> dict[str, Any]:
    return {"seq": seq, "step": step, "phase": phase, "collective": collective, "t": time.time()}


def _where(record: dict[str, Any]) -> str:
    return f"{record['phase']} of step {record['step']}"


def diagnose(records: dict[int, dict[str, Any]], world: int, now: float) -> str:
    """One line: which ranks are behind, what they did last, and what the others wait in."""
    silent = [r for r in range(world) if r not in records]
    if silent:
        return f"rank {', '.join(map(str, silent))} reported nothing (did it start?)"
    low = min(r["seq"] for r in records.values())
    high = max(r["seq"] for r in records.values())
    ahead = {r: rec for r, rec in records.items() if rec["seq"] == high}
    if low == high:
        rec = records[min(records)]
        return (
            f"all {world} ranks are waiting in {_where(rec)} for {now - rec['t']:.0f} s "
            "(a process or the network between them is stuck)"
        )
    target = _where(next(iter(ahead.values())))
    behind = [
        f"rank {r} has not reached {target} (last: {_where(rec)}, {now - rec['t']:.0f} s ago)"
        for r, rec in sorted(records.items())
        if rec["seq"] == low
    ]
    waiting = [
        f"rank {r} is waiting in {_where(rec)} for {now - rec['t']:.0f} s"
        for r, rec in sorted(records.items())
        if rec["seq"] > low and rec["collective"]
    ]
    return "; ".join(behind + waiting)
