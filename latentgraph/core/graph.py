"""A system's graph as data: the agents, edges, answer node and outer links a plan is compiled from.

:meth:`System.graph <latentgraph.System.graph>` takes this snapshot; validation and the plan read only it,
never the :class:`~latentgraph.System` (LangGraph's builder and compiled graph, in our terms). Its
:meth:`Graph.key` tells whether two snapshots compile to the same plan, so a system compiles each plan once.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import networkx as nx
from torch import nn

from .edges import Edge

if TYPE_CHECKING:
    from .agent import Agent


@dataclass(frozen=True, eq=False)
class Graph:
    """Agents (in the order they were added), edges (in the order they were connected), the answer node and
    the outer links by edge name. The agents and links are the modules themselves: a plan trains them."""

    agents: Mapping[str, Agent]
    edges: tuple[Edge, ...]
    answer: str | None
    links: Mapping[str, nn.Module]

    @classmethod
    def of(cls, agents: Mapping[str, Agent], edges: Mapping[str, Edge], answer: str | None,
           links: Mapping[str, nn.Module]) -> Graph:
        return cls(agents=MappingProxyType(dict(agents)), edges=tuple(edges.values()), answer=answer,
                   links=MappingProxyType(dict(links)))

    def into(self, agent: str) -> list[Edge]:
        return [e for e in self.edges if e.dst == agent]

    def out_of(self, agent: str) -> list[Edge]:
        return [e for e in self.edges if e.src == agent]

    def forward_dag(self) -> nx.DiGraph:
        """The agents and forward edges: the DAG a round runs in."""
        dag = nx.DiGraph()
        dag.add_nodes_from(self.agents)
        dag.add_edges_from((e.src, e.dst) for e in self.edges if not e.feedback)
        return dag

    def order(self) -> list[str]:
        """Agents in topological order of the forward edges; ties keep the order agents were added."""
        position = {name: i for i, name in enumerate(self.agents)}
        return list(nx.lexicographical_topological_sort(self.forward_dag(), key=position.__getitem__))

    def key(self) -> Hashable:
        """Equal for two snapshots that validate and compile alike: the same agent and link objects, prompts,
        latent steps and backbones, and the same edges and answer node."""
        agents = tuple((name, id(a), a.prompt, a.feedback_prompt, a.latent_steps, id(a.inner_link), id(a.backbone))
                       for name, a in self.agents.items())
        return agents, self.edges, self.answer, tuple((name, id(link)) for name, link in self.links.items())
