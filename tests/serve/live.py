"""A real server for tests: uvicorn in a background thread on 127.0.0.1 and a free port."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx


class LiveServer:
    """`with LiveServer(app) as s: httpx.get(s.url + "/health")` — ready when /ready is 200."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        from danlu.serve.server import free_port

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("the server did not get ready within 60 s")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
