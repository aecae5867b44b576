"""Subgraphs: a :class:`~latentgraph.System` used as a node of another system (LangGraph's subgraphs).

``team.node("team", entry=["a"])`` wraps the system ``team`` as a node, which ``System([...])`` or
``System.add`` take beside agents. An edge ``x -> team`` delivers to each entry agent, into the slot the edge
names (a latent edge carries one link per entry); an edge ``team -> y`` carries what the inner answer node
sends (it thinks, speaks or keeps its cache as the edge's kind needs).

The nested system runs ``rounds=k`` of its own rounds (one by default) inside each round of the outer system,
exactly as it runs on its own for ``k`` rounds, except that its entries also read, in every inner round, what
the outer in-edges delivered in this outer round; its out-edges carry what its answer node sends in the last
inner round, and it starts afresh in each outer round (its feedback from one outer round does not reach the next).

A nested system is flattened where the graph is made (:func:`flatten`, which ``System.graph()`` calls): its
agents and edges join the outer graph under prefixed names (``team.a``, ``team.a->team.b``), the outer edges
are redirected to the entries and from the inner answer node, and the plan and the engine run the result like
any graph. With ``k`` inner rounds, :func:`unroll_rounds` writes it out once per inner round
(``team#1.a``, ..., ``team.a``) for the plan; each copy runs the same Agent objects and links. The links stay
where they are registered (the inner system's own modules, the outer edges' links
in the outer system), so ``outer.parameters()`` holds each once and training moves them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Protocol

from torch import nn

from ..errors import GraphError
from .agent import Agent, _is_int, check_name
from .edges import Edge
from .graph import Graph
from .limits import ROUNDS


class Composite(Protocol):
    """What nesting reads of a system (a :class:`~latentgraph.System`): its nodes, edges, links and answer node."""

    agents: Mapping[str, Agent]
    subsystems: Mapping[str, Subsystem]
    edges: Mapping[str, Edge]
    links: Mapping[str, nn.Module]
    answer: str | None

    def graph(self, unrolled: bool = False) -> Graph: ...


class Subsystem(nn.Module):
    """A system as a node named ``name`` of another system; make one with :meth:`System.node
    <latentgraph.System.node>`. ``entry``: the inner agents an in-edge delivers to (in each inner round).
    ``rounds``: how many of its own rounds it runs inside each outer round, its feedback edges delivering
    between them, afresh in each outer round (see the module docstring)."""

    def __init__(self, system: Composite, name: str, entry: Sequence[str], rounds: int = 1):
        super().__init__()
        self.name = check_name(name, "nested system")
        where = f"nested system '{name}'"
        if isinstance(entry, str) or not isinstance(entry, Sequence) or not entry:
            raise GraphError(f"{where}: entry must be a non-empty list of its agents' names (the agents its "
                             f"in-edges deliver to), got {entry!r}")
        if len(set(entry)) != len(entry):
            raise GraphError(f"{where}: entry {list(entry)} names an agent twice; name each entry agent once")
        if not (_is_int(rounds) and rounds >= 1):
            raise GraphError(f"{where}: rounds must be an integer >= 1, got {rounds!r}")
        if problem := ROUNDS.problem(rounds):
            raise GraphError(f"{where}: rounds: {problem}")
        self.system = system
        self.entry, self.rounds = tuple(entry), rounds
        self.graph()  # fail now on an entry it does not have

    def graph(self, unrolled: bool = False) -> Graph:
        """The inner system's graph (itself flattened, its nested systems unrolled when ``unrolled``), checked
        for what nesting needs."""
        inner, where = self.system.graph(unrolled=unrolled), f"nested system '{self.name}'"
        for entry in self.entry:
            if entry not in self.system.agents:
                raise GraphError(f"{where}: entry '{entry}' is not an agent of it; its agents are "
                                 f"{list(self.system.agents)}")
        if inner.answer is None or inner.answer not in inner.agents:
            raise GraphError(f"{where} has no answer node (its answer is {inner.answer!r}); set the inner "
                             "system's answer= to the agent whose output its out-edges carry")
        if self.rounds == 1 and (feedback := [e.name for e in inner.edges if e.feedback]):
            raise GraphError(f"{where} has feedback edges ({', '.join(feedback)}), but it runs one round inside "
                             "each outer round, so they would never deliver: give it more inner rounds "
                             "(node(..., rounds=2)), remove them, or close the loop with a feedback edge of the "
                             "outer system")
        if self.rounds > 1 and (conditional := [e.name for e in inner.edges if e.when is not None]):
            raise GraphError(f"{where} runs {self.rounds} inner rounds and has conditional edges "
                             f"({', '.join(conditional)}), which are not supported there yet (a condition would "
                             "read the outer round): pass rounds=1, or make them unconditional")
        return inner

    def entry_agents(self) -> dict[str, Agent]:
        """The entry agents by their inner name."""
        self.graph()
        return {entry: self.system.agents[entry] for entry in self.entry}

    def exit_agent(self) -> Agent:
        """The inner answer node: what it sends is what the nested system's out-edges carry."""
        inner = self.graph()
        return inner.agents[inner.answer]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, entry={list(self.entry)}, rounds={self.rounds}"


def flatten(system: Composite, unrolled: bool = False) -> Graph:
    """``system``'s graph with every nested system expanded in place: its own agents first (in the order they
    were added), then each nested system's agents as ``<node>.<agent>`` (in the order the nested systems were
    added); inner edges under the prefixed names; each outer edge redirected from the inner answer node and,
    into a nested system, to each of its entries (with that entry's link).

    ``unrolled`` (the graph a plan runs): a nested system of ``k`` rounds is written out ``k`` times, once per
    inner round (:func:`unroll_rounds`), and an outer edge into it reaches its entries in every inner round.
    Otherwise (the graph as built: links, drawings, checkpoints) it appears once, its feedback edges as they are.
    """
    agents, edges, links, exits = dict(system.agents), [], {}, {}
    for name, sub in system.subsystems.items():
        copies, exits[name] = unroll_rounds(name, sub.graph(unrolled), sub.rounds if unrolled else 1)
        agents.update(copies.agents)
        edges += copies.edges
        links.update(copies.links)
    for edge in system.edges.values():
        src = exits.get(edge.src, edge.src)
        if edge.dst in system.subsystems:
            entry_of = {f"{prefix}.{entry}": entry for entry in system.subsystems[edge.dst].entry
                        for prefix in _prefixes(edge.dst, system.subsystems[edge.dst].rounds if unrolled else 1)}
            entries = [(dst, entry) for dst, entry in entry_of.items() if dst in agents]
        else:
            entries = [(edge.dst, None)]
        for dst, entry in entries:
            flat = replace(edge, src=src, dst=dst)
            edges.append(flat)
            if edge.kind.carries_link:
                link = system.links[edge.name]
                links[flat.name] = link if entry is None else link[entry]
    answer = exits.get(system.answer, system.answer)
    return Graph(agents=MappingProxyType(agents), edges=tuple(edges), answer=answer, links=MappingProxyType(links))


def unroll_rounds(name: str, inner: Graph, rounds: int) -> tuple[Graph, str]:
    """The nested system ``name`` (its graph ``inner``) written out once per inner round, and the flat name of
    the answer node its out-edges leave from.

    Inner round ``j`` of ``rounds`` runs its agents as ``<name>#<j>.<agent>``, the last as ``<name>.<agent>``
    (one round: only that), the same Agent objects and links in each. Its forward edges join agents of one
    round; a feedback edge ``x -> y`` joins round ``j``'s ``x`` to round ``j + 1``'s ``y`` as an
    ``inner_feedback`` edge (the last round's are dropped), so the rounds run one after the other within one
    outer round. As in a system run on its own, an agent runs in an inner round only if it sends there;
    unlike it, an agent whose messages reach no agent that runs in that round is left out too (it would think
    for nothing). With one round, ``inner``'s feedback edges are kept as they are (the graph as built)."""
    prefixes = _prefixes(name, rounds)
    exit_ = f"{prefixes[-1]}.{inner.answer}"
    agents = {f"{prefix}.{agent}": value for prefix in prefixes for agent, value in inner.agents.items()}
    edges, links = [], {}
    for j, prefix in enumerate(prefixes):
        for edge in inner.edges:
            if not edge.feedback or rounds == 1:
                flat = replace(edge, src=f"{prefix}.{edge.src}", dst=f"{prefix}.{edge.dst}")
            elif j + 1 < rounds:
                flat = replace(edge, src=f"{prefix}.{edge.src}", dst=f"{prefixes[j + 1]}.{edge.dst}", feedback=False,
                               inner_feedback=True)
            else:
                continue
            edges.append(flat)
            if edge.name in inner.links:
                links[flat.name] = inner.links[edge.name]
    if rounds > 1:
        idle = {agent for agent in agents if agent != exit_ and not any(e.src == agent for e in edges)}
        while idle:  # leave out who sends nothing in its round, then who sent only to them
            agents = {agent: value for agent, value in agents.items() if agent not in idle}
            edges = [e for e in edges if e.dst in agents]
            idle = {agent for agent in agents if agent != exit_ and not any(e.src == agent for e in edges)}
        links = {edge.name: links[edge.name] for edge in edges if edge.name in links}
    graph = Graph(agents=MappingProxyType(agents), edges=tuple(edges), answer=exit_, links=MappingProxyType(links))
    return graph, exit_


def inner_rounds(system: Composite) -> dict[str, int]:
    """How many inner rounds each nested system of ``system`` runs, by its flattened name (``"team"``,
    ``"team.sub"``)."""
    found = {}
    for name, sub in system.subsystems.items():
        found[name] = sub.rounds
        found.update({f"{name}.{inner}": rounds for inner, rounds in inner_rounds(sub.system).items()})
    return found


def _prefixes(name: str, rounds: int) -> list[str]:
    """The names a nested system's inner rounds run under: ``team#1``, ``team#2``, ..., then ``team``."""
    return [f"{name}#{j}" for j in range(1, rounds)] + [name]
