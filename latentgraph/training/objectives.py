"""Training objectives for links; backbones stay frozen, gradients flow through them into the links.

``inner_loss``: an agent is teacher-forced on its target text, and its inner link learns to map the hidden
state at each target position to the input embedding of the next token (cosine loss, as published).

``unrolled_loss``: the system is unrolled for R rounds by the same engine and plan as at inference
(:func:`~latentgraph.core.engine.unroll` with a :class:`TrainingStep`), and the answer node's cross-entropy on
its target text is back-propagated through every round, every link and every frozen backbone. What the
other agents send comes from one of two regimes:

- ``"teacher"`` (published): a sender is teacher-forced on its role target; its message is built from the
  hidden states at the last prompt position and the first target positions (``latent_steps`` of them);
- ``"rollout"``: a sender thinks as at inference, by a latent rollout, so training sees what inference
  sends; ``grad_steps`` bounds how many rollout forwards stay in the autograd graph.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from ..core.agent import Agent
from ..core.engine import Spoken, Step, unroll
from ..core.events import AgentThought, Event, MessageDelivered
from ..core.forward import Forward, prefill
from ..core.links import placement
from ..core.messages import Encoded, Message
from ..core.plan import Turn
from ..core.think import Thoughts
from ..errors import GraphError, InputError
from .data import TrainExample

if TYPE_CHECKING:
    from ..core.system import System

Regime = Literal["teacher", "rollout"]


@dataclass
class Forced:
    """A teacher-forced pass over prompt + target tokens."""

    hidden: torch.Tensor  # (B, T, H) last-layer states from the last prompt position on: hidden[:, t] predicts token t
    ids: torch.Tensor  # (B, T) target ids, padded with 0
    mask: torch.Tensor  # (B, T) 1 for real target tokens
    logits: torch.Tensor | None = None  # (B, T, V) when asked for


@dataclass
class Unrolled:
    """The loss of one unrolled batch and what the gradient-norm log needs."""

    loss: torch.Tensor
    round_losses: dict[int, float]  # the answer node's cross-entropy per round where it was computed
    outputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (round, link) -> its output


def target_ids(agent: Agent, texts: list[str]) -> list[list[int]]:
    """Target texts as the continuation of an assistant turn: tokens, then the end-of-sequence token."""
    eos = agent.tokenizer.eos_token_id
    return [agent.tokenizer(t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            for t in texts]


def teacher_forced(agent: Agent, prompt: Encoded, targets: list[list[int]], *, logits: bool = False) -> Forced:
    """Run the agent's backbone on each prompt followed by its target tokens (right-padded), continuing the KV
    cache the prompt continues (``prompt.prefix``, what its KV in-edges carried), if any."""
    device = prompt.embeds.device
    length = max(len(t) for t in targets)
    ids = torch.tensor([t + [0] * (length - len(t)) for t in targets], device=device)  # (B, T)
    target_mask = torch.tensor([[1] * len(t) + [0] * (length - len(t)) for t in targets], device=device)
    embeds = torch.cat([prompt.embeds, agent.backbone.embed(ids) * target_mask[..., None]], dim=1)  # (B, L+T, H)
    mask = torch.cat([prompt.mask, target_mask], dim=1)
    start = prompt.embeds.shape[1] - 1
    forward = Forward(agent.backbone, prompt.prefix, keep=False)
    out = forward(mask, embeds=embeds, logits_to_keep=length + 1 if logits else None)
    scores = out.logits[:, :length] if logits else None
    return Forced(hidden=out.hidden[:, start:start + length], ids=ids, mask=target_mask, logits=scores)


def cross_entropy(forced: Forced) -> torch.Tensor:
    """The batch's cross-entropy: each example's mean over its target tokens, then the mean over examples."""
    ids = forced.ids.to(forced.logits.device)  # under a device map the head may sit on another device
    losses = F.cross_entropy(forced.logits.float().flatten(0, 1), ids.flatten(), reduction="none")
    return example_mean(losses.view_as(ids), forced.mask.to(ids.device))


def example_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over examples of each example's mean over its masked-in positions (``values`` and ``mask``:
    (B, T)). Every example weighs the same, however long its target: so a batch's loss is the mean of the
    losses of equal parts of it, and micro-batches and data-parallel shards add up to the whole batch's
    gradient exactly (a mean over the batch's tokens would weigh each part by its token count)."""
    mask = mask.float()
    return ((values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def inner_loss(system: System, name: str, batch: list[TrainExample]) -> torch.Tensor:
    """Cosine loss of the inner link of agent ``name`` (a nested system's as ``"team.a"``) against next-token
    input embeddings on its role targets (a mean per example, as :func:`example_mean` says).

    The prompt is the agent's round-1 prompt with every slot filled by the sender's target text.
    """
    graph = system.graph()
    agent = graph.agents[name]
    template = agent.template(feedback=False)
    senders = {e.slot: e.src for e in graph.into(name) if not e.feedback and e.kind.fills_slot}
    messages = {slot: Message(text=[ex.target_for(senders[slot]) for ex in batch]) for slot in template.slots}
    with torch.no_grad():
        prompt = agent.encode([ex.question for ex in batch], template, messages)
        answer = name == graph.answer
        forced = teacher_forced(agent, prompt, target_ids(agent, [ex.answer if answer else ex.target_for(name)
                                                                  for ex in batch]))
        goals = agent.backbone.embed(forced.ids)  # (B, T, H): hidden[:, t] should map to the embedding of token t
    predicted = agent.inner_link(forced.hidden.to(**placement(agent.inner_link)))  # (B, T, H)
    cosine = F.cosine_similarity(predicted.float(), goals.float().to(predicted.device), dim=-1)  # (B, T)
    return example_mean(1 - cosine, forced.mask.to(cosine.device))


class TrainingStep(Step):
    """Training: what a turn computes when :func:`~latentgraph.core.engine.unroll` runs a plan for
    :func:`unrolled_loss`, with autograd on.

    A sender thinks by a latent rollout with gradients (``regime="rollout"``, ``grad_steps`` forwards kept
    in the graph) or is teacher-forced on its role target (``"teacher"``), its message then built from the
    hidden states at the last prompt position and the first ``latent_steps`` target positions. The answer
    node "speaks" by being teacher-forced on its answer, which gives its cross-entropy; with
    ``intermediate_weight > 0`` the same is scored in the earlier rounds where it thinks.
    ``losses`` holds each scored round's cross-entropy after the unroll.
    """

    differentiable = True

    def __init__(self, batch: list[TrainExample], *, regime: Regime = "rollout", intermediate_weight: float = 0.0,
                 grad_steps: int | None = None):
        if regime not in ("teacher", "rollout"):
            raise InputError(f"regime must be 'teacher' or 'rollout', got {regime!r}")
        self.batch, self.regime = batch, regime
        self.intermediate_weight, self.grad_steps = intermediate_weight, grad_steps
        self.losses: dict[int, torch.Tensor] = {}

    def _examples(self, prompt: Encoded) -> list[TrainExample]:
        """The examples of the prompt's rows (a routed turn runs for some of them only)."""
        return self.batch if prompt.rows is None else [self.batch[row] for row in prompt.rows]

    def _targets(self, turn: Turn, prompt: Encoded) -> list[list[int]]:
        texts = [ex.answer if turn.is_answer else ex.target_for(turn.name) for ex in self._examples(prompt)]
        return target_ids(turn.agent, texts)

    def think(self, turn: Turn, prompt: Encoded) -> Thoughts:
        agent = turn.agent
        forced = None
        if turn.is_answer and self.intermediate_weight > 0 and not turn.speaks:  # an earlier round's answer
            forced = teacher_forced(agent, prompt, self._targets(turn, prompt), logits=True)
            self.losses[turn.round] = cross_entropy(forced)
        if self.regime == "rollout":
            return agent.think(prompt, grad_steps=self.grad_steps, keep_cache=turn.keeps_cache)
        if forced is None:  # a message uses only the first latent_steps states: skip the rest of the text
            forced = teacher_forced(agent, prompt, [t[:agent.latent_steps] for t in self._targets(turn, prompt)])
        hidden = _first_steps(forced.hidden, agent.latent_steps)  # (B, m, H)
        thoughts = Thoughts(hidden=hidden, embeds=agent.inner_link(hidden.to(**placement(agent.inner_link))))
        if turn.keeps_cache:  # a KV edge carries the prompt and the thoughts, as the rollout's cache would
            embeds = thoughts.embeds.to(prompt.embeds)
            thoughts.cache = prefill(agent.backbone, torch.cat([prompt.embeds, embeds], dim=1),
                                     torch.cat([prompt.mask, prompt.mask.new_ones(embeds.shape[:2])], dim=1),
                                     prompt.prefix)
        return thoughts

    def speak(self, turn: Turn, prompt: Encoded) -> Generator[Event, None, Spoken]:
        yield from ()  # teacher forcing decodes nothing, so there is nothing to stream
        if not turn.is_answer:
            raise GraphError(f"agent '{turn.name}' speaks on a text edge; training through text edges is not "
                             "supported: their messages are not differentiable")
        forced = teacher_forced(turn.agent, prompt, self._targets(turn, prompt), logits=True)
        self.losses[turn.round] = cross_entropy(forced)
        return Spoken(texts=[ex.answer for ex in self._examples(prompt)])


def unrolled_loss(system: System, batch: list[TrainExample], *, regime: Regime = "rollout", rounds: int | None = None,
                  intermediate_weight: float = 0.0, grad_steps: int | None = None) -> Unrolled:
    """The answer node's cross-entropy (per example, then averaged: :func:`cross_entropy`) after unrolling
    ``system`` for ``rounds`` rounds on ``batch``.

    The rounds run on the same plan and engine as :meth:`System.run <latentgraph.System.run>`, with a
    :class:`TrainingStep`. The loss is the last round's cross-entropy, plus ``intermediate_weight`` times the
    mean of the answer node's cross-entropy in earlier rounds (computed only when the weight is positive).
    """
    plan = system.plan(rounds)
    fixed = sorted({e.name for turn in plan.turns_in_order() for e in turn.outgoing if not e.kind.differentiable})
    if fixed:
        raise GraphError(f"training through text edges ({', '.join(fixed)}) is not supported: their messages "
                         "are not differentiable")
    step = TrainingStep(batch, regime=regime, intermediate_weight=intermediate_weight, grad_steps=grad_steps)
    outputs: dict[tuple[int, str], torch.Tensor] = {}  # what each link produced in each round
    for event in unroll(plan, [ex.question for ex in batch], step):
        if isinstance(event, AgentThought):
            outputs[(event.round, event.agent)] = event.thoughts.embeds  # (B, m, H), inner link applied
        elif isinstance(event, MessageDelivered) and event.latent is not None:
            outputs[(event.round, event.edge)] = event.latent  # (B, m, d_dst)
    losses, last = step.losses, plan.rounds
    earlier = [loss for r, loss in losses.items() if r < last]
    total = losses[last] + (intermediate_weight * torch.stack(earlier).mean() if earlier else 0.0)
    return Unrolled(loss=total, round_losses={r: loss.item() for r, loss in losses.items()}, outputs=outputs)


def _first_steps(hidden: torch.Tensor, steps: int) -> torch.Tensor:
    """The first ``steps`` teacher-forced states, repeating the last one if the targets are shorter."""
    if hidden.shape[1] >= steps:
        return hidden[:, :steps]
    return torch.cat([hidden, hidden[:, -1:].expand(-1, steps - hidden.shape[1], -1)], dim=1)
