"""Stopping a run early: a criterion called on each round's events (see :func:`~latentgraph.core.engine.unroll`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from .events import AgentThought, Event

if TYPE_CHECKING:
    from .plan import Plan

Stop = Callable[[list[Event]], bool]


class StopCriterion(ABC):
    """A stop criterion with state across rounds; :func:`unroll` calls :meth:`reset` before each run."""

    def reset(self, plan: Plan) -> None:  # noqa: B027 (a criterion without state keeps this no-op)
        """Forget earlier runs."""

    @abstractmethod
    def __call__(self, events: list[Event]) -> bool:
        """Whether the run should end after the round whose events these are."""


class ThoughtsConverged(StopCriterion):
    """Stop when an agent's mean thought changed by less than ``tol`` (relative L2) since its last thoughts,
    for every question. The agent is the answer node unless ``agent`` names another one.

    It compares the mean over the ``m`` raw hidden states of one round with the previous round's, so it
    can fire from round 2 on, in rounds where the agent thinks. Where conditional edges route questions, only
    the questions the agent thought for in both rounds are compared.
    """

    def __init__(self, tol: float = 0.05, agent: str | None = None):
        if not tol >= 0:
            raise InputError(f"ThoughtsConverged: tol must be >= 0, got {tol!r}")
        self.tol, self.agent = tol, agent
        self._watched: str | None = agent
        self._previous: torch.Tensor | None = None
        self.changes: list[torch.Tensor] = []  # per comparison: the relative change of each question, (B,)

    def reset(self, plan: Plan) -> None:
        self._watched = self.agent or plan.answer
        self._previous, self.changes = None, []

    def __call__(self, events: list[Event]) -> bool:
        thought = next((e for e in events if isinstance(e, AgentThought) and e.agent == self._watched), None)
        if thought is None:
            return False
        mean = thought.thoughts.hidden.detach().float().mean(dim=1)  # (b, H): the rows the agent ran for
        if thought.rows is not None:  # a routed turn: NaN for the rows it did not run for
            mean = _padded(mean, max(thought.rows) + 1, thought.rows)
        previous, self._previous = self._previous, mean
        if previous is None:
            return False
        width = max(len(mean), len(previous))
        mean, previous = _padded(mean, width), _padded(previous, width)
        change = (mean - previous).norm(dim=-1) / previous.norm(dim=-1).clamp_min(1e-12)  # (B,)
        self.changes.append(change.cpu())
        compared = change[~change.isnan()]  # rows it did not think for in both rounds are not compared
        return bool(len(compared)) and bool((compared < self.tol).all())


def _padded(means: torch.Tensor, rows: int, at: Sequence[int] | None = None) -> torch.Tensor:
    """``means`` placed at rows ``at`` (default: the first ones) of ``rows`` rows; NaN in the others."""
    full = means.new_full((rows, means.shape[1]), float("nan"))
    full[list(at) if at is not None else slice(0, len(means))] = means
    return full
