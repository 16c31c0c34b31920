"""SIGINT / SIGTERM as a decision instead of an exception, for the span of a `with` block.

Training finishes its step and checkpoints (train/loop.py); `danlu tune` finishes its trial
(tune/search.py). Handlers are installed only in the main thread (Python delivers signals
there) and the previous ones are restored on exit.
"""

from __future__ import annotations

import signal
import threading
from abc import ABC, abstractmethod
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals(ABC):
    """Calls `on_signal(signum)` for SIGINT / SIGTERM inside the block; subclasses decide."""

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}

    @abstractmethod
    def on_signal(self, signum: int) -> None:
        """What SIGINT / SIGTERM does: set a flag, say something, or raise."""

    def _handle(self, signum: int, frame: Any) -> None:
        self.on_signal(signum)

    def restore(self, signum: int) -> None:
        """Give `signum` back to the handler before this block (a second one acts at once)."""
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
