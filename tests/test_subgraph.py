"""Subgraphs: a System used as a node of another system runs exactly as its agents written out flat."""

import dataclasses

import pytest
import torch
from systems import QUESTIONS

import latentgraph as lg


def team_and_outer(tiny, arch="llama"):
    """planner -> team -> solver, with solver -> team feedback; the team is a -> c (latent), b -> c (text),
    entries a and b, answer c. Returns (outer, agents by name)."""
    def agent(name, size, seed, prompt, **kw):
        model, tok = tiny(arch, size, seed=seed)
        return lg.Agent(name, model, tokenizer=tok, prompt=prompt, latent_steps=2 + seed % 2, **kw)

    entry = "Plan: {planner}\nWork on: {question}"
    again = "Plan: {planner}\nFeedback: {feedback}\nWork on: {question}"
    agents = {
        "planner": agent("planner", 64, 0, "Plan how to solve: {question}"),
        "solver": agent("solver", 32, 1, "Team: {team}\n{question}\nAnswer in \\boxed{{}}."),
        "a": agent("a", 48, 2, entry, feedback_prompt=again),
        "b": agent("b", 64, 3, entry, feedback_prompt=again),
        "c": agent("c", 32, 4, "A: {a}\nB: {b}\nCombine for: {question}"),
    }
    team = lg.System([agents["a"], agents["b"], agents["c"]], answer="c")
    team.connect("a", "c").connect("b", "c", mode="text")
    outer = lg.System([agents["planner"], team.node("team", entry=["a", "b"]), agents["solver"]], rounds=2,
                      answer="solver")
    outer.connect("planner", "team").connect("team", "solver")
    outer.connect("solver", "team", slot="feedback", feedback=True)
    return outer, agents


def written_out_flat(outer, agents):
    """The same agents and link modules, connected flat (agents in the order the nested graph lists them)."""
    flat = lg.System([agents[n] for n in ("planner", "solver", "a", "b", "c")], rounds=2, answer="solver")
    flat.connect("a", "c").connect("b", "c", mode="text")
    flat.connect("planner", "a", slot="planner").connect("planner", "b", slot="planner")
    flat.connect("c", "solver", slot="team")
    flat.connect("solver", "a", slot="feedback", feedback=True).connect("solver", "b", slot="feedback", feedback=True)
    team = outer.subsystems["team"].system
    flat.links["a->c"] = team.links["a->c"]
    for entry in ("a", "b"):
        flat.links[f"planner->{entry}"] = outer.links["planner->team"][entry]
        flat.links[f"solver->{entry}"] = outer.links["solver->team"][entry]
    flat.links["c->solver"] = outer.links["team->solver"]
    return flat


NESTED = {"planner": "planner", "solver": "solver", "team.a": "a", "team.b": "b", "team.c": "c"}


def assert_same_run(nested, flat):
    """Texts, every agent's latents and the trace's numbers are equal, agent by agent."""
    assert nested.texts == flat.texts
    assert len(nested.trace) == len(flat.trace)
    for steps, flat_steps in zip(nested.trace, flat.trace):
        assert [NESTED[name] for name in steps] == list(flat_steps)
        for name, step in steps.items():
            mine = dataclasses.asdict(step) | {"agent": None, "seconds": None}
            assert mine == dataclasses.asdict(flat_steps[NESTED[name]]) | {"agent": None, "seconds": None}, name
    for latents, flat_latents in zip(nested.latents, flat.latents):
        assert [NESTED[name] for name in latents] == list(flat_latents)
        for name, hidden in latents.items():
            assert torch.equal(hidden, flat_latents[NESTED[name]]), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("questions", [QUESTIONS[:1], QUESTIONS], ids=["alone", "batched"])
def test_a_nested_system_runs_as_its_agents_written_out_flat(tiny, arch, questions):
    outer, agents = team_and_outer(tiny, arch)
    flat = written_out_flat(outer, agents)
    settings = {"do_sample": False, "max_new_tokens": 4, "return_latents": True}
    nested = outer.run(questions, **settings)
    assert list(nested.trace[1]) == ["planner", "team.a", "team.b", "team.c", "solver"]
    assert nested.trace[1]["team.a"].prompt == "feedback_prompt"  # the outer feedback reached the entries
    assert_same_run(nested, flat.run(questions, **settings))


def test_the_graph_is_flattened_under_prefixed_names(tiny):
    outer, _ = team_and_outer(tiny)
    graph = outer.graph()
    assert list(graph.agents) == ["planner", "solver", "team.a", "team.b", "team.c"]
    assert [e.name for e in graph.edges] == ["team.a->team.c", "team.b->team.c", "planner->team.a",
                                             "planner->team.b", "team.c->solver", "solver->team.a",
                                             "solver->team.b"]
    assert graph.answer == "solver"
    assert graph.links["planner->team.b"] is outer.links["planner->team"]["b"]
    # each link once: the inner system's own, and one per entry on the edge into the team
    team = outer.subsystems["team"].system
    expected = {id(p) for m in [*outer.link_modules().values()] for p in m.parameters()}
    assert {id(p) for p in outer.parameters()} == expected
    assert len(list(outer.parameters())) == len(expected)
    assert {id(p) for p in team.parameters()} <= expected
