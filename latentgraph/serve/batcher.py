"""The engine thread: concurrent requests answered together in batches, one batch at a time.

Tokenizers and KV caches are not thread-safe, so one thread runs the system. Requests arrive from the event
loop as :class:`~latentgraph.serve.protocol.Job`\\ s, one :class:`Ticket` each, and wait in a bounded queue
of rows. The thread takes the first waiting row, waits at most ``batch_wait_ms`` for more (up to
``max_batch_size``), and unrolls the system's plan on them. What happens to each row comes back to its
ticket, in the event loop, as items: :class:`Admitted` once its question fits the system, :class:`Delta`\\ s
of the answer's text, :class:`Record`\\ s of the agents' events when asked for, and :class:`Finished` with
its token counts; or :class:`Failed`.

Batching never changes a row's result: the engine decodes each row as it would alone, with its own settings
and its own generator. A row whose client went away is dropped before its batch starts, or stops decoding at
its next step; a batch whose every row is cancelled stops at its next event.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..core.engine import InferenceStep, unroll
from ..core.events import AgentFinished, Event, RunFinished, TokensDecoded
from ..core.system import System
from ..errors import InputError, LatentGraphError, RequestError
from .limits import Limits
from .metrics import ServerMetrics
from .protocol import Job, Row
from .records import event_record

logger = logging.getLogger("latentgraph.serve")


class Admitted:
    """The request's question fits the system, and its first rows are being decoded."""


@dataclass(frozen=True)
class Delta:
    index: int  # the choice
    text: str  # the answer's next piece of text


@dataclass(frozen=True)
class Record:
    index: int
    event: dict[str, Any]  # see records.py


@dataclass(frozen=True)
class Finished:
    index: int
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: RequestError


Item = Admitted | Delta | Record | Finished | Failed


def _internal() -> RequestError:
    """What a request hears of an unexpected failure (its details go to the server's log only)."""
    return RequestError("internal error while answering; see the server's log", status=500)


_CANCELLED = object()  # wakes a consumer whose client went away


class Ticket:
    """One request in the batcher: its job, and the items its rows produce, read in the event loop."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop):
        self.job = job
        self.cancelled = False  # set in the event loop, read by the engine thread
        self.finished = False  # every row finished (read in the event loop)
        self.checked = self.failed = False  # engine thread only
        self.running: list[tuple[InferenceStep, int]] = []  # the step decoding each of its rows, and the row's place
        self._loop = loop
        self._items: asyncio.Queue = asyncio.Queue()

    def put(self, item: Item) -> None:
        """Hand ``item`` to the event loop (called by the engine thread)."""
        if self.cancelled:
            return
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server stopped
            pass

    async def items(self) -> AsyncIterator[Item]:
        """The items, until every row finished, one failed, or the ticket was cancelled."""
        left = len(self.job.rows)
        while left:
            item = await self._items.get()
            if item is _CANCELLED:
                return
            yield item
            if isinstance(item, Failed):
                return
            left -= isinstance(item, Finished)
        self.finished = True

    def cancel(self) -> None:
        """The client went away: drop the rows not started, stop the batch if no other row needs it. A finished
        ticket stays as it is."""
        if not (self.cancelled or self.finished):
            self.cancelled = True
            for step, row in list(self.running):
                step.cancel(row)  # thread-safe: the row stops at its next decoding step
            self._items.put_nowait(_CANCELLED)


class Batcher:
    """Answers :class:`Job`\\ s on ``system`` in one engine thread; :meth:`start` it, :meth:`submit` jobs."""

    def __init__(self, system: System, limits: Limits, metrics: ServerMetrics):
        self.plan = system.plan()
        self.limits, self.metrics = limits, metrics
        self._queue: queue.Queue[tuple[Ticket, Row] | None] = queue.Queue()
        self._waiting = 0  # rows in the queue
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="latentgraph-engine", daemon=True)

    @property
    def depth(self) -> int:
        """Rows waiting for a batch."""
        return self._waiting

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Let the running batch finish (up to ``timeout`` seconds), then fail what still waits."""
        self._queue.put(None)
        self._thread.join(timeout)
        stopping = Failed(RequestError("the server is stopping; retry on another replica or later", status=503,
                                       headers={"Retry-After": "5"}))
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return
            if entry is not None:
                entry[0].put(stopping)

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Ticket:
        """Queue ``job``'s rows; a full queue is a 503 with ``Retry-After``."""
        with self._lock:
            if self._waiting + len(job.rows) > self.limits.max_queue:
                raise RequestError(f"the server is busy: {self._waiting} rows wait already (--max-queue "
                                   f"{self.limits.max_queue}); retry later", status=503, headers={"Retry-After": "1"})
            self._waiting += len(job.rows)
        ticket = Ticket(job, loop)
        for row in job.rows:
            self._queue.put((ticket, row))
        return ticket

    def _serve(self) -> None:
        while self._answer_batch():
            pass

    def _answer_batch(self) -> bool:
        """Gather a batch and answer it (its rows are let go when this returns); False: the batcher stops."""
        entries = self._gather()
        if entries is None:
            return False
        try:
            if live := [entry for entry in entries if self._admit(*entry)]:
                self._decode(live)
        except Exception:  # the engine thread must outlive any batch: its requests fail, the next batch runs
            logger.exception("the engine failed on a batch of %d rows", len(entries))  # no question is logged
            self._fail(entries, _internal())
        return True

    def _gather(self) -> list[tuple[Ticket, Row]] | None:
        """The next batch: the first row to come, and those that come within the wait (None: stop)."""
        entries = [self._queue.get()]
        deadline = time.monotonic() + self.limits.batch_wait_ms / 1000
        while entries[-1] is not None and len(entries) < self.limits.max_batch_size:
            left = deadline - time.monotonic()
            try:
                entries.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        if entries[-1] is None:
            self._queue.put(None)  # stop once this batch is done
            entries.pop()
        with self._lock:
            self._waiting -= len(entries)
        return entries if entries else None

    def _admit(self, ticket: Ticket, row: Row) -> bool:
        """Whether the row goes on: its client is still there, and its question fits the system (checked
        once per request, so that a request gets one error)."""
        if ticket.cancelled:
            self.metrics.cancelled.inc()
            return False
        if not ticket.checked:
            ticket.checked = True
            questions = list(dict.fromkeys(r.question for r in ticket.job.rows))
            try:
                self.plan.check_lengths(questions, row.sampling.max_new_tokens)
            except InputError as e:
                ticket.failed = True
                ticket.put(Failed(RequestError(f"the question is too long for this system: {e}", param="messages",
                                               code="context_length_exceeded")))
            else:
                ticket.put(Admitted())
        return not ticket.failed

    def _decode(self, group: list[tuple[Ticket, Row]]) -> None:
        """Unroll the plan on a batch of rows, each with its own settings and seed, sending each ticket what
        concerns its rows."""
        self.metrics.batch_size.observe(len(group))
        rows = [row for _, row in group]
        step = InferenceStep([row.sampling for row in rows], seed=[row.seed for row in rows])
        for position, (ticket, _) in enumerate(group):
            ticket.running.append((step, position))
        events = unroll(self.plan, [row.question for row in rows], step)
        finished: dict[int, Finished] = {}  # by position, sent once the run is over (after its last event)
        try:
            for event in events:
                if all(ticket.cancelled for ticket, _ in group):
                    break  # no one waits for this batch: stop it, thinking included
                self._deliver(event, group, finished)
        except LatentGraphError as e:
            self._fail(group, RequestError(f"the system failed on this batch: {e}", status=500))
        except Exception:
            logger.exception("the engine failed on a batch of %d rows", len(group))  # no question is logged
            self._fail(group, _internal())
        finally:
            events.close()
            for ticket, _ in group:
                ticket.running.clear()
        self.metrics.cancelled.inc(sum(ticket.cancelled for ticket, _ in group))

    def _deliver(self, event: Event, group: list[tuple[Ticket, Row]], finished: dict[int, Finished]) -> None:
        final = event.round == self.plan.rounds and getattr(event, "agent", None) == self.plan.answer
        for position, (ticket, row) in enumerate(group):
            if ticket.cancelled:
                continue
            if ticket.job.events and (record := event_record(event, position)) is not None:
                ticket.put(Record(row.index, record))
            if final and isinstance(event, TokensDecoded) and event.texts[position]:
                ticket.put(Delta(row.index, event.texts[position]))
            elif final and isinstance(event, AgentFinished):
                prompt, made = event.step.tokens_in[position], event.step.tokens_out[position]
                reason = "length" if made >= row.sampling.max_new_tokens else "stop"
                finished[position] = Finished(row.index, reason, prompt, made)
                self.metrics.tokens.inc(prompt, kind="prompt")
                self.metrics.tokens.inc(made, kind="completion")
            elif isinstance(event, RunFinished):
                ticket.put(finished[position])

    def _fail(self, group: list[tuple[Ticket, Row]], error: RequestError) -> None:
        for ticket in {id(ticket): ticket for ticket, _ in group}.values():
            ticket.put(Failed(error))
