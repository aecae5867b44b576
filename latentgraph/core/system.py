"""Systems: agents connected by edges. Build with ``connect``, check with ``validate``, compile with ``plan``,
execute with ``run`` (or ``stream``, which yields the run's events as they happen).

A forward edge delivers in the same round, so forward edges must form a DAG; a feedback edge delivers in
the next round and may close a loop. What an edge carries is its kind (:mod:`~latentgraph.core.edges`):
latent edges an outer link's output, text edges the sender's decoded text, KV edges the sender's KV cache.
Every check that can fail runs before the first forward of a run. A plan is compiled from the graph's data
(:class:`~latentgraph.core.graph.Graph`) once, and reused while the graph stays the same.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import networkx as nx
from torch import nn

from ..errors import GraphError, InputError
from .agent import Agent, _is_int, check_name
from .conditions import parse_condition
from .edges import Edge, edge_kind
from .engine import InferenceStep, question_list, unroll
from .events import Event, RunMode, RunOutput
from .graph import Graph
from .limits import AGENTS, EDGES, ROUNDS
from .links import Link, make_link
from .parallel import check_parallel
from .plan import Plan, build_plan
from .prompt import QUESTION
from .sampling import Sampling
from .stopping import Stop
from .subsystem import Subsystem, flatten, inner_rounds
from .system_files import SystemFiles
from .validation import graph_problems

PLANS_KEPT = 8  # compiled plans a system keeps (per graph, round count and run mode)


class System(SystemFiles, nn.Module):
    """A multi-agent system: a typed graph of agents, links and rounds.

    Args:
        agents: the agents (names must be unique), and any nested systems (:meth:`node`).
        rounds: how many rounds :meth:`run` unrolls by default.
        answer: the agent (or nested system) that decodes the final text (default: the only one, if there is one).

    ``system.agents`` maps names to agents, ``system.subsystems`` names to nested systems and ``system.links``
    edge names (``"planner->critic"``) to outer links (an edge into a nested system: ``{entry: link}``); all are
    ``nn.ModuleDict``s, so ``system.parameters()`` are exactly the link parameters, each once (backbones are
    referenced, not registered).
    """

    def __init__(self, agents: Iterable[Agent | Subsystem], *, rounds: int = 3, answer: str | None = None):
        super().__init__()
        self.agents = nn.ModuleDict()
        self.subsystems = nn.ModuleDict()
        self.links = nn.ModuleDict()
        self.edges: dict[str, Edge] = {}
        self._plans: OrderedDict[Any, Plan] = OrderedDict()
        for agent in agents:
            self.add(agent)
        self.rounds = rounds
        nodes = [*self.agents, *self.subsystems]
        self.answer = answer if answer is not None or len(nodes) != 1 else nodes[0]

    @property
    def rounds(self) -> int:
        return self._rounds

    @rounds.setter
    def rounds(self, value: int) -> None:
        if not (_is_int(value) and value >= 1):
            raise GraphError(f"rounds must be an integer >= 1, got {value!r}")
        if problem := ROUNDS.problem(value):
            raise GraphError(f"rounds: {problem}")
        self._rounds = value

    def add(self, agent: Agent | Subsystem) -> System:
        """Add an agent, or a nested system (:meth:`node`)."""
        if not isinstance(agent, (Agent, Subsystem)):
            raise GraphError(f"System takes Agent objects and nested systems (system.node(...)), got {agent!r}")
        if agent.name in self.agents or agent.name in self.subsystems:
            raise GraphError(f"duplicate agent name '{agent.name}'; give each agent and nested system its own name")
        count = sum(len(node.graph(unrolled=True).agents) if isinstance(node, Subsystem) else 1
                    for node in [*self.agents.values(), *self.subsystems.values(), agent])
        if problem := AGENTS.problem(count, f"a system of {count} agents"):
            raise GraphError(f"cannot add agent '{agent.name}': {problem}")
        try:
            (self.subsystems if isinstance(agent, Subsystem) else self.agents)[agent.name] = agent
        except KeyError:
            raise GraphError(f"agent name '{agent.name}' is reserved by nn.ModuleDict; choose another") from None
        return self

    def node(self, name: str, *, entry: Sequence[str], rounds: int = 1) -> Subsystem:
        """This system as a node named ``name`` of another system (a subgraph): ``outer = System([planner,
        team.node("team", entry=["a"])])``. An in-edge ``x -> team`` delivers to each ``entry`` agent, into the
        slot it names (which every entry's prompt must have; a latent edge gets one link per entry); an out-edge
        ``team -> y`` carries what this system's answer node sends in its last inner round. It runs ``rounds``
        of its own rounds inside each outer round, starting afresh in each (its feedback edges deliver between
        them; with one round it may have none). Its agents run as ``<name>.<agent>`` (in inner rounds before the
        last, ``<name>#<j>.<agent>``); see :mod:`~latentgraph.core.subsystem`."""
        return Subsystem(self, name, entry, rounds)

    def connect(self, src: str, dst: str, *, slot: str | None = None, feedback: bool = False,
                mode: str = "latent", link: Any = None, kv: str | None = None, when: Any = None) -> System:
        """Add the edge ``src -> dst``.

        Args:
            slot: the placeholder it fills in the receiver's prompt (default: the sender's name); a KV edge
                fills none.
            feedback: deliver in the next round instead of this one; this is how loops are closed.
            mode: the edge's kind (:mod:`~latentgraph.core.edges`): ``"latent"`` (an outer link turns the
                sender's thoughts into the receiver's input embeddings), ``"text"`` (the sender decodes text and
                the receiver reads it) or ``"kv"`` (the receiver's prompt continues the sender's KV cache: its
                prompt and its thoughts; both agents need the same backbone).
            link: the outer link of a latent edge: a registered type name (default ``"ln_res"``), a
                :class:`~latentgraph.core.config.LinkConfig` or dict, or a module mapping ``d_src`` to ``d_dst``.
            kv: for a KV edge, ``"all"`` (default) or ``"thoughts"``: pass the thought positions only.
            when: the condition under which the edge carries its message, decided per question and round
                (:mod:`~latentgraph.core.conditions`): a ``Condition``, a dict such as ``{"type": "rounds",
                "rounds": [1]}`` or a registered condition's name. ``None``: always.
        """
        where = f"edge '{src}->{dst}'"
        for name in (src, dst):
            if name not in self.agents and name not in self.subsystems:
                raise GraphError(f"{where}: unknown agent '{name}'; agents are {list(self.agents)}"
                                 + (f", nested systems {list(self.subsystems)}" if self.subsystems else ""))
        if f"{src}->{dst}" in self.edges:
            raise GraphError(f"{where} already exists; disconnect('{src}', '{dst}') first to replace it")
        if problem := EDGES.problem(len(self.edges) + 1, f"a system of {len(self.edges) + 1} edges"):
            raise GraphError(f"cannot add {where}: {problem}")
        kind = edge_kind(mode, where, kv=kv)
        if kind.fills_slot:
            slot = check_name(slot if slot is not None else src, f"{where} slot")
            if slot == QUESTION:
                raise GraphError(f"{where}: slot '{QUESTION}' is the task text; choose another slot name")
        elif slot is not None:
            raise GraphError(f"{where}: a {kind.name} edge fills no slot (the receiver's prompt continues what it "
                             "carries); drop slot=")
        if not feedback:
            self._check_acyclic(src, dst, where)
        condition = None if when is None else parse_condition(when, f"{where} when")
        edge = Edge(src=src, dst=dst, slot=slot, kind=kind, feedback=bool(feedback), when=condition)
        if kind.carries_link:
            self.links[edge.name] = self._make_links(src, dst, link if link is not None else "ln_res", where)
        elif link is not None:
            raise GraphError(f"{where}: a {kind.name} edge carries no link; drop link= or use mode='latent'")
        self.edges[edge.name] = edge
        return self

    def _make_links(self, src: str, dst: str, link: Any, where: str) -> nn.Module:
        """The outer link of a latent edge; into a nested system, ``{entry: link}`` with a link per entry."""
        sender = self.subsystems[src].exit_agent() if src in self.subsystems else self.agents[src]
        if dst in self.agents:
            return make_link(link, role="outer", in_dim=sender.hidden_size, out_dim=self.agents[dst].hidden_size,
                             where=where)
        entries = self.subsystems[dst].entry_agents()
        if isinstance(link, nn.Module) and len(entries) > 1:
            raise GraphError(f"{where}: '{dst}' has {len(entries)} entry agents, each with its own link; pass a "
                             "link type or config (one link is made per entry), not a module")
        return nn.ModuleDict({entry: make_link(link, role="outer", in_dim=sender.hidden_size,
                                               out_dim=agent.hidden_size, where=f"{where} (entry '{entry}')")
                              for entry, agent in entries.items()})

    def disconnect(self, src: str, dst: str) -> System:
        """Remove the edge ``src -> dst`` and its link."""
        name = f"{src}->{dst}"
        if name not in self.edges:
            raise GraphError(f"no edge '{name}'; edges are {list(self.edges)}")
        del self.edges[name]
        if name in self.links:
            del self.links[name]
        return self

    def _check_acyclic(self, src: str, dst: str, where: str) -> None:
        graph = nx.DiGraph()  # a nested system is one node here: its own edges form a DAG
        graph.add_nodes_from([*self.agents, *self.subsystems])
        graph.add_edges_from((e.src, e.dst) for e in self.edges.values() if not e.feedback)
        graph.add_edge(src, dst)
        if nx.has_path(graph, dst, src):
            cycle = " -> ".join([src, *nx.shortest_path(graph, dst, src)])
            raise GraphError(
                f"{where} closes a cycle of forward edges ({cycle}); forward edges must form a DAG, so "
                "connect the edge that goes back with feedback=True"
            )

    def to_networkx(self) -> nx.DiGraph:
        """The whole graph, feedback edges included, as a ``networkx.DiGraph``.

        Nodes are agent names (a nested system's as ``<node>.<agent>``: the graph is flattened) with attributes
        ``backbone``, ``revision``, ``hidden_size``, ``latent_steps``, ``answer`` (bool), ``tools`` (tags) and
        ``system`` (the nested system it runs in, as ``"team"`` or ``"team.sub"``; ``None`` for the system's own
        agents). Edges carry ``name``, ``slot``, ``mode``, ``feedback``, ``link_type``, ``in_dim``, ``out_dim``
        and ``params`` (link attributes are ``None`` on text edges). The graph attributes are ``rounds``,
        ``answer`` and ``inner_rounds`` (each nested system's rounds, by the name ``system`` gives it). A nested
        system of several rounds appears once, its feedback edges as built.
        """
        flat = self.graph()
        graph = nx.DiGraph(rounds=self.rounds, answer=flat.answer, inner_rounds=inner_rounds(self))
        for name, agent in flat.agents.items():
            graph.add_node(name, backbone=str(agent.backbone.name_or_path), revision=agent.backbone.revision,
                           hidden_size=agent.hidden_size, latent_steps=agent.latent_steps,
                           answer=name == flat.answer, tools=[tool.tag for tool in agent.tools],
                           system=name.rpartition(".")[0] or None)
        for edge in flat.edges:
            link = flat.links[edge.name] if edge.kind.carries_link else None
            graph.add_edge(
                edge.src, edge.dst, name=edge.name, slot=edge.slot, mode=edge.mode, feedback=edge.feedback,
                link_type=None if link is None else link.config.type if isinstance(link, Link) else type(link).__name__,
                in_dim=None if link is None else flat.agents[edge.src].hidden_size,
                out_dim=None if link is None else flat.agents[edge.dst].hidden_size,
                params=None if link is None else sum(p.numel() for p in link.parameters()))
        return graph

    def order(self) -> list[str]:
        """Agents in topological order of the forward edges; ties keep the order agents were added (a nested
        system's agents come after the system's own, in each of its inner rounds: ``team#1.a`` before ``team.a``)."""
        return self.graph(unrolled=True).order()

    def graph(self, unrolled: bool = False) -> Graph:
        """The graph as data: a snapshot of the agents, edges, answer node and outer links, with nested systems
        flattened into it (:func:`~latentgraph.core.subsystem.flatten`). ``unrolled``: the graph a plan runs,
        a nested system of several rounds written out once per inner round; else each appears once."""
        if not self.subsystems:
            return Graph.of(self.agents, self.edges, self.answer, self.links)
        return flatten(self, unrolled)

    def validate(self) -> System:
        """Check the whole graph; raise one :class:`GraphError` listing every problem and its fix."""
        if problems := graph_problems(self.graph(unrolled=True)):
            raise GraphError("the system is invalid:\n  - " + "\n  - ".join(problems))
        return self

    def plan(self, rounds: int | None = None, mode: RunMode = "latent") -> Plan:
        """Validate the graph and compile it into a :class:`~latentgraph.core.plan.Plan` for ``rounds`` rounds
        (default ``system.rounds``) in run mode ``mode`` (see :meth:`run`): the turns of each round, who reads
        what and sends where. ``print(system.plan())`` shows it as a table. A plan is compiled once and reused
        while the graph stays the same (the same agents, prompts, edges, links and answer node)."""
        graph = self.graph(unrolled=True)
        rounds = self.rounds if rounds is None else rounds
        key = (graph.key(), rounds, mode) if isinstance(rounds, int) and isinstance(mode, str) else None
        if key is None or key not in self._plans:
            plan = build_plan(graph, rounds, mode)
            if key is None:
                return plan
            self._plans[key] = plan
            while len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        return self._plans[key]

    def stream(self, questions: str | list[str], *, rounds: int | None = None, mode: RunMode = "latent",
               do_sample: bool = True, temperature: float = 0.6, top_p: float = 0.95, top_k: int | None = None,
               max_new_tokens: int = 256, seed: int | list[int | None] | None = None, return_latents: bool = False,
               stop: Stop | None = None, parallel: bool | None = None) -> Iterator[Event]:
        """Run the system like :meth:`run`, yielding its :mod:`~latentgraph.core.events` as they happen.

        Inputs are checked at once (before the first event); the last event is a
        :class:`~latentgraph.core.events.RunFinished` whose ``output`` is what :meth:`run` returns. Each agent
        that decodes yields a :class:`~latentgraph.core.events.TokensDecoded` per decoding step, as its tokens
        come (agents run at once in threads yield theirs when their batch of turns has finished).
        """
        questions = question_list(questions)
        if stop is not None and not callable(stop):
            raise InputError(f"stop must be a callable on a round's events or a criterion such as "
                             f"latentgraph.core.stopping.ThoughtsConverged(tol=0.05), got {stop!r}")
        sampling = Sampling(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                            max_new_tokens=max_new_tokens)
        step = InferenceStep(sampling, seed=seed, return_latents=return_latents)
        step.check_batch(len(questions))
        plan = self.plan(rounds, mode)
        plan.check_lengths(questions, sampling.max_new_tokens)
        return unroll(plan, questions, step, stop=stop, parallel=check_parallel(parallel))

    def run(self, questions: str | list[str], *, rounds: int | None = None, mode: RunMode = "latent",
            do_sample: bool = True, temperature: float = 0.6, top_p: float = 0.95, top_k: int | None = None,
            max_new_tokens: int = 256, seed: int | list[int | None] | None = None, return_latents: bool = False,
            stop: Stop | None = None, parallel: bool | None = None) -> RunOutput:
        """Run the system on a batch of questions.

        All questions run together as one left-padded batch. ``rounds`` overrides ``system.rounds``.
        ``mode`` picks what runs: ``"latent"``, the graph as built; ``"text"``, the same graph with every
        edge a text edge (the text-communication baseline); ``"single"``, the answer node alone, once, with
        its slots left empty (the single-agent baseline). Decoding samples with the published settings by
        default; ``do_sample=False`` is greedy; ``max_new_tokens`` also bounds each text message. ``seed``
        makes sampling reproducible: an integer from 0 to ``2**64 - 1`` for every question, or a list with one
        integer (or None) per question. Each question samples from a generator of its own seeded with its seed,
        so it gets the same text batched with others as alone. (Earlier versions shared one generator among a
        batch's questions: the same seed now samples other text than it did then.) ``return_latents`` keeps
        every agent's raw hidden states (on CPU) in ``RunOutput.latents``.

        ``stop`` ends the run early: after each round but the last it is called on the round's events (a
        list of :mod:`~latentgraph.core.events`); when it returns True, the answer node speaks in that round,
        from the prompt it read in that round, and the run ends (``RunOutput.stopped_early``). A built-in
        criterion: :class:`latentgraph.core.stopping.ThoughtsConverged`.

        ``parallel`` runs agents of a round that do not depend on each other (mixture's experts, say) at once,
        in threads: ``None`` (default) when their backbones share no device (agents on different GPUs),
        ``True`` also on one device (except turns sharing a backbone, or speaking on one device), ``False``
        one after the other. Results, traces and the order of events are the same either way. This is
        :meth:`stream`, drained.
        """
        events = self.stream(questions, rounds=rounds, mode=mode, do_sample=do_sample, temperature=temperature,
                             top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed,
                             return_latents=return_latents, stop=stop, parallel=parallel)
        (finished,) = deque(events, maxlen=1)  # drained without keeping every round's latents alive
        return finished.output

    def link_modules(self) -> dict[str, nn.Module]:
        """Every link: inner links by agent name, then outer links by edge name (``"planner->critic"``); a nested
        system's by their flattened names (``"team.a"``, ``"planner->team.a"``, ``"team.a->team.b"``)."""
        graph = self.graph()
        return {**{name: agent.inner_link for name, agent in graph.agents.items()}, **dict(graph.links)}

    def __repr__(self) -> str:
        agents = "\n".join(f"    {a.name}: {a.backbone.name_or_path} (hidden {a.hidden_size}, "
                           f"{a.latent_steps} latent steps)" for a in self.agents.values())
        edges = "\n".join(f"    {e.name} [{e.mode}{', feedback' if e.feedback else ''}"
                          f"{f', slot {e.slot!r}' if e.slot else ''}]" for e in self.edges.values())
        nested = "".join(f"\n    {name}: nested system, entry {list(sub.entry)}, agents {list(sub.system.agents)}"
                         for name, sub in self.subsystems.items())
        return f"System(rounds={self.rounds}, answer={self.answer!r})\n  agents:\n{agents}{nested}\n  edges:\n{edges}"

    def num_parameters(self) -> int:
        """Trainable link parameters (inner and outer); backbones are not counted."""
        return sum(p.numel() for p in self.parameters())

    def place_links(self) -> None:
        """Put each inner link on its agent's device and each outer link on its receiver's device."""
        graph = self.graph()
        for agent in graph.agents.values():
            agent.inner_link.to(agent.backbone.device)
        for edge in graph.edges:
            if edge.name in graph.links:
                graph.links[edge.name].to(graph.agents[edge.dst].backbone.device)
