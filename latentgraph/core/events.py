"""What a run reports: typed events as it goes, and its :class:`RunOutput` at the end.

:func:`~latentgraph.core.engine.unroll` emits, for each agent's turn, in this order: :class:`AgentStarted`;
:class:`AgentThought` when it thinks; when it speaks, one :class:`TokensDecoded` per decoding step (when it
decodes: not in training), then :class:`AgentSpoke`; one :class:`MessageDelivered` per outgoing edge;
:class:`AgentFinished` with its :class:`AgentStep`. Each round closes with
:class:`RoundEnded`, and the run with :class:`RunFinished`, which carries the :class:`RunOutput`.
:meth:`System.stream <latentgraph.System.stream>` yields these events as they happen;
:meth:`System.run <latentgraph.System.run>` drains them and returns the output.

Events hold references to what the run computed anyway (tensors are not copied or moved), so emitting
them costs no extra device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .speak import ToolCall
from .think import Thoughts

RunMode = Literal["latent", "text", "single"]
RUN_MODES = ("latent", "text", "single")


@dataclass
class AgentStep:
    """What one agent did in one round (lists hold one value per question).

    ``rows``: the questions it ran for when its routes needed only some (conditional edges); its lists then hold
    ``None`` for the others, and ``latent_shape`` is that of the rows it ran for. ``None``: every question."""

    round: int
    agent: str
    prompt: str  # "prompt" or "feedback_prompt"
    tokens_in: list[int]  # prompt tokens, latent positions not counted
    latents_in: int  # latent vectors spliced into the prompt
    cache_in: int = 0  # positions of the KV cache the prompt continued (KV edges), padding included
    latent_shape: tuple[int, ...] | None = None  # (B, m, H) of the thoughts, when the agent thought
    latent_norm: float | None = None  # mean L2 norm of the raw hidden states
    tokens_out: list[int] | None = None  # tokens the model generated (end token included), when it spoke
    text: list[str] | None = None  # what it said, tool results included
    tool_calls: list[list[ToolCall]] | None = None  # per question, when the agent has tools and spoke
    seconds: float = 0.0
    rows: list[int] | None = None


@dataclass
class RunOutput:
    """The result of :meth:`System.run <latentgraph.System.run>`."""

    texts: list[str]  # the answer node's final text, one per question
    trace: list[dict[str, AgentStep]] = field(default_factory=list)  # trace[r - 1][agent]
    latents: list[dict[str, torch.Tensor]] | None = None  # latents[r - 1][agent]: (B, m, H), on CPU
    mode: RunMode = "latent"  # how it ran: the graph as built, every edge as text, or the answer node alone
    stopped_early: bool = False  # a stop criterion ended the run before its last planned round

    @property
    def rounds_run(self) -> int:
        """How many rounds ran (fewer than planned when the run stopped early)."""
        return len(self.trace)

    @property
    def seconds(self) -> float:
        return sum(step.seconds for steps in self.trace for step in steps.values())

    @property
    def tokens_out(self) -> int:
        """Every token generated in the run, by every agent."""
        return sum(sum(step.tokens_out or []) for steps in self.trace for step in steps.values())

    def table(self) -> str:
        """The trace as a plain-text table: one line per agent per round, token counts summed over rows."""
        header = ("round", "agent", "prompt", "tokens in", "latents in", "thoughts", "tokens out", "seconds")
        lines = [header]
        for steps in self.trace:
            for s in steps.values():
                lines.append((str(s.round), s.agent, s.prompt, str(sum(s.tokens_in)), str(s.latents_in),
                              "x".join(map(str, s.latent_shape)) if s.latent_shape else "-",
                              str(sum(s.tokens_out)) if s.tokens_out is not None else "-", f"{s.seconds:.3f}"))
        return format_table(lines)


def format_table(lines: list[tuple[str, ...]]) -> str:
    """Left-aligned columns two spaces apart, without trailing spaces."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


@dataclass(frozen=True)
class Event:
    """Something that happened in round ``round`` of a run."""

    round: int


@dataclass(frozen=True)
class AgentStarted(Event):
    """An agent begins its turn; ``prompt`` is ``"prompt"`` or ``"feedback_prompt"``. ``rows``: the questions
    it runs for, when conditional edges route only some of them to it (None: all)."""

    agent: str
    prompt: str
    rows: list[int] | None = None


@dataclass(frozen=True)
class AgentThought(Event):
    """An agent thought: a latent rollout of ``shape[1]`` steps."""

    agent: str
    shape: tuple[int, ...]  # (B, m, H); B counts the rows it ran for
    norm: float  # mean L2 norm of the raw hidden states
    thoughts: Thoughts = field(repr=False)  # the raw states and what the inner link made of them
    rows: list[int] | None = None  # the questions its rows are, when routing ran it for some only (None: all)


@dataclass(frozen=True)
class TokensDecoded(Event):
    """One decoding step of a speaking agent, for every row of the batch.

    ``texts[i]`` is what row ``i`` newly said since the agent's previous ``TokensDecoded`` in this turn ("" when
    nothing new can be shown yet); ``finished[i]`` says whether the row has ended (end token, ``max_new_tokens``,
    a stop string, cancelled, or context full). A row's pieces add up exactly to its text in :class:`AgentSpoke`:
    text that may still change is held back (whitespace at the end, an incomplete multi-byte character, the
    possible start of a stop string) and leading whitespace is never shown.
    """

    agent: str
    texts: list[str]
    finished: list[bool]


@dataclass(frozen=True)
class AgentSpoke(Event):
    """An agent spoke: one text per question, tool results included."""

    agent: str
    texts: list[str]
    tokens_out: list[int] | None = None  # tokens generated per question (None when teacher-forced in training)
    tool_calls: list[list[ToolCall]] | None = None  # per question, when the agent has tools


@dataclass(frozen=True)
class MessageDelivered(Event):
    """A message went out on ``edge`` into slot ``slot`` of ``receiver`` (a KV edge fills none: ``slot`` is
    None, and the receiver's prompt continues the cache): for this round, or for the next one when the edge is a
    feedback edge."""

    edge: str
    receiver: str
    slot: str | None
    next_round: bool  # a feedback edge: the receiver reads it in round ``round + 1``
    latent: torch.Tensor | None = field(default=None, repr=False)  # (B, m, d_receiver) on a latent edge
    text: list[str] | None = None  # one text per question on a text edge

    @property
    def latent_shape(self) -> tuple[int, ...] | None:
        return tuple(self.latent.shape) if self.latent is not None else None


@dataclass(frozen=True)
class AgentFinished(Event):
    """An agent's turn is over; ``step`` is its line of the trace, seconds included."""

    agent: str
    step: AgentStep


@dataclass(frozen=True)
class RoundEnded(Event):
    """Every turn of the round is over; ``steps`` is the round's trace, by agent."""

    steps: dict[str, AgentStep]


@dataclass(frozen=True)
class RunFinished(Event):
    """The run is over after ``round`` rounds; ``output`` is what :meth:`System.run` returns."""

    output: RunOutput
