"""The system behind a server: loaded in a thread when the app starts, then served by one batcher."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..core.system import System
from ..errors import LatentGraphError, RequestError
from .batcher import Batcher
from .limits import Limits
from .metrics import ServerMetrics

logger = logging.getLogger("latentgraph.serve")
LOADING_RETRY = "5"  # seconds a client should wait while the system loads


class Service:
    """The system behind the app, loaded in a thread, and its batcher once it is ready."""

    def __init__(self, load_system: Callable[[], System], name: str, limits: Limits):
        self.load_system, self.name, self.limits = load_system, name, limits
        self.metrics = ServerMetrics(queue_depth=lambda: self.batcher.depth if self.batcher else 0)
        self.system: System | None = None  # once loaded
        self.batcher: Batcher | None = None
        self.error: str | None = None  # why loading failed
        self.created = int(time.time())

    def start(self) -> None:
        threading.Thread(target=self._load, name="latentgraph-load", daemon=True).start()

    def _load(self) -> None:
        try:
            system = self.load_system()
            for agent in system.graph().agents.values():  # a nested system's too
                agent.backbone.load()  # now, not in the first request
            batcher = Batcher(system, self.limits, self.metrics)
        except Exception as e:  # reported by /health and to every request
            self.error = " ".join(str(e).split()) if isinstance(e, LatentGraphError) else repr(e)
            logger.error("the system could not be loaded: %s", self.error)
            return
        batcher.start()
        self.system, self.batcher = system, batcher

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()

    def ready(self) -> Batcher:
        """The batcher, or a 503 saying why there is none yet."""
        if self.batcher is not None:
            return self.batcher
        if self.error is not None:
            raise RequestError(f"the system failed to load: {self.error}", status=503)
        raise RequestError("the system is still loading; retry shortly", status=503,
                           headers={"Retry-After": LOADING_RETRY})
