"""Validation of a system's graph: every problem found at once, each naming the agent or edge and the fix."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from ..errors import GraphError
from .links import check_link

if TYPE_CHECKING:
    from .agent import Agent
    from .edges import Edge
    from .graph import Graph


def graph_problems(graph: Graph) -> list[str]:
    """Every problem of ``graph``, as sentences that say how to fix it."""
    problems = []
    if graph.answer is None:
        problems.append("no answer node: pass answer='<agent>' to System(...) or set system.answer")
    elif graph.answer not in graph.agents:
        problems.append(f"answer node '{graph.answer}' is not an agent; agents are {list(graph.agents)}")
    # an agent a nested system runs in several inner rounds reads feedback under one of its names only
    fed_back = {id(graph.agents[e.dst]) for e in graph.edges if e.reads_as_feedback}
    for name, agent in graph.agents.items():
        problems += _agent_problems(graph, name, agent, id(agent) in fed_back)
    for edge in graph.edges:
        sender, receiver = graph.agents[edge.src], graph.agents[edge.dst]
        if edge.kind.carries_link:
            try:
                check_link(graph.links[edge.name], role="outer", in_dim=sender.hidden_size,
                           out_dim=receiver.hidden_size, where=f"edge '{edge.name}'")
            except GraphError as e:
                problems.append(str(e))
        problems += edge.kind.problems(edge, sender, receiver)
        if edge.when is not None:
            problems += _condition_problems(graph, edge)
    return problems


def _condition_problems(graph: Graph, edge: Edge) -> list[str]:
    """An agent a condition reads must exist and speak: it has a turn (every turn of such an agent speaks).
    One that runs after the edge's sender in a round is read as it spoke in the round before."""
    problems = []
    for name in sorted(edge.when.reads()):
        if name not in graph.agents:
            problems.append(f"edge '{edge.name}': its condition ({edge.when.describe()}) reads agent '{name}', which "
                            f"is not an agent of the system ({', '.join(graph.agents)}); name one of them")
        elif not graph.out_of(name) and name != graph.answer:
            problems.append(f"edge '{edge.name}': its condition ({edge.when.describe()}) reads what agent '{name}' "
                            "says, but that agent never runs (it has no outgoing edge and is not the answer node); "
                            f"connect '{name}' to an agent that runs, or read another agent")
    return problems


def _agent_problems(graph: Graph, name: str, agent: Agent, fed_back: bool) -> list[str]:
    problems = []
    try:
        check_link(agent.inner_link, role="inner", in_dim=agent.hidden_size, out_dim=agent.hidden_size,
                   where=f"agent '{name}' inner link")
    except GraphError as e:
        problems.append(str(e))
    incoming, outgoing = graph.into(name), graph.out_of(name)
    if not incoming and not outgoing and name != graph.answer and len(graph.agents) > 1:
        problems.append(f"agent '{name}' is not connected; connect it or remove it")
    if incoming and not outgoing and name != graph.answer:
        problems.append(f"agent '{name}' receives messages but never runs: it has no outgoing edge and "
                        "is not the answer node")
    incoming = [e for e in incoming if e.kind.fills_slot]  # the others fill no placeholder
    by_slot: dict[str, list[str]] = {}
    for e in incoming:
        by_slot.setdefault(e.slot, []).append(e.name)
    for slot, names in by_slot.items():
        if len(names) > 1:
            problems.append(f"agent '{name}' receives {len(names)} edges into slot '{slot}' ({', '.join(names)}); "
                            "give each its own slot= and placeholder")
    forward = {e.slot: e for e in incoming if not e.reads_as_feedback}
    feedback = {e.slot: e for e in incoming if e.reads_as_feedback}
    problems += _slot_problems(name, "prompt", agent.template(feedback=False).slots, forward, feedback)
    if feedback and agent.feedback_prompt is None:
        names = ", ".join(e.name for e in feedback.values())
        problems.append(f"agent '{name}' receives feedback ({names}) but has no feedback_prompt; "
                        "pass Agent(feedback_prompt=...) with the feedback slots")
    elif feedback:
        problems += _slot_problems(name, "feedback_prompt", agent.template(feedback=True).slots,
                                   {**forward, **feedback}, {})
    elif agent.feedback_prompt is not None and not fed_back:
        warnings.warn(f"agent '{name}' has a feedback_prompt but no feedback edge; it is never used",
                      stacklevel=4)
    return problems


def _slot_problems(agent: str, field: str, placeholders: list[str], delivered: dict, later: dict) -> list[str]:
    """Compare a prompt's placeholders with the slots its edges deliver."""
    problems = []
    for slot in placeholders:
        if slot in later:
            problems.append(f"agent '{agent}' {field} has {{{slot}}}, but edge '{later[slot].name}' is feedback "
                            "and delivers only from round 2; move {" + slot + "} to feedback_prompt")
        elif slot not in delivered:
            problems.append(f"agent '{agent}' {field} has placeholder {{{slot}}} but no edge delivers slot "
                            f"'{slot}'; connect an agent with slot='{slot}', or write {{{{{slot}}}}} for literal "
                            "braces")
    for slot, edge in delivered.items():
        if slot not in placeholders:
            problems.append(f"edge '{edge.name}' delivers slot '{slot}' but agent '{agent}' {field} has no "
                            f"{{{slot}}}; add {{{slot}}} where the message should go")
    return problems
