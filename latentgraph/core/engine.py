"""The round engine: one loop that unrolls a :class:`~latentgraph.core.plan.Plan`, for inference and training.

``unroll(plan, questions, step)`` walks the plan's turns round by round. For each turn it gathers the
agent's messages from its inbox, asks ``step`` to encode the prompt, to think and to speak, has the kind of
each outgoing edge make its message (:mod:`~latentgraph.core.edges`), and delivers it: forward edges into
this round's inbox, feedback edges into the next round's. It checks every thought and every link output for NaN/inf
and names the agent or edge at fault, keeps the trace, and emits :mod:`~latentgraph.core.events` as it goes.

What a turn computes is the step's business, which is how inference and training share this loop:

- :class:`InferenceStep` thinks by a latent rollout and speaks by decoding, under ``torch.no_grad``; it
  yields a :class:`~latentgraph.core.events.TokensDecoded` per decoding step, which the engine passes on live;
- :class:`~latentgraph.training.objectives.TrainingStep` thinks by a rollout with gradients or by teacher forcing,
  and "speaks" the answer by teacher forcing it on its target to score its cross-entropy.

``stop`` ends a run early: after each round but the last it is called on that round's events, and when it
returns True the answer node speaks in that round, from the prompt it encoded in that round (or, if it did
not run, from what it received), and the run ends. Built-in criteria: :mod:`~latentgraph.core.stopping`.

``parallel`` runs the independent turns of a round at once (:mod:`~latentgraph.core.parallel`): by default
those of agents whose backbones share no device. Their events come in plan order all the same.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Container, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

import torch

from ..errors import InputError
from .agent import _is_int
from .edges import Sent
from .events import (
    AgentFinished,
    AgentSpoke,
    AgentStarted,
    AgentStep,
    AgentThought,
    Event,
    MessageDelivered,
    RoundEnded,
    RunFinished,
    RunOutput,
    TokensDecoded,
)
from .forward import KVPrefix
from .messages import Encoded, Message
from .parallel import Outcome, batches, check_parallel, drain_in_threads
from .plan import Plan, Turn, answer_turn
from .routing import Router, RowsCancelled, narrow, spread, spread_tensor, widen, widen_rows
from .sampling import Sampling, per_row_sampling, per_row_seeds
from .speak import ToolCall
from .stopping import Stop, StopCriterion
from .think import Thoughts, check_thoughts

Inbox = dict[str, dict[str, Message]]  # per receiver (every agent has one), per port (a slot, or a KV edge)


@dataclass
class Spoken:
    """What an agent said in a turn, one entry per question."""

    texts: list[str]
    tokens_out: list[int] | None = None  # generated tokens (None when nothing was generated)
    tool_calls: list[list[ToolCall]] | None = None


class Step(ABC):
    """What an agent computes in its turn; :func:`unroll` does the rest (messages, links, trace, events).

    Subclasses implement :meth:`think` and :meth:`speak`. ``differentiable`` says whether the outer links
    run with autograd (training) or under ``torch.no_grad`` (inference).
    """

    differentiable: bool = False

    def start(self, plan: Plan, questions: list[str]) -> None:  # noqa: B027 (a step without state keeps this no-op)
        """Check the step against the batch and make per-device state before the first turn (turns may then run
        at once, in threads)."""

    def encode(self, turn: Turn, questions: list[str], messages: dict[str, Message],
               prefix: KVPrefix | None = None) -> Encoded:
        """The agent's prompt for this turn, with its incoming messages in their slots, continuing ``prefix``
        (what its KV in-edges carried) if any."""
        return turn.agent.encode(questions, turn.template, messages, prefix)

    @abstractmethod
    def think(self, turn: Turn, prompt: Encoded) -> Thoughts:
        """The agent's thoughts: raw hidden states and what its inner link made of them, (B, m, H) each."""

    @abstractmethod
    def speak(self, turn: Turn, prompt: Encoded) -> Generator[Event, None, Spoken]:
        """The agent's text: a generator that may yield events as it goes (:class:`TokensDecoded`) and
        returns the :class:`Spoken`."""

    def finish(self, output: RunOutput) -> RunOutput:
        """Complete the run's output with what the step kept (called once, at the end)."""
        return output


class InferenceStep(Step):
    """Inference: think by a KV-cached latent rollout, speak by decoding; no gradients.

    Args:
        sampling: how text is decoded: one :class:`~latentgraph.core.sampling.Sampling` for every question, or a
            list with one per question (rows with different settings decode in one batch).
        seed: seeds sampling: one integer for every question, or a list with one integer (or None, unseeded) per
            question. Each question draws from a generator of its own, seeded with its seed, so it samples the
            same text whatever it is batched with.
        return_latents: keep every agent's raw hidden states (on CPU) for ``RunOutput.latents``.
    """

    def __init__(self, sampling: Sampling | Sequence[Sampling], *, seed: int | Sequence[int | None] | None = None,
                 return_latents: bool = False):
        self.sampling, self.seed = sampling, seed
        self.check_batch(None)  # the types now, the lengths against the batch in start()
        self.rows: list[Sampling] = []  # per row, once the batch is known
        self.generators: dict[torch.device, list[torch.Generator | None]] = {}
        self.cancelled: set[int] = set()  # rows to decode no further (cancel() adds to it from any thread)
        self.latents: dict[int, dict[str, torch.Tensor]] | None = {} if return_latents else None

    def cancel(self, row: int) -> None:
        """End question ``row``'s decoding at the next decoding step, with the text it has; agents that speak
        later end it at once. Thread-safe: call it from any thread (when a client went away, say); thinking
        goes on as it was."""
        if not _is_int(row) or row < 0 or (self.rows and row >= len(self.rows)):
            batch = f"0 to {len(self.rows) - 1}" if self.rows else "0 or more"
            raise InputError(f"cancel() takes the index of a question in the batch ({batch}), got {row!r}")
        self.cancelled.add(row)  # one atomic set operation: decoding only tests membership

    def check_batch(self, batch: int | None) -> tuple[list[Sampling], list[int | None]]:
        """Each question's settings and seed; an InputError unless lists of them come one per question."""
        return per_row_sampling(self.sampling, batch), per_row_seeds(self.seed, batch)

    def start(self, plan: Plan, questions: list[str]) -> None:
        self.rows, seeds = self.check_batch(len(questions))
        if any(seed is not None for seed in seeds):  # per device where an agent speaks, one generator per row
            for device in {turn.agent.backbone.device for turn in plan.turns_in_order() if turn.speaks}:
                self.generators[device] = [None if seed is None else torch.Generator().manual_seed(seed)
                                           for seed in seeds]

    def encode(self, turn: Turn, questions: list[str], messages: dict[str, Message],
               prefix: KVPrefix | None = None) -> Encoded:
        with torch.no_grad():
            return super().encode(turn, questions, messages, prefix)

    def think(self, turn: Turn, prompt: Encoded) -> Thoughts:
        with torch.no_grad():
            thoughts = turn.agent.think(prompt, keep_cache=turn.keeps_cache)
        if self.latents is not None:  # a routed sub-batch's rows in place, NaN in the rows the agent did not run for
            hidden = thoughts.hidden.cpu()
            rows = prompt.rows
            self.latents.setdefault(turn.round, {})[turn.name] = (
                hidden if rows is None else spread_tensor(hidden, rows, len(self.rows), float("nan")))
        return thoughts

    def speak(self, turn: Turn, prompt: Encoded) -> Generator[Event, None, Spoken]:
        agent, rows, batch = turn.agent, prompt.rows, len(self.rows)
        sampling, generators = self.rows, self.generators.get(agent.backbone.device)
        cancelled: Container[int] = self.cancelled
        if rows is not None:  # a routed sub-batch: each row keeps its question's settings, generator and cancel()
            sampling, cancelled = [sampling[row] for row in rows], RowsCancelled(rows, self.cancelled)
            generators = None if generators is None else [generators[row] for row in rows]
        with closing(agent.speak(prompt, sampling, generators, cancelled=cancelled)) as decoding:
            while True:  # closing: a stream abandoned here frees the decoding's cache at once
                try:
                    decoded = next(decoding)
                except StopIteration as end:
                    spoken = end.value
                    break
                texts, finished = decoded.texts, decoded.finished
                if rows is not None:  # rows the agent does not run for show nothing and are finished
                    texts, finished = widen(texts, rows, batch, ""), widen(finished, rows, batch, True)
                yield TokensDecoded(round=turn.round, agent=turn.name, texts=texts, finished=finished)
        return Spoken(texts=[g.text for g in spoken], tokens_out=[g.sampled for g in spoken],
                      tool_calls=[g.calls for g in spoken] if agent.tools else None)

    def finish(self, output: RunOutput) -> RunOutput:
        if self.latents is not None:  # in trace order: agents that ran at once stored theirs in any order
            output.latents = [{name: self.latents[r][name] for name in steps if name in self.latents.get(r, {})}
                              for r, steps in enumerate(output.trace, start=1)]
        return output


def question_list(questions: str | Sequence[str]) -> list[str]:
    """The batch a run answers: one question, or a list or tuple of them (not a dict, set or generator)."""
    if isinstance(questions, str):
        return [questions]
    if not isinstance(questions, (list, tuple)):
        raise InputError(f"run() takes a question or a list of questions, got {type(questions).__name__}: "
                         f"{questions!r:.80}")
    if not questions:
        raise InputError("run() got no questions; pass a question or a non-empty list of them")
    wrong = [f"{i}: {type(q).__name__}" for i, q in enumerate(questions) if not isinstance(q, str)]
    if wrong:
        raise InputError(f"questions must be strings; these are not: {', '.join(wrong[:5])}")
    return list(questions)


def unroll(plan: Plan, questions: list[str], step: Step, *, stop: Stop | None = None,
           parallel: bool | None = None) -> Iterator[Event]:
    """Run ``plan`` on ``questions``: yield each event as it happens, :class:`RunFinished` last.

    ``parallel``: ``None`` runs independent turns of a round at once when their agents' backbones share no
    device, ``True`` also on one device, ``False`` never (see :func:`~latentgraph.core.parallel.batches`).
    Turns that ran at once yield their events when the last of them finishes, in plan order.
    """
    parallel = check_parallel(parallel)
    plan.place_links()
    step.start(plan, questions)
    if isinstance(stop, StopCriterion):
        stop.reset(plan)
    trace: list[dict[str, AgentStep]] = []
    texts: list[str] = []
    inbox: Inbox = _empty_inbox(plan)
    router = Router(plan, questions)
    stopped = False
    for r in range(1, plan.rounds + 1):
        next_inbox = _empty_inbox(plan)
        steps: dict[str, AgentStep] = {}
        prompts: dict[str, Encoded] = {}
        seen: list[Event] | None = [] if stop is not None else None
        for batch in batches(plan, r, parallel):
            alone = len(batch) == 1  # a turn alone yields its events live; turns at once, after the batch
            runs = [_run_turn(plan, turn, router, step, inbox, next_inbox, seen if alone else None)
                    for turn in batch]
            if not alone:
                runs = [_replay(outcome, seen) for outcome in drain_in_threads(runs)]
            for turn, run in zip(batch, runs):
                record, prompt = yield from run
                if record is None:  # no row needed the agent this round
                    continue
                steps[turn.name], prompts[turn.name] = record, prompt
                router.remember(record)
                if turn.speaks and turn.is_answer:
                    texts = record.text
        if stop is not None and r < plan.rounds and stop(seen):
            turn = answer_turn(plan, r)
            ran = steps.get(turn.name)  # when it ran for some rows only, it encodes again, for all
            ran = ran if ran is not None and ran.rows is None else None
            steps[turn.name], _ = yield from _run_turn(plan, turn, router, step, inbox, next_inbox, None,
                                                       ran and prompts[turn.name], ran)
            texts, stopped = steps[turn.name].text, True
        trace.append(steps)
        yield RoundEnded(round=r, steps=steps)
        if stopped:
            break
        inbox = next_inbox
    output = step.finish(RunOutput(texts=texts, trace=trace, mode=plan.mode, stopped_early=stopped))
    yield RunFinished(round=len(trace), output=output)


def _run_turn(plan: Plan, turn: Turn, router: Router, step: Step, inbox: Inbox, next_inbox: Inbox,
              seen: list[Event] | None, prompt: Encoded | None = None, record: AgentStep | None = None
              ) -> Generator[Event, None, tuple[AgentStep | None, Encoded | None]]:
    """One turn, for the rows its routes need (:mod:`~latentgraph.core.routing`); returns its trace line and
    prompt, or ``(None, None)`` when no row needs it. ``prompt`` and ``record``: a turn that already encoded
    its prompt (and has a trace line) goes on from them."""
    agent, r, batch = turn.agent, turn.round, router.batch
    rows = router.rows_for(turn) if prompt is None else list(range(batch))
    if not rows:
        return None, None
    sub = None if len(rows) == batch else rows  # a routed sub-batch: per-row lists of the trace widen to the batch
    yield from _emit(AgentStarted(round=r, agent=turn.name, prompt=turn.prompt_kind, rows=sub), seen)
    devices = agent.backbone.devices
    start, paused = _now(devices), 0.0
    if prompt is None:
        received = {port: m for port, message in inbox[turn.name].items()
                    if (m := narrow(message, rows, batch)) is not None}
        questions = [router.questions[row] for row in rows]
        blank = Message(text=[""] * len(rows))  # slots with no edge: the single-agent baseline
        messages = {s: received.get(s, blank) for s in turn.template.slots}
        caches = [received[e.port].cache for e in turn.incoming if not e.kind.fills_slot and e.port in received]
        prompt = step.encode(turn, questions, messages, KVPrefix.concat(caches) if caches else None)
        prompt.rows = sub
        record = AgentStep(round=r, agent=turn.name, prompt=turn.prompt_kind, rows=sub,
                           tokens_in=widen_rows(prompt.text_tokens, sub, batch),
                           latents_in=sum(m.latent.shape[1] for m in messages.values() if m.latent is not None),
                           cache_in=0 if prompt.prefix is None else prompt.prefix.length)
    thoughts = None
    if turn.thinks:
        thoughts = step.think(turn, prompt)
        check_thoughts(turn.name, thoughts, r)
        record.latent_shape = tuple(thoughts.hidden.shape)
        record.latent_norm = thoughts.hidden.detach().float().norm(dim=-1).mean().item()
        paused += yield from _emit(AgentThought(round=r, agent=turn.name, shape=record.latent_shape,
                                                norm=record.latent_norm, thoughts=thoughts, rows=sub), seen)
    if turn.speaks:
        spoken, waited = yield from _relay(step.speak(turn, prompt), seen)
        paused += waited
        record.text, record.tokens_out, record.tool_calls = (
            widen_rows(values, sub, batch) for values in (spoken.texts, spoken.tokens_out, spoken.tool_calls))
        paused += yield from _emit(AgentSpoke(round=r, agent=turn.name, texts=record.text,
                                              tokens_out=record.tokens_out, tool_calls=record.tool_calls), seen)
    sent = Sent(round=r, agent=agent, prompt=prompt, thoughts=thoughts, texts=spoken.texts if turn.speaks else None,
                differentiable=step.differentiable)
    own = (turn.name, record.text) if turn.speaks else None  # a condition on the sender's text reads this turn's
    for edge in turn.outgoing:
        on = router.on(edge, r, own)
        if not any(on[row] for row in rows):
            continue  # off for every row it ran for: the receiver's slot stays empty
        message = spread(edge.kind.message(edge, sent, plan.links.get(edge.name)), rows, on, batch)
        (next_inbox if edge.feedback else inbox)[edge.dst][edge.port] = message
        paused += yield from _emit(MessageDelivered(round=r, edge=edge.name, receiver=edge.dst, slot=edge.slot,
                                                    next_round=edge.feedback, latent=message.latent,
                                                    text=message.text), seen)
    record.seconds += _now(devices) - start - paused
    yield from _emit(AgentFinished(round=r, agent=turn.name, step=record), seen)
    return record, prompt


def _empty_inbox(plan: Plan) -> Inbox:
    """Every agent's inbox made up front: turns running at once in threads only fill slots."""
    return {name: {} for name in plan.agents}


def _replay(outcome: Outcome, seen: list[Event] | None) -> Generator[Event, None, tuple[AgentStep, Encoded]]:
    """Yield the events of a turn that ran in a thread, then return what it returned or raise its error."""
    for event in outcome.events:
        yield from _emit(event, seen)
    if outcome.error is not None:
        raise outcome.error
    return outcome.value


def _relay(run: Generator[Event, None, Spoken], seen: list[Event] | None
           ) -> Generator[Event, None, tuple[Spoken, float]]:
    """Yield what a step yields; return what it returned and how long the consumer kept the run suspended."""
    paused = 0.0
    while True:
        try:
            event = next(run)
        except StopIteration as end:
            return end.value, paused
        paused += yield from _emit(event, seen)


def _emit(event: Event, seen: list[Event] | None) -> Generator[Event, None, float]:
    """Yield ``event``; return how long the consumer kept the run suspended (not counted in any step)."""
    if seen is not None:
        seen.append(event)
    suspended = time.perf_counter()
    yield event
    return time.perf_counter() - suspended


def _now(devices: frozenset[torch.device]) -> float:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter()
