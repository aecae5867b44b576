"""Conditional edges, routed per row (question) of a batch.

Two definitions, tested exactly on two architectures, alone and batched:

1. a batch whose rows take different routes gives, row by row, what each row gives when it runs alone;
2. a row for which an edge is off gives what the same graph without that edge gives (the receiver's prompt with
   that placeholder removed, since an empty slot is the empty string), for latent, text and KV edges.
"""

import json
import re

import pytest
import torch
from systems import QUESTIONS

import latentgraph as lg
from latentgraph.core.conditions import register_condition
from latentgraph.core.config import SystemConfig
from latentgraph.training.data import TrainExample
from latentgraph.training.objectives import unrolled_loss

ARCHS = ["llama", "qwen2"]
DIGITS = {"type": "has_digits"}
NO_DIGITS = {"type": "not", "condition": DIGITS}


@register_condition("has_digits")
def has_digits(state):
    return [any(c.isdigit() for c in q) for q in state.questions]


@register_condition("never")
def never(state):
    return [False] * len(state.questions)


def experts(tiny, arch, *, mode="latent", math_seed=1):
    """router -> math -> judge when the question has digits, router -> prose -> judge otherwise (an agent runs
    for the rows its outgoing edges need, so each expert runs for its own rows)."""
    model, tok = tiny(arch, 64, seed=1)
    math_model, _ = tiny(arch, 64, seed=math_seed)
    make = [lg.Agent("router", model, tokenizer=tok, prompt="Route: {question}", latent_steps=2),
            lg.Agent("math", math_model, tokenizer=tok, prompt="Math {router}: {question}", latent_steps=3),
            lg.Agent("prose", model, tokenizer=tok, prompt="Prose {router}: {question}", latent_steps=2),
            lg.Agent("judge", model, tokenizer=tok, prompt="{math}|{prose}|{question}", latent_steps=2)]
    system = lg.System(make, rounds=1, answer="judge")
    system.connect("router", "math", mode=mode, when=DIGITS).connect("router", "prose", mode=mode, when=NO_DIGITS)
    return system.connect("math", "judge", when=DIGITS).connect("prose", "judge", when=NO_DIGITS)


def share_links(source, target):
    """Give ``target`` the weights of ``source``'s links on the edges and agents they share (links start random)."""
    for name, link in target.links.items():
        link.load_state_dict(source.links[name].state_dict())
    for name, agent in target.agents.items():
        agent.inner_link.load_state_dict(source.agents[name].inner_link.state_dict())
    return target


def ran(out, round_, agent, row):
    """Whether ``agent`` ran for ``row`` in round ``round_``."""
    step = out.trace[round_ - 1].get(agent)
    return step is not None and (step.rows is None or row in step.rows)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["latent", "text"])
def test_rows_that_take_different_routes_give_what_each_gives_alone(tiny, arch, mode):
    system = experts(tiny, arch, mode=mode)
    settings = {"do_sample": False, "max_new_tokens": 4, "return_latents": True}
    batched = system.run(QUESTIONS, **settings)
    assert [ran(batched, 1, "math", i) for i in range(3)] == [True, True, False]
    assert [ran(batched, 1, "prose", i) for i in range(3)] == [False, False, True]
    for i, question in enumerate(QUESTIONS):
        alone = system.run(question, **settings)
        assert batched.texts[i] == alone.texts[0]
        for agent, latents in alone.latents[0].items():
            torch.testing.assert_close(batched.latents[0][agent][i:i + 1], latents, atol=1e-5, rtol=0)
    math = batched.trace[0]["math"]
    assert math.rows == [0, 1] and math.tokens_in[2] is None and math.latent_shape[0] == 2
    assert torch.isnan(batched.latents[0]["math"][2]).all()  # a row the agent did not run for


def off_edge_systems(tiny, arch, mode):
    """helper -> solver always, planner -> solver (``mode``) only for questions with digits; and the reference:
    the same graph without planner, the placeholder removed from solver's prompt."""
    model, tok = tiny(arch, 64, seed=1)
    slot = "" if mode == "kv" else "{planner}"

    def build(with_planner):
        prompt = f"Solve{slot if with_planner else ''}: {{helper}} {{question}}"
        agents = [lg.Agent("helper", model, tokenizer=tok, prompt="Help: {question}", latent_steps=2),
                  lg.Agent("solver", model, tokenizer=tok, prompt=prompt, latent_steps=2)]
        if with_planner:
            agents.insert(0, lg.Agent("planner", model, tokenizer=tok, prompt="Plan: {question}", latent_steps=3))
        system = lg.System(agents, rounds=1, answer="solver").connect("helper", "solver")
        if with_planner:
            system.connect("planner", "solver", mode=mode, when=DIGITS)
        return system

    routed = build(True)
    return routed, share_links(routed, build(False))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["latent", "text", "kv"])
def test_a_row_an_edge_is_off_for_gives_what_the_graph_without_the_edge_gives(tiny, arch, mode):
    routed, reference = off_edge_systems(tiny, arch, mode)
    settings = {"do_sample": False, "max_new_tokens": 8}
    batched, expected = routed.run(QUESTIONS, **settings), reference.run(QUESTIONS[2], **settings)
    alone = routed.run(QUESTIONS[2], **settings)
    assert "planner" not in alone.trace[0]  # no row needed it
    for out, row in ((batched, 2), (alone, 0)):  # "Why?" has no digits: the edge is off for it
        assert out.texts[row] == expected.texts[0]
        assert out.trace[0]["solver"].tokens_in[row] == expected.trace[0]["solver"].tokens_in[0]
    if mode == "kv":
        assert batched.trace[0]["solver"].cache_in > 0 and alone.trace[0]["solver"].cache_in == 0
    with_edge = routed.run(QUESTIONS[0], **settings)  # a row it is on for, as alone
    assert batched.texts[0] == with_edge.texts[0]


def test_an_agent_no_row_needs_does_not_run(tiny):
    system = experts(tiny, "llama", math_seed=7)  # math has a backbone of its own, whose forwards are counted
    calls = []
    hook = system.agents["math"].backbone.decoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = system.run(["Why?", "How so?"], do_sample=False, max_new_tokens=2)
        assert calls == [] and "math" not in out.trace[0] and out.trace[0]["prose"].rows is None
        system.run(["Why?", "What is 2 + 2?"], do_sample=False, max_new_tokens=2)
        assert len(calls) == 3  # one prefill and two latent steps, for the one row routed to it
    finally:
        hook.remove()


def test_a_router_that_speaks_decides_by_what_it_said(tiny):
    model, tok = tiny("llama", 64, seed=2)
    said = lg.Agent("router", model, tokenizer=tok).backbone  # every agent's backbone
    # what the router says, greedily, decides the pattern: a word it says for the first question only
    probe = lg.System([lg.Agent("router", said, prompt="Route: {question}", latent_steps=2)], rounds=1,
                      answer="router").run(QUESTIONS, do_sample=False, max_new_tokens=4)
    words = [set(re.findall(r"\w+", text)) for text in probe.texts]
    pattern = next(iter(sorted(words[0] - words[2])), None)
    if pattern is None:
        pytest.skip("the random router says the same words for every question")
    on = {"type": "said", "agent": "router", "pattern": rf"\b{pattern}\b"}

    def build(branches):
        agents = [lg.Agent("router", said, prompt="Route: {question}", latent_steps=2)]
        agents += [lg.Agent(b, said, prompt=f"{b}: {{router}} {{question}}", latent_steps=2) for b in branches]
        agents.append(lg.Agent("judge", said, prompt="".join(f"{{{b}}}" for b in branches) + "{question}"))
        system = lg.System(agents, rounds=1, answer="judge")
        for b in branches:  # each expert runs, and sends, for the rows routed to it only
            when = on if b == "yes" else {"type": "not", "condition": on}
            system.connect("router", b, when=when).connect(b, "judge", when=when)
        return system

    both = build(["yes", "no"])
    assert "router" in both.plan(1).readers() and both.plan(1).turns[0][0].speaks
    out = both.run(QUESTIONS, do_sample=False, max_new_tokens=4)
    assert out.trace[0]["router"].text == probe.texts
    routes = [re.search(on["pattern"], text, re.IGNORECASE) is not None for text in probe.texts]
    assert routes[0] and not routes[2]
    for i, question in enumerate(QUESTIONS):  # against the graph without the branch the row did not take
        branch = share_links(both, build(["yes"] if routes[i] else ["no"]))
        prompt = both.agents["judge"].prompt.replace("{no}" if routes[i] else "{yes}", "")
        branch.agents["judge"].prompt = prompt
        assert out.texts[i] == branch.run(question, do_sample=False, max_new_tokens=4).texts[0]


def test_a_rounds_condition_is_resolved_in_the_plan(tiny):
    model, tok = tiny("qwen2", 64, seed=1)
    a = lg.Agent("a", model, tokenizer=tok, prompt="A {question}", feedback_prompt="A {b} {question}", latent_steps=2)
    b = lg.Agent("b", model, tokenizer=tok, prompt="B {a} {question}", latent_steps=3)
    system = lg.System([a, b], rounds=3, answer="b")
    system.connect("a", "b", when={"type": "rounds", "rounds": [1, "last"]}).connect("b", "a", feedback=True)
    plan = system.plan(3)
    assert [[t.name for t in turns] for turns in plan.turns] == [["a", "b"], ["b"], ["a", "b"]]
    assert "a->b (latent, now, when round 1 or last round)" in plan.table()
    assert [e.name for e in plan.turns[1][0].incoming] == []
    out = system.run(QUESTIONS[:2], do_sample=False, max_new_tokens=2)
    assert [out.trace[r]["b"].latents_in for r in range(3)] == [2, 0, 2]
    assert "a" not in out.trace[1] and out.trace[2]["a"].prompt == "feedback_prompt"


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_sampling_is_batch_invariant_under_routing(tiny, arch):
    system = experts(tiny, arch, mode="text")
    seeds = [11, 12, 13]
    batched = system.run(QUESTIONS, do_sample=True, temperature=1.5, max_new_tokens=5, seed=seeds)
    for i, question in enumerate(QUESTIONS):
        alone = system.run(question, do_sample=True, temperature=1.5, max_new_tokens=5, seed=seeds[i])
        assert batched.texts[i] == alone.texts[0]
        assert batched.trace[0]["router"].text[i] == alone.trace[0]["router"].text[0]


def test_training_through_a_conditional_edge_reaches_the_links_it_routes_to(tiny):
    system = experts(tiny, "llama")
    for questions, reached, untouched in ((["What is 2 + 3?"], "math", "prose"), (["Why?"], "prose", "math")):
        system.zero_grad()
        batch = [TrainExample(question=q, answer="five") for q in questions]
        unrolled_loss(system, batch, regime="rollout").loss.backward()
        inner = {name: list(system.agents[name].inner_link.parameters()) for name in (reached, untouched)}
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in inner[reached])
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in inner[untouched])
        assert any(p.grad.abs().sum() > 0 for p in system.links[f"router->{reached}"].parameters())
    system.zero_grad()  # a mixed batch: each expert's link learns from its own rows
    unrolled_loss(system, [TrainExample(question=q, answer="a") for q in QUESTIONS], regime="rollout").loss.backward()
    assert all(p.grad.abs().sum() > 0 for e in ("math", "prose") for p in system.agents[e].inner_link.parameters())


def test_a_condition_round_trips_through_the_config_and_files(tiny, tmp_path):
    system = experts(tiny, "llama")
    system.disconnect("math", "judge").connect("math", "judge")
    config = system.to_config()
    stored = json.loads(config.to_json())
    assert stored["edges"][0]["when"] == DIGITS and stored["edges"][1]["when"] == NO_DIGITS
    assert "when" not in stored["edges"][-1]  # written only when set (math -> judge, connected last)
    model, tok = tiny("llama", 64, seed=1)
    again = lg.System.from_config(config, backbones={n: (model, tok) for n in system.agents})
    assert again.edges["router->prose"].when == system.edges["router->prose"].when
    stored["edges"][0]["when"] = {"type": "rounds", "rounds": []}
    path = tmp_path / "system.json"
    path.write_text(json.dumps(stored))
    with pytest.raises(lg.CheckpointError, match=r"system\.json.*edges\.0\.when"):
        SystemConfig.from_file(path)


def test_connect_reads_a_condition_and_names_the_edge_in_its_errors(tiny):
    system = experts(tiny, "llama")
    system.disconnect("router", "math").connect("router", "math", when="has_digits")
    assert system.edges["router->math"].when == system.edges["router->prose"].when.condition
    with pytest.raises(lg.GraphError, match=r"edge 'router->math' when: unknown condition type 'nope'"):
        system.disconnect("router", "math").connect("router", "math", when={"type": "nope"})


def test_render_draws_a_conditional_edge_dotted_with_its_condition(tiny):
    source = lg.render(experts(tiny, "llama")).source
    line = next(line for line in source.splitlines() if "router -> prose" in line)
    assert "when not (has_digits)" in line and "style=dotted" in line


def test_validation_names_an_unknown_agent_and_one_that_never_speaks(tiny):
    system = experts(tiny, "llama")
    system.disconnect("router", "math").connect("router", "math", when={"type": "said", "agent": "ghost",
                                                                        "pattern": "x"})
    with pytest.raises(lg.GraphError, match=r"edge 'router->math': its condition \(ghost says /x/\) reads agent "
                                            r"'ghost', which is not an agent"):
        system.validate()
    model, tok = tiny("llama", 64, seed=1)
    system.add(lg.Agent("mute", model, tokenizer=tok))
    system.disconnect("router", "math").connect("router", "math", when={"type": "said", "agent": "mute",
                                                                        "pattern": "x"})
    with pytest.raises(lg.GraphError, match=r"reads what agent 'mute' says, but that agent never runs"):
        system.validate()


def test_a_stop_criterion_compares_only_the_rows_a_routed_agent_thought_for(tiny):
    from latentgraph.core.stopping import ThoughtsConverged

    system = experts(tiny, "llama")
    system.agents["math"].feedback_prompt = "Math {router} {again}: {question}"
    system.connect("math", "math", slot="again", feedback=True, when=DIGITS)  # math thinks again where it ran
    system.rounds = 3
    never = ThoughtsConverged(tol=0.0, agent="math")
    out = system.run(QUESTIONS, do_sample=False, max_new_tokens=2, stop=never)
    assert not out.stopped_early and len(never.changes) == 1  # called after rounds 1 and 2, compared after 2
    (change,) = never.changes  # the question without digits never reaches math: rows 0 and 1 only
    assert len(change) == 2 and change.isfinite().all() and (change > 0).all()
    always = ThoughtsConverged(tol=float("inf"), agent="math")
    assert system.run(QUESTIONS, do_sample=False, max_new_tokens=2, stop=always).rounds_run == 2


def test_a_routed_agents_events_reach_only_the_rows_it_ran_for(tiny):
    from latentgraph.core.events import AgentThought
    from latentgraph.serve.records import event_record

    system = experts(tiny, "qwen2")
    events = list(system.stream(QUESTIONS, do_sample=False, max_new_tokens=2))
    thought = next(e for e in events if isinstance(e, AgentThought) and e.agent == "math")
    assert thought.rows == [0, 1]
    for row in range(3):
        records = [event_record(e, row) for e in events if getattr(e, "agent", None) == "math"]
        kinds = {r["type"] for r in records if r is not None}
        assert kinds == (set() if row == 2 else {"AgentStarted", "AgentThought", "AgentFinished"})
    norm = thought.thoughts.hidden[1].float().norm(dim=-1).mean().item()
    assert event_record(thought, 1)["norm"] == pytest.approx(norm)
