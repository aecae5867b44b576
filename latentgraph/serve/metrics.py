"""The server's metrics in Prometheus' text format (``GET /metrics``).

A small writer of our own (counters, gauges read when scraped, histograms), safe to update from the engine
thread and the event loop at once. :class:`ServerMetrics` holds the ones the server keeps.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Metric(ABC):
    kind = ""

    def __init__(self, name: str, help_: str):
        self.name, self.help = name, help_
        self.lock = threading.Lock()

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self.samples()]

    @abstractmethod
    def samples(self) -> list[str]:
        """The metric's lines, without its HELP and TYPE."""


class Counter(_Metric):
    """A count that only grows, per set of labels."""

    kind = "counter"

    def __init__(self, name: str, help_: str):
        super().__init__(name, help_)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        with self.lock:
            return self.values.get(tuple(sorted(labels.items())), 0)

    def samples(self) -> list[str]:
        with self.lock:
            return [f"{self.name}{_labels(key)} {_number(value)}" for key, value in sorted(self.values.items())]


class Gauge(_Metric):
    """A value read when scraped (the queue's depth, say)."""

    kind = "gauge"

    def __init__(self, name: str, help_: str, read: Callable[[], float]):
        super().__init__(name, help_)
        self.read = read

    def samples(self) -> list[str]:
        return [f"{self.name} {_number(self.read())}"]


class Histogram(_Metric):
    """Observations counted in cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        super().__init__(name, help_)
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))] += 1
            self.sum += value

    @property
    def count(self) -> int:
        with self.lock:
            return sum(self.counts)

    def samples(self) -> list[str]:
        with self.lock:
            lines, total = [], 0
            for bound, count in zip((*self.bounds, float("inf")), self.counts):
                total += count
                lines.append(f'{self.name}_bucket{{le="{"+Inf" if bound == float("inf") else _number(bound)}"}} '
                             f"{total}")
            return [*lines, f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {total}"]


class ServerMetrics:
    """What ``GET /metrics`` reports. ``queue_depth`` reads the batcher's queue when scraped."""

    def __init__(self, queue_depth: Callable[[], float]):
        self.requests = Counter("latentgraph_requests_total", "HTTP requests answered, by path and status.")
        self.queue_depth = Gauge("latentgraph_queue_depth", "Rows waiting for a batch.", queue_depth)
        self.batch_size = Histogram("latentgraph_batch_size", "Rows decoded together in one batch.", BATCH_BUCKETS)
        self.tokens = Counter("latentgraph_tokens_total", "Tokens of the answer agent's final turn, by kind "
                                                          "(prompt or completion).")
        self.cancelled = Counter("latentgraph_rows_cancelled_total", "Rows stopped or dropped because their "
                                                                     "client went away.")
        self.latency = Histogram("latentgraph_request_seconds", "Time from a request's arrival to the end of "
                                                                "its response.", LATENCY_BUCKETS)

    def render(self) -> str:
        metrics = (self.requests, self.queue_depth, self.batch_size, self.tokens, self.cancelled, self.latency)
        return "\n".join(line for metric in metrics for line in metric.render()) + "\n"


def _labels(key: Labels) -> str:
    if not key:
        return ""
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, value in key)
    return "{" + ",".join(f'{name}="{value}"' for (name, _), value in zip(key, escaped)) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
