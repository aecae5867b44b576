"""Subgraphs: a :class:`~latentgraph.System` used as a node of another system (LangGraph's subgraphs).

``team.node("team", entry=["a"])`` wraps the system ``team`` as a node, which ``System([...])`` or
``System.add`` take beside agents. An edge ``x -> team`` delivers to each entry agent, into the slot the edge
names (a latent edge carries one link per entry); an edge ``team -> y`` carries what the inner answer node
sends (it thinks, speaks or keeps its cache as the edge's kind needs). The nested system runs one round inside
each round of the outer system.

A nested system is flattened where the graph is made (:func:`flatten`, which ``System.graph()`` calls): its
agents and edges join the outer graph under prefixed names (``team.a``, ``team.a->team.b``), the outer edges
are redirected to the entries and from the inner answer node, and the plan and the engine run the result like
any graph. The links stay where they are registered (the inner system's own modules, the outer edges' links
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


class Composite(Protocol):
    """What nesting reads of a system (a :class:`~latentgraph.System`): its nodes, edges, links and answer node."""

    agents: Mapping[str, Agent]
    subsystems: Mapping[str, Subsystem]
    edges: Mapping[str, Edge]
    links: Mapping[str, nn.Module]
    answer: str | None

    def graph(self) -> Graph: ...


class Subsystem(nn.Module):
    """A system as a node named ``name`` of another system; make one with :meth:`System.node
    <latentgraph.System.node>`. ``entry``: the inner agents an in-edge delivers to. ``rounds``: how many of its
    own rounds it runs inside each outer round (one; more are not supported yet)."""

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
        if rounds != 1:
            raise GraphError(f"{where}: rounds={rounds}: a nested system runs one round inside each outer round "
                             "(more inner rounds are not supported yet); pass rounds=1, or give the outer system "
                             "more rounds")
        self.system = system
        self.entry, self.rounds = tuple(entry), rounds
        self.graph()  # fail now on an entry it does not have

    def graph(self) -> Graph:
        """The inner system's graph (itself flattened), checked for what nesting needs."""
        inner, where = self.system.graph(), f"nested system '{self.name}'"
        for entry in self.entry:
            if entry not in self.system.agents:
                raise GraphError(f"{where}: entry '{entry}' is not an agent of it; its agents are "
                                 f"{list(self.system.agents)}")
        if inner.answer is None or inner.answer not in inner.agents:
            raise GraphError(f"{where} has no answer node (its answer is {inner.answer!r}); set the inner "
                             "system's answer= to the agent whose output its out-edges carry")
        if feedback := [e.name for e in inner.edges if e.feedback]:
            raise GraphError(f"{where} has feedback edges ({', '.join(feedback)}), but it runs one round inside "
                             "each outer round, so they would never deliver: remove them, or close the loop "
                             "with a feedback edge of the outer system")
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


def flatten(system: Composite) -> Graph:
    """``system``'s graph with every nested system expanded in place: its own agents first (in the order they
    were added), then each nested system's agents as ``<node>.<agent>`` (in the order the nested systems were
    added); inner edges under the prefixed names; each outer edge redirected from the inner answer node and,
    into a nested system, to each of its entries (with that entry's link)."""
    inner = {name: sub.graph() for name, sub in system.subsystems.items()}
    agents, edges, links = dict(system.agents), [], {}
    for name, graph in inner.items():
        agents.update({f"{name}.{agent}": value for agent, value in graph.agents.items()})
        for edge in graph.edges:
            prefixed = replace(edge, src=f"{name}.{edge.src}", dst=f"{name}.{edge.dst}")
            edges.append(prefixed)
            if edge.name in graph.links:
                links[prefixed.name] = graph.links[edge.name]
    for edge in system.edges.values():
        src = f"{edge.src}.{inner[edge.src].answer}" if edge.src in inner else edge.src
        entries = system.subsystems[edge.dst].entry if edge.dst in inner else (None,)
        for entry in entries:
            flat = replace(edge, src=src, dst=edge.dst if entry is None else f"{edge.dst}.{entry}")
            edges.append(flat)
            if edge.kind.carries_link:
                link = system.links[edge.name]
                links[flat.name] = link if entry is None else link[entry]
    answer = system.answer
    if answer in inner:
        answer = f"{answer}.{inner[answer].answer}"
    return Graph(agents=MappingProxyType(agents), edges=tuple(edges), answer=answer, links=MappingProxyType(links))
