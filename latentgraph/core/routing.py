"""Per-row routing: which rows (questions) of a batch a turn runs for, and which rows an edge carries a message to.

An edge with a condition (``connect(..., when=...)``) decides per row. The engine asks this module, before a
turn, for the rows the agent must run for (:meth:`Router.rows_for`): those some outgoing edge carries a message
for, and every row when the agent speaks the answer or some condition reads its text. The agent runs on that
sub-batch only, and the messages it makes are spread back to the whole batch (:func:`spread`) with only the rows
its edges are on for: a row an edge is off for gets nothing, so the receiver's slot is empty there (the text
``""``) and a KV edge adds no position (its positions are masked, and the next position is as if it were absent).
A receiver running on a sub-batch takes its rows of each message (:func:`narrow`).

A condition is decided once from a :class:`~latentgraph.core.conditions.RouteState` that the turn cannot change
(an agent reads no text of an agent running at the same time: :meth:`Plan.independent_groups
<latentgraph.core.plan.Plan.independent_groups>`), so deciding it before the turn or after gives the same rows;
only a condition on the sender's own text waits for the turn (the sender then runs for every row).
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .conditions import RouteState
from .edges import Edge
from .events import AgentStep
from .messages import Message
from .plan import Plan, Turn


@dataclass
class Router:
    """The routing state of one run: the questions and, per agent, its latest text for each row."""

    plan: Plan
    questions: list[str]
    said: dict[str, list[str | None]] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return len(self.questions)

    def state(self, round_: int, own: tuple[str, list[str | None]] | None = None) -> RouteState:
        """What conditions read in round ``round_``; ``own``: a sender's texts of the turn being decided."""
        said = dict(self.said) if own is None else {**self.said, own[0]: own[1]}
        return RouteState(round=round_, rounds=self.plan.rounds, questions=self.questions, said=said)

    def on(self, edge: Edge, round_: int, own: tuple[str, list[str | None]] | None = None) -> list[bool]:
        """Per row, whether ``edge`` carries its message in round ``round_``."""
        if edge.when is None:
            return [True] * self.batch
        return edge.when.on(self.state(round_, own), where=f"edge '{edge.name}'")

    def rows_for(self, turn: Turn) -> list[int]:
        """The rows ``turn`` runs for, in batch order (possibly none: then it does not run)."""
        everyone = list(range(self.batch))
        if (turn.is_answer and turn.speaks) or turn.name in self.plan.readers():
            return everyone
        needed = [False] * self.batch
        for edge in turn.outgoing:  # no condition here reads the sender's text: it is not a reader
            needed = [a or b for a, b in zip(needed, self.on(edge, turn.round))]
        return [row for row in everyone if needed[row]]

    def remember(self, step: AgentStep) -> None:
        """What an agent said in a turn becomes its latest text for the rows it ran for (what conditions read)."""
        if step.text is None:
            return
        latest = self.said.setdefault(step.agent, [None] * self.batch)
        for row in step.rows if step.rows is not None else range(self.batch):
            latest[row] = step.text[row]


def widen(values: Sequence[Any] | None, rows: Sequence[int], batch: int, empty: Any = None) -> list[Any] | None:
    """A sub-batch's per-row ``values`` placed at ``rows`` of a batch, ``empty`` elsewhere."""
    if values is None:
        return None
    full = [empty] * batch
    for row, value in zip(rows, values):
        full[row] = value
    return full


def widen_rows(values: list[Any] | None, rows: list[int] | None, batch: int) -> list[Any] | None:
    """Per-row values of a routed sub-batch (``rows``; None: the whole batch) at their rows, None in the others."""
    return values if rows is None else widen(values, rows, batch)


def spread_tensor(tensor: torch.Tensor, rows: Sequence[int], batch: int, fill: float = 0.0) -> torch.Tensor:
    """A sub-batch's tensor (rows first) placed at ``rows`` of a batch, ``fill`` elsewhere; differentiable."""
    index = torch.tensor(list(rows), dtype=torch.long, device=tensor.device)
    full = torch.full((batch, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=tensor.device)
    return full.index_copy(0, index, tensor)


def spread(message: Message, rows: Sequence[int], on: Sequence[bool], batch: int) -> Message | None:
    """The message a sub-batch (``rows`` of the batch) made, for the whole batch, carrying only the rows ``on``
    (per row of the batch) says; None when it carries none."""
    keep = [i for i, row in enumerate(rows) if on[row]]
    if not keep:
        return None
    if len(keep) == batch:  # every row ran and the edge is on for each: the message as made
        return message
    targets = [rows[i] for i in keep]
    present = tuple(row in set(targets) for row in range(batch))
    pick = torch.tensor(keep, dtype=torch.long)
    latent = text = cache = None
    if message.latent is not None:
        latent = spread_tensor(message.latent.index_select(0, pick.to(message.latent.device)), targets, batch)
    if message.text is not None:
        text = widen([message.text[i] for i in keep], targets, batch, empty="")
    if message.cache is not None:
        cache = message.cache.select(keep).spread(targets, batch)
    return Message(latent=latent, text=text, cache=cache, present=present)


def narrow(message: Message, rows: Sequence[int], batch: int) -> Message | None:
    """The message for ``rows`` of the batch only (a receiver running on a sub-batch); None when it carries
    nothing for any of them."""
    if message.present is not None and not any(message.present[row] for row in rows):
        return None
    if len(rows) == batch:
        return message
    pick = torch.tensor(list(rows), dtype=torch.long)
    latent = None if message.latent is None else message.latent.index_select(0, pick.to(message.latent.device))
    return Message(latent=latent, text=None if message.text is None else [message.text[row] for row in rows],
                   cache=None if message.cache is None else message.cache.select(rows),
                   present=None if message.present is None else tuple(message.present[row] for row in rows))


class RowsCancelled(Container[int]):
    """The cancelled rows of a sub-batch: row ``i`` of it is row ``rows[i]`` of the batch ``cancel()`` names."""

    def __init__(self, rows: Sequence[int], cancelled: Container[int]):
        self.rows, self.cancelled = list(rows), cancelled

    def __contains__(self, row: object) -> bool:
        return isinstance(row, int) and 0 <= row < len(self.rows) and self.rows[row] in self.cancelled

