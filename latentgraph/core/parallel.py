"""Agents in parallel: turns of a round that do not depend on each other run at once, in threads.

The plan cuts each round into groups of independent turns (:meth:`Plan.independent_groups
<latentgraph.core.plan.Plan.independent_groups>`); :func:`batches` cuts each group into batches of turns
that run at once: by default turns whose backbones share no device, since torch releases the GIL inside its
kernels and devices then work side by side. A turn run in a thread keeps its events; the engine replays them
in plan order once its batch has finished, so streams, traces, stop criteria and outputs are those of a run
that goes one turn after the other.
"""

from __future__ import annotations

from collections.abc import Generator, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from .events import Event
from .plan import Plan, Turn


def check_parallel(parallel: Any) -> bool | None:
    if parallel is not None and not isinstance(parallel, bool):
        raise InputError(f"parallel must be None (agents on different devices run at once), True (also on one "
                         f"device) or False (one agent at a time), got {parallel!r}")
    return parallel


def batches(plan: Plan, round_: int, parallel: bool | None) -> list[list[Turn]]:
    """The turns of round ``round_`` in plan order, cut into batches of independent turns that run at once.

    ``parallel=None``: turns share a batch when their backbones share no device. ``True``: on one device
    too, as long as they share no backbone (accelerate's offload hooks swap a module's weights in and out,
    one forward at a time) and do not both speak on one device (they would draw from its rows' sampling
    generators in a racy order). ``False``: one turn per batch. Either way no two turns of a batch share a tokenizer
    object: a fast tokenizer refuses to be used from two threads at once.
    """
    if parallel is False:
        return [[turn] for turn in plan.turns[round_ - 1]]
    cut: list[list[Turn]] = []
    for group in plan.independent_groups(round_):
        held: set[Hashable] = set()  # what the last batch's turns hold while they run
        for i, turn in enumerate(group):
            claims = _claims(turn, by_device=parallel is None)
            if i == 0 or claims & held:
                cut.append([turn])
                held = claims
            else:
                cut[-1].append(turn)
                held |= claims
    return cut


def _claims(turn: Turn, by_device: bool) -> set[Hashable]:
    """What a turn holds while it runs: turns that hold nothing in common may run at once."""
    backbone = turn.agent.backbone
    tokenizer = ("tokenizer", id(backbone.tokenizer))
    if by_device:
        return {tokenizer, *backbone.devices}
    return {tokenizer, ("backbone", id(backbone))} | ({backbone.device} if turn.speaks else set())


@dataclass
class Outcome:
    """What a turn run in a thread produced: its events, then its return value or its error."""

    events: list[Event] = field(default_factory=list)
    value: Any = None
    error: Exception | None = None


def drain_in_threads(runs: Sequence[Generator[Event, None, Any]]) -> list[Outcome]:
    """Run each generator to its end in a thread of its own; their outcomes, in the order of ``runs``."""
    grad = torch.is_grad_enabled()  # thread-local: workers compute with the caller's autograd setting

    def drain(run: Generator[Event, None, Any]) -> Outcome:
        outcome = Outcome()
        with torch.set_grad_enabled(grad):
            try:
                while True:
                    outcome.events.append(next(run))
            except StopIteration as finished:
                outcome.value = finished.value
            except Exception as e:  # raised by the engine, in plan order, after the earlier turns' events
                outcome.error = e
        return outcome

    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        return list(pool.map(drain, runs))
