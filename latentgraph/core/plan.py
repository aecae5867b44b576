"""A compiled plan: who runs in which round, reading what and sending where.

:meth:`System.plan <latentgraph.System.plan>` validates the graph and compiles it into a :class:`Plan`:
a frozen snapshot of the agents, links and answer node, and the :class:`Turn` of each agent in each round.
The rules (docs/concepts.md, "Rounds"): in round r, agents run in topological order of the forward edges.
An agent runs if it has an outgoing forward edge, or an outgoing feedback edge and r < R, or it is the
answer node. It reads ``feedback_prompt`` when feedback from round r-1 has arrived, else ``prompt``. It
*thinks* (a latent rollout) when the kind of one of its active outgoing edges needs thoughts (latent, kv),
and *speaks* (decodes text) when one needs text or when it is the answer node in round R. Forward edges
deliver in this round, feedback edges in the next.

Two baselines run on the same graph: ``mode="text"`` treats every edge as a text edge, and
``mode="single"`` runs the answer node alone, once, with its slots empty.

A plan is compiled from a :class:`~latentgraph.core.graph.Graph` (data: agents, edges, answer node, links),
never from the system itself.

A plan is what :func:`~latentgraph.core.engine.unroll` executes, for inference and for training alike;
``print(plan)`` shows it as a table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import nn

from ..errors import GraphError, InputError
from .agent import Agent
from .edges import Edge
from .events import RUN_MODES, RunMode, format_table
from .graph import Graph
from .limits import ROUNDS
from .messages import Message
from .prompt import PromptTemplate
from .validation import graph_problems


@dataclass(frozen=True)
class Turn:
    """One agent's part in one round."""

    round: int
    name: str  # the agent's name in the graph (a nested system's agents: "team.a")
    agent: Agent
    incoming: tuple[Edge, ...]  # the edges whose messages fill its prompt's slots
    outgoing: tuple[Edge, ...]  # the edges it sends on this round
    thinks: bool  # an outgoing edge's kind needs thoughts
    speaks: bool  # an outgoing edge's kind needs text, or it is the answer node in the last round
    reads_feedback: bool  # feedback from the previous round has arrived: use feedback_prompt
    is_answer: bool  # the agent is the system's answer node

    @property
    def keeps_cache(self) -> bool:
        """An outgoing edge passes on the KV cache its rollout ends with."""
        return any(e.kind.keeps_cache for e in self.outgoing)

    @property
    def prompt_kind(self) -> str:
        """``"feedback_prompt"`` or ``"prompt"``."""
        return "feedback_prompt" if self.reads_feedback else "prompt"

    @property
    def template(self) -> PromptTemplate:
        return self.agent.template(self.reads_feedback)


@dataclass(frozen=True, eq=False)
class Plan:
    """A validated system compiled for ``rounds`` rounds in run mode ``mode``; immutable.

    ``turns[r - 1]`` holds the turns of round ``r`` in execution order. ``agents`` and ``links`` are
    read-only snapshots of the system's agents and outer links (the modules themselves, so training a link
    trains it for the plan too); later edits of the system's graph do not change a plan.
    """

    agents: Mapping[str, Agent]
    links: Mapping[str, nn.Module]  # outer links by edge name
    answer: str
    mode: RunMode
    turns: tuple[tuple[Turn, ...], ...]

    @property
    def rounds(self) -> int:
        """How many rounds the plan unrolls."""
        return len(self.turns)

    def readers(self) -> frozenset[str]:
        """The agents whose text some edge's condition reads (they speak in each of their turns, for every row)."""
        return self._readers

    @cached_property
    def _readers(self) -> frozenset[str]:  # asked before every turn of a run: worked out once per plan
        return frozenset(name for turn in self.turns_in_order() for name in _reads(turn))

    def turns_in_order(self) -> list[Turn]:
        """Every turn of every round, in execution order."""
        return [turn for turns in self.turns for turn in turns]

    def independent_groups(self, round_: int) -> list[tuple[Turn, ...]]:
        """The turns of round ``round_`` in execution order, cut into runs of consecutive turns none of which
        delivers to another by a forward edge (mixture's experts, say): the turns of a run may go at once.
        A turn that reads what an earlier turn of the current run sends this round starts the next run, and so
        does one whose edges' conditions read the text of a turn of the run (or the other way round): a
        condition then reads the same text however the turns run."""
        groups: list[list[Turn]] = []
        for turn in self.turns[round_ - 1]:
            senders = {e.src for e in turn.incoming if not e.feedback} | _reads(turn)
            members = {member.name for member in groups[-1]} if groups else set()
            if groups and not senders & members and not any(turn.name in _reads(m) for m in groups[-1]):
                groups[-1].append(turn)
            else:
                groups.append([turn])
        return [tuple(group) for group in groups]

    def table(self) -> str:
        """One line per turn: round, agent, prompt, the slots it reads (``{slot} <- edge``), whether it
        thinks or speaks, and the edges it sends on (delivered now, or in the next round)."""
        lines = [("round", "agent", "prompt", "reads", "does", "sends")]
        for turn in self.turns_in_order():
            by_slot = {e.slot: e.name for e in turn.incoming if e.kind.fills_slot}
            reads = ", ".join([f"cache <- {e.name}" for e in turn.incoming if not e.kind.fills_slot]
                              + [f"{{{s}}} <- {by_slot.get(s, 'empty')}" for s in turn.template.slots])
            does = " + ".join(filter(None, ["thinks" if turn.thinks else "",
                                            ("speaks the answer" if turn.is_answer else "speaks")
                                            if turn.speaks else ""]))
            sends = ", ".join(f"{e.name} ({e.mode}, {'next round' if e.feedback else 'now'}"
                              f"{'' if e.when is None else ', when ' + e.when.describe()})" for e in turn.outgoing)
            lines.append((str(turn.round), turn.name, turn.prompt_kind, reads or "-", does, sends or "-"))
        return format_table(lines)

    def __str__(self) -> str:
        rounds = f"{self.rounds} round{'s' * (self.rounds != 1)}"
        return f"Plan: {rounds}, {self.mode} mode, answer '{self.answer}'\n{self.table()}"

    def __repr__(self) -> str:
        return (f"Plan(rounds={self.rounds}, mode={self.mode!r}, answer={self.answer!r}, "
                f"turns={len(self.turns_in_order())})")

    def place_links(self) -> None:
        """Put the inner link of each agent that takes a turn on its device, and each outer link on its
        receiver's device. Agents without a turn (all but the answer node in ``"single"`` mode) are left
        alone: reading a device-mapped backbone's device loads its weights."""
        for agent in {id(turn.agent): turn.agent for turn in self.turns_in_order()}.values():
            agent.inner_link.to(agent.backbone.device)
        receivers = {e.name: e.dst for turn in self.turns_in_order() for e in turn.outgoing}
        for name, link in self.links.items():
            if name in receivers:
                link.to(self.agents[receivers[name]].backbone.device)

    def check_lengths(self, questions: list[str], max_new_tokens: int) -> None:
        """Fail before any forward if a prompt plus what is appended to it exceeds a backbone's context.

        A prompt with more characters than the context can hold at the tokenizer's longest token
        (:attr:`~latentgraph.core.backbone.Backbone.longest_token`) is refused before it is tokenized, so a huge
        question costs neither the time nor the memory of tokenizing it."""
        seen, cached = set(), {}  # cached: per agent, the positions of the KV cache it last passed on
        for turn in self.turns_in_order():
            agent = turn.agent
            prefix = sum(cached.get(e.src, 0) for e in turn.incoming if not e.kind.fills_slot)
            key = (turn.name, turn.reads_feedback, turn.thinks, turn.speaks, prefix)
            if key in seen or agent.backbone.max_positions is None:
                continue
            seen.add(key)
            incoming = {e.slot: e for e in turn.incoming if e.kind.fills_slot}
            messages = {s: Message(latent=torch.empty(0)) if s in incoming and incoming[s].kind.carries_link else
                        Message(text=[""] * len(questions)) for s in turn.template.slots}
            extra = prefix + sum(e.kind.positions(self.agents[e.src], max_new_tokens) for e in incoming.values())
            own = max(agent.latent_steps if turn.thinks else 0, max_new_tokens if turn.speaks else 0)
            rendered = agent.render(questions, turn.template, messages)
            _check_characters(turn.name, agent, rendered, extra + own)
            longest = 0
            for i, row in enumerate(agent.tokenize(rendered)):
                longest = max(longest, sum(len(p) for p in row if not isinstance(p, tuple)) + extra)
                if longest + own > agent.backbone.max_positions:
                    raise InputError(
                        f"agent '{turn.name}': question {i} needs {longest + own} positions (prompt, incoming "
                        f"messages and its own output) but its backbone has {agent.backbone.max_positions}; "
                        "shorten the question or lower latent_steps / max_new_tokens"
                    )
            if turn.keeps_cache:
                cached[turn.name] = longest + agent.latent_steps


def _check_characters(name: str, agent: Agent, rendered: list[list[str | tuple[str]]], extra: int) -> None:
    """Refuse, before tokenizing, a prompt whose characters cannot fit: it has at least ``characters /
    longest_token`` tokens."""
    longest, positions = agent.backbone.longest_token, agent.backbone.max_positions
    if not longest:
        return
    for i, row in enumerate(rendered):
        characters = sum(len(p) for p in row if isinstance(p, str))
        needed = -(-characters // longest) + extra  # ceil(characters / longest), then what is appended
        if needed > positions:
            raise InputError(
                f"agent '{name}': question {i} makes a prompt of {characters:,} characters, which needs at "
                f"least {needed:,} positions (no token of its tokenizer has more than {longest} characters; "
                f"incoming messages and its own output need the rest) but its backbone has {positions:,}; "
                "shorten the question (or the agent's prompts)"
            )


def build_plan(graph: Graph, rounds: int, mode: RunMode = "latent") -> Plan:
    """Validate ``graph`` and compile it into a :class:`Plan`; see :meth:`System.plan`."""
    if not (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1):
        raise InputError(f"rounds must be an integer >= 1, got {rounds!r}")
    if problem := ROUNDS.problem(rounds):
        raise InputError(f"rounds: {problem}")
    if mode not in RUN_MODES:
        raise InputError(f"mode must be one of {RUN_MODES}, got {mode!r}")
    if problems := graph_problems(graph):
        raise GraphError("the system is invalid:\n  - " + "\n  - ".join(problems))
    agents, answer = graph.agents, graph.answer
    if mode == "single":
        turn = Turn(round=1, name=answer, agent=agents[answer], incoming=(), outgoing=(), thinks=False, speaks=True,
                    reads_feedback=False, is_answer=True)
        return Plan(agents=agents, links=graph.links, answer=answer, mode=mode, turns=((turn,),))
    edges = [replace(e, kind=e.kind.as_text()) if mode == "text" else e for e in graph.edges]
    readers = {name for e in edges if e.when is not None for name in e.when.reads()}  # they speak in every turn
    order, plan = graph.order(), []
    sent = {name: [e for e in edges if e.src == name] for name in order}  # once, not in every round
    received = {name: [e for e in edges if e.dst == name] for name in order}
    for r in range(1, rounds + 1):
        last, turns = r == rounds, []
        for name in order:
            outgoing = tuple(e for e in sent[name] if not (e.feedback and last) and _may_send(e, r, rounds))
            is_answer = name == answer
            if outgoing or (last and is_answer):
                incoming = tuple(e for e in received[name] if (not e.feedback and _may_send(e, r, rounds))
                                 or (e.feedback and r > 1 and _may_send(e, r - 1, rounds)))
                turns.append(Turn(round=r, name=name, agent=agents[name], incoming=incoming, outgoing=outgoing,
                                  thinks=any(e.kind.thinks for e in outgoing),
                                  speaks=(last and is_answer) or name in readers
                                  or any(e.kind.speaks for e in outgoing),
                                  reads_feedback=_reads_feedback(incoming), is_answer=is_answer))
        plan.append(tuple(turns))
    return Plan(agents=agents, links=graph.links, answer=answer, mode=mode, turns=tuple(plan))


def answer_turn(plan: Plan, round_: int) -> Turn:
    """The answer node's turn when a run stops early after ``round_``: it speaks from what it reads in that
    round (its own turn of that round, when it had one), sending nothing."""
    for turn in plan.turns[round_ - 1]:
        if turn.is_answer:
            return replace(turn, outgoing=(), thinks=False, speaks=True)
    incoming = tuple(e for turn in plan.turns[round_ - 1] for e in turn.outgoing
                     if e.dst == plan.answer and not e.feedback)
    if round_ > 1:  # feedback sent to it in the previous round
        incoming += tuple(e for turn in plan.turns[round_ - 2] for e in turn.outgoing
                          if e.dst == plan.answer and e.feedback)
    return Turn(round=round_, name=plan.answer, agent=plan.agents[plan.answer], incoming=incoming, outgoing=(),
                thinks=False, speaks=True, reads_feedback=_reads_feedback(incoming), is_answer=True)


def _reads(turn: Turn) -> frozenset[str]:
    """The agents whose text the conditions of the turn's outgoing edges read."""
    return frozenset(name for e in turn.outgoing if e.when is not None for name in e.when.reads())


def _may_send(edge: Edge, round_: int, rounds: int) -> bool:
    """Whether ``edge`` may carry a message in round ``round_``: False only when its condition depends on the
    round alone and is off then (then the edge is in none of that round's turns)."""
    return edge.when is None or edge.when.fixed(round_, rounds) is not False


def _reads_feedback(incoming: tuple[Edge, ...]) -> bool:
    """Feedback fills a slot: the agent reads its feedback_prompt (a KV cache fed back fills none)."""
    return any(e.reads_as_feedback and e.kind.fills_slot for e in incoming)
