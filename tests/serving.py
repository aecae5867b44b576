"""Helpers of the serve tests: a real server on a free loopback port, a gate that holds the engine thread, and
bounded waits."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from latentgraph.serve.app import create_app
from latentgraph.serve.server import Server, listen
from latentgraph.serve.service import Service

WAIT = 60.0  # seconds any wait in these tests may take before it fails


def wait_until(condition, what: str, timeout: float = WAIT):
    """Poll ``condition`` until it is true; fail naming ``what`` if it is not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


@dataclass
class Served:
    url: str
    service: Service

    @property
    def address(self) -> tuple[str, int]:
        url = httpx.URL(self.url)
        return url.host, url.port

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def metric(self, line: str) -> float:
        """The value of one sample of /metrics, e.g. ``'latentgraph_rows_cancelled_total'`` (0 if absent)."""
        for sample in httpx.get(self.url + "/metrics", timeout=WAIT).text.splitlines():
            if sample.rsplit(" ", 1)[0] == line:
                return float(sample.rsplit(" ", 1)[1])
        return 0.0


@contextmanager
def running(load_system, *, name: str = "tiny", ready: bool = True, log_level: str = "warning", **options):
    """``create_app(load_system, ...)`` served by uvicorn in a thread on a free loopback port; with ``ready``,
    once /health says the system is loaded."""
    server = Server(create_app(load_system, name=name, **options), listen("127.0.0.1", 0), log_level=log_level)
    server.start()
    served = Served(server.url, server.uvicorn.config.app.state.service)
    try:
        wait_until(lambda: server.uvicorn.started, "the server to start")
        if ready:
            wait_until(lambda: httpx.get(served.url + "/health", timeout=WAIT).status_code == 200, "the system")
        yield served
    finally:
        server.stop()


class Gate:
    """Holds the engine thread inside ``agent``'s next thought until :meth:`open` (with ``rows``, only a thought
    of a batch of that many rows): requests sent meanwhile queue up, so that what is batched with what is
    known. Gates nest."""

    def __init__(self, agent, rows: int | None = None):
        self.agent, self.rows = agent, rows
        self.entered, self._open = threading.Event(), threading.Event()

    def __enter__(self) -> Gate:
        self.previous = self.agent.__dict__.get("think")
        think = self.agent.think

        def held(prompt, **options):
            if self.rows in (None, prompt.embeds.shape[0]):
                self.entered.set()
                assert self._open.wait(WAIT), "the gate was never opened"
            return think(prompt, **options)

        self.agent.think = held
        return self

    def open(self) -> None:
        self._open.set()

    def __exit__(self, *exc) -> None:
        self._open.set()
        if self.previous is None:
            del self.agent.think
        else:
            self.agent.think = self.previous
