"""Subgraphs: a System used as a node of another system runs exactly as its agents written out flat."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from systems import QUESTIONS

import latentgraph as lg
from latentgraph.core.config import SystemConfig
from latentgraph.evaluation.datasets import Example
from latentgraph.training.data import TrainExample


def team_and_outer(tiny, arch="llama", inner="text"):
    """planner -> team -> solver, with solver -> team feedback; the team is a -> c (latent), b -> c (``inner``),
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
    team.connect("a", "c").connect("b", "c", mode=inner)
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


def test_render_draws_a_nested_system_as_a_cluster(tiny):
    outer, _ = team_and_outer(tiny)
    source = lg.render(outer, sizes=False).source
    cluster = source[source.index("subgraph cluster_team {"):]
    cluster = cluster[:cluster.index("}")]
    assert 'label=team' in cluster
    for inside in ('"team.a" [', '"team.b" [', '"team.c" [', '"team.a" -> "team.c"', '"team.b" -> "team.c"'):
        assert inside in cluster, inside
    outside = source.replace(cluster, "")
    for crossing in ('planner -> "team.a"', 'planner -> "team.b"', '"team.c" -> solver', 'solver -> "team.a"'):
        assert crossing in outside and crossing not in cluster, crossing


def test_the_config_nests_and_round_trips(tiny, tmp_path):
    outer, _ = team_and_outer(tiny)
    config = outer.to_config()
    assert [a.name for a in config.agents] == ["planner", "solver"]
    (sub,) = config.subsystems
    assert (sub.name, sub.entry, sub.rounds) == ("team", ["a", "b"], 1)
    assert [a.name for a in sub.system.agents] == ["a", "b", "c"] and sub.system.answer == "c"
    assert [(e.src, e.dst) for e in config.edges] == [("planner", "team"), ("team", "solver"), ("solver", "team")]
    assert SystemConfig.model_validate_json(config.to_json()) == config
    assert "subsystems" not in json.loads(outer.subsystems["team"].system.to_config().to_json())  # flat: as before
    path = tmp_path / "nested.json"
    path.write_text(config.to_json())
    backbones = {"planner": outer.agents["planner"].backbone, "solver": outer.agents["solver"].backbone,
                 **{f"team.{n}": a.backbone for n, a in outer.subsystems["team"].system.agents.items()}}
    rebuilt = lg.System.from_config(path, backbones=backbones)
    assert rebuilt.to_config().model_dump(exclude={"latentgraph_version"}) == \
        config.model_dump(exclude={"latentgraph_version"})


def test_save_and_load_give_the_same_results(tiny, tmp_path):
    outer, _ = team_and_outer(tiny)
    for p in outer.parameters():  # links away from their initialisation, so loading them is visible
        p.data += 0.05 * torch.randn_like(p)
    outer.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "links.safetensors"))
    for owner in ("team.a", "team.c", "planner->team.b", "team.a->team.c", "team.c->solver", "solver->team.a"):
        assert any(key.startswith(f"{owner}.") for key in keys), owner  # the flattened names, unambiguous
    backbones = {name: agent.backbone for name, agent in outer.graph().agents.items()}
    loaded = lg.System.from_pretrained(tmp_path, backbones=backbones)
    assert list(loaded.graph().agents) == list(outer.graph().agents)
    settings = {"do_sample": False, "max_new_tokens": 4, "return_latents": True}
    mine, theirs = outer.run(QUESTIONS[:2], **settings), loaded.run(QUESTIONS[:2], **settings)
    assert mine.texts == theirs.texts
    for latents, loaded_latents in zip(mine.latents, theirs.latents):
        assert all(torch.equal(latents[n], loaded_latents[n]) for n in latents)


def test_training_moves_inner_and_outer_links(tiny):
    outer, _ = team_and_outer(tiny, inner="latent")
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in outer.link_modules().items()}
    examples = [TrainExample("What is 17 * 23?", "The answer is 391."),
                TrainExample("What is 12 + 30?", "The answer is 42.")]
    log = lg.train(outer, examples, lg.TrainConfig(stage="joint", steps=2, batch_size=2, lr=1e-2, warmup=0,
                                                   rounds=2), progress=False)
    assert {"team.a", "team.a->team.c", "planner->team.a", "planner->team.b", "team.c->solver"} <= set(log[-1]["links"])
    moved = {name for name, m in outer.link_modules().items()
             if any(not torch.equal(p, q) for p, q in zip(m.parameters(), before[name]))}
    # every link upstream of the answer's loss moves; the solver's inner link sends nothing in the last round
    assert {"planner->team.a", "planner->team.b", "team.a->team.c", "team.b->team.c", "team.c->solver",
            "solver->team.a", "team.a", "team.b", "team.c", "planner"} <= moved


def test_evaluate_runs_a_nested_system(tiny):
    outer, _ = team_and_outer(tiny)
    examples = [Example(f"q{i}", f"What is {i} + 1?", str(i + 1), "math") for i in range(2)]
    report = lg.evaluate(outer, examples, methods=["text", "latent"], rounds=[2], max_new_tokens=4, progress=False)
    for mode in ("text", "latent"):
        rows = {row["id"]: row for row in report.rows if row["method"] == mode}
        for example in examples:
            run = outer.run([example.question], rounds=2, mode=mode, do_sample=False, max_new_tokens=4)
            assert rows[example.id]["prediction"] == run.texts[0], (mode, example.id)


def test_an_entry_must_be_an_agent_of_the_inner_system(tiny):
    _, agents = team_and_outer(tiny)
    team = lg.System([agents["a"], agents["c"]], answer="c").connect("a", "c")
    with pytest.raises(lg.GraphError, match=r"nested system 'team': entry 'b' is not an agent of it; its agents "
                                            r"are \['a', 'c'\]"):
        team.node("team", entry=["a", "b"])


def test_an_in_edge_slot_every_entry_prompt_lacks_is_named_by_its_full_name(tiny):
    outer, _ = team_and_outer(tiny)
    outer.disconnect("planner", "team").connect("planner", "team", slot="draft")
    with pytest.raises(lg.GraphError) as error:
        outer.validate()
    message = str(error.value)
    for entry in ("team.a", "team.b"):
        assert f"edge 'planner->{entry}' delivers slot 'draft' but agent '{entry}' prompt has no {{draft}}" in message
        assert f"agent '{entry}' prompt has placeholder {{planner}} but no edge delivers slot 'planner'" in message


def test_a_name_clash_is_refused(tiny):
    outer, agents = team_and_outer(tiny)
    team = outer.subsystems["team"].system
    clash = lg.Agent("team", agents["a"].model, tokenizer=agents["a"].tokenizer)
    with pytest.raises(lg.GraphError, match="duplicate agent name 'team'; give each agent and nested system its "
                                            "own name"):
        lg.System([clash, team.node("team", entry=["a"])])


def test_inner_feedback_needs_more_inner_rounds_and_conditions_need_one(tiny):
    outer, agents = team_and_outer(tiny)
    team = outer.subsystems["team"].system
    team.connect("c", "a", slot="feedback", feedback=True)
    with pytest.raises(lg.GraphError, match=r"nested system 'team' has feedback edges \(c->a\), but it runs one "
                                            r"round .* give it more inner rounds \(node\(\.\.\., rounds=2\)\)"):
        outer.validate()
    team.disconnect("c", "a").disconnect("b", "c")
    team.connect("b", "c", mode="text", when={"type": "rounds", "rounds": [1]})
    with pytest.raises(lg.GraphError, match=r"nested system 'again' runs 2 inner rounds and has conditional edges "
                                            r"\(b->c\).*pass rounds=1"):
        team.node("again", entry=["a"], rounds=2)
    with pytest.raises(lg.GraphError, match="nested system 'many': rounds: .*use fewer rounds"):
        team.node("many", entry=["a"], rounds=10**9)


def test_a_nested_system_can_be_the_answer_node(tiny):
    _, agents = team_and_outer(tiny)
    team = lg.System([agents["a"], agents["b"], agents["c"]], answer="c")
    team.connect("a", "c").connect("b", "c", mode="text")
    outer = lg.System([agents["planner"], team.node("team", entry=["a", "b"])], rounds=1, answer="team")
    outer.connect("planner", "team")
    out = outer.run(QUESTIONS[:2], do_sample=False, max_new_tokens=4)
    assert outer.plan().answer == "team.c"
    assert out.texts == out.trace[0]["team.c"].text and out.trace[0]["team.c"].tokens_out is not None


def looping_team(tiny, arch="llama", inner="text"):
    """a -> c (latent), b -> c (``inner``), c -> a feedback (latent); answer c; agents by name."""
    def agent(name, size, seed, prompt, **kw):
        model, tok = tiny(arch, size, seed=seed)
        return lg.Agent(name, model, tokenizer=tok, prompt=prompt, latent_steps=2 + seed % 2, **kw)

    agents = {
        "a": agent("a", 48, 2, "Work on: {question}", feedback_prompt="Feedback: {feedback}\nWork on: {question}"),
        "b": agent("b", 64, 3, "Check: {question}"),
        "c": agent("c", 32, 4, "A: {a}\nB: {b}\nCombine for: {question}"),
        "solver": agent("solver", 32, 1, "Team: {team}\n{question}\nAnswer in \\boxed{{}}."),
    }
    team = lg.System([agents["a"], agents["b"], agents["c"]], rounds=2, answer="c")
    team.connect("a", "c").connect("b", "c", mode=inner).connect("c", "a", slot="feedback", feedback=True)
    return team, agents


def by_inner_round(output, rounds):
    """A one-round nested run's trace and latents, cut into its inner rounds with the inner names
    (``team#1.a`` -> round 1's ``a``, ``team.a`` -> the last round's); other agents in the last."""
    def inner_round(name):
        prefix, _, agent = name.partition(".")
        return (int(prefix.partition("#")[2]) if "#" in prefix else rounds, agent) if agent else (rounds, name)

    trace, latents = [{} for _ in range(rounds)], [{} for _ in range(rounds)]
    for name, step in output.trace[0].items():
        j, agent = inner_round(name)
        trace[j - 1][agent] = step
        if output.latents is not None and name in output.latents[0]:
            latents[j - 1][agent] = output.latents[0][name]
    return trace, latents


def assert_same_rounds(trace, latents, reference):
    """Each inner round's records (but their round and agent) and latents equal the reference run's rounds."""
    assert len(trace) == len(reference.trace)
    for steps, ref_steps, mine, ref in zip(trace, reference.trace, latents, reference.latents):
        assert list(steps) == list(ref_steps)
        for name, step in steps.items():
            ignore = {"round": None, "agent": None, "seconds": None}
            assert dataclasses.asdict(step) | ignore == dataclasses.asdict(ref_steps[name]) | ignore, name
        assert list(mine) == list(ref)
        for name, hidden in mine.items():
            assert torch.equal(hidden, ref[name]), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("questions", [QUESTIONS[:1], QUESTIONS], ids=["alone", "batched"])
def test_two_inner_rounds_run_as_the_inner_system_on_its_own_for_two_rounds(tiny, arch, questions):
    team, _ = looping_team(tiny, arch)
    outer = lg.System([team.node("team", entry=["a"], rounds=2)], rounds=1, answer="team")
    settings = {"do_sample": False, "max_new_tokens": 4, "return_latents": True}
    nested, alone = outer.run(questions, **settings), team.run(questions, rounds=2, **settings)
    assert list(nested.trace[0]) == ["team#1.a", "team#1.b", "team#1.c", "team.a", "team.b", "team.c"]
    assert nested.trace[0]["team.a"].prompt == "feedback_prompt"  # c's feedback from inner round 1
    assert nested.texts == alone.texts
    assert_same_rounds(*by_inner_round(nested, 2), alone)


def test_the_outer_receiver_gets_what_the_answer_node_sends_in_the_last_inner_round(tiny):
    team, agents = looping_team(tiny)
    outer = lg.System([team.node("team", entry=["a"], rounds=2), agents["solver"]], rounds=1, answer="solver")
    outer.connect("team", "solver")
    # the reference: the same agents and links in one system of two rounds; the solver runs in the second
    flat = lg.System([agents[n] for n in ("a", "b", "c", "solver")], rounds=2, answer="solver")
    flat.connect("a", "c").connect("b", "c", mode="text").connect("c", "a", slot="feedback", feedback=True)
    flat.connect("c", "solver", slot="team")
    flat.links["a->c"], flat.links["c->a"] = team.links["a->c"], team.links["c->a"]
    flat.links["c->solver"] = outer.links["team->solver"]
    settings = {"do_sample": False, "max_new_tokens": 4, "return_latents": True}
    nested, reference = outer.run(QUESTIONS[:2], **settings), flat.run(QUESTIONS[:2], **settings)
    assert nested.texts == reference.texts
    assert_same_rounds(*by_inner_round(nested, 2), reference)
    assert outer.plan().turns[0][-1].incoming[0].name == "team.c->solver"


def test_three_inner_rounds_run_in_order_and_start_fresh_each_outer_round(tiny):
    team, agents = looping_team(tiny)
    agents["solver"].prompt = "Plan how to solve: {question}"
    agents["a"].prompt = "Plan: {solver}\nWork on: {question}"
    agents["a"].feedback_prompt = "Plan: {solver}\nFeedback: {feedback}\nWork on: {question}"
    outer = lg.System([agents["solver"], team.node("team", entry=["a"], rounds=3)], rounds=2, answer="team")
    outer.connect("solver", "team")  # the outer in-edge reaches a in every inner round
    plan = outer.plan()
    expected = ["solver", *[f"{prefix}.{agent}" for prefix in ("team#1", "team#2", "team") for agent in "abc"]]
    expected = [expected[:-1], expected]  # the team's answer node speaks in the last outer round only
    for r in (1, 2):
        turns = {turn.name: turn for turn in plan.turns[r - 1]}
        assert list(turns) == expected[r - 1]
        # fresh in each outer round: the first inner round reads prompt, the later ones the feedback of the one before
        assert [turns[f"{p}.a"].prompt_kind for p in ("team#1", "team#2", "team")] == \
            ["prompt", "feedback_prompt", "feedback_prompt"]
        assert [e.name for e in turns["team#2.a"].incoming] == ["team#1.c->team#2.a", "solver->team#2.a"]
        assert [e.name for e in turns["team#1.a"].incoming] == ["solver->team#1.a"]
    out = outer.run(QUESTIONS[:1], do_sample=False, max_new_tokens=4)
    assert [list(steps) for steps in out.trace] == expected
    assert out.trace[1]["team#1.a"].prompt == "prompt" and out.trace[1]["team#2.a"].prompt == "feedback_prompt"
    assert out.texts == out.trace[1]["team.c"].text
    # the same Agent objects and links in every inner round
    graph = outer.graph(unrolled=True)
    assert graph.agents["team#1.a"] is graph.agents["team.a"] is team.agents["a"]
    assert graph.links["team#1.c->team#2.a"] is graph.links["team#2.c->team.a"] is team.links["c->a"]
    assert graph.links["solver->team#1.a"] is graph.links["solver->team.a"] is outer.links["solver->team"]["a"]


def inner_rounds_outer(tiny, inner="text"):
    team, agents = looping_team(tiny, inner=inner)
    outer = lg.System([team.node("team", entry=["a"], rounds=2), agents["solver"]], rounds=1, answer="solver")
    return outer.connect("team", "solver")


def test_inner_rounds_round_trip_through_config_and_checkpoint(tiny, tmp_path):
    outer = inner_rounds_outer(tiny)
    config = outer.to_config()
    assert config.subsystems[0].rounds == 2
    assert SystemConfig.model_validate_json(config.to_json()) == config
    for p in outer.parameters():
        p.data += 0.05 * torch.randn_like(p)
    assert set(outer.link_modules()) == {"solver", "team.a", "team.b", "team.c", "team.a->team.c",
                                         "team.c->team.a", "team.c->solver"}  # each link once (b->c is text)
    outer.save_pretrained(tmp_path)
    backbones = {name: agent.backbone for name, agent in outer.graph().agents.items()}
    loaded = lg.System.from_pretrained(tmp_path, backbones=backbones)
    assert loaded.subsystems["team"].rounds == 2
    settings = {"do_sample": False, "max_new_tokens": 4, "return_latents": True}
    mine, theirs = outer.run(QUESTIONS[:2], **settings), loaded.run(QUESTIONS[:2], **settings)
    assert mine.texts == theirs.texts
    assert all(torch.equal(mine.latents[0][n], theirs.latents[0][n]) for n in mine.latents[0])


def test_render_draws_inner_rounds_once(tiny):
    source = lg.render(inner_rounds_outer(tiny), sizes=False).source
    assert "#" not in source  # no unrolled copy
    cluster = source[source.index("subgraph cluster_team {"):]
    cluster = cluster[:cluster.index("}")]
    assert 'label="team (2 rounds)"' in cluster
    assert '"team.c" -> "team.a"' in cluster and "style=dashed" in cluster  # the inner feedback edge


def test_training_moves_the_links_shared_by_the_inner_rounds(tiny):
    outer = inner_rounds_outer(tiny, inner="latent")
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in outer.link_modules().items()}
    examples = [TrainExample("What is 17 * 23?", "The answer is 391."),
                TrainExample("What is 12 + 30?", "The answer is 42.")]
    log = lg.train(outer, examples, lg.TrainConfig(stage="joint", steps=2, batch_size=2, lr=1e-2, warmup=0,
                                                   rounds=1), progress=False)
    assert set(log[-1]["links"]) == set(outer.link_modules())
    moved = {name for name, m in outer.link_modules().items()
             if any(not torch.equal(p, q) for p, q in zip(m.parameters(), before[name]))}
    # the feedback link reaches the answer only through the second inner round; the solver only speaks
    assert moved == set(outer.link_modules()) - {"solver"}


def test_an_inner_round_leaves_out_who_sends_to_no_agent_that_runs_in_it(tiny):
    team, agents = looping_team(tiny)
    team.disconnect("c", "a")  # no feedback: the first inner round's answer node sends nothing, nor then do a, b
    agents["a"].feedback_prompt = None
    outer = lg.System([team.node("team", entry=["a"], rounds=2)], rounds=1, answer="team")
    assert list(outer.graph(unrolled=True).agents) == ["team.a", "team.b", "team.c"]


def test_ray_workers_rebuild_a_nested_system_with_its_inner_agents_placed_and_equipped(tiny, tmp_path):
    from latentgraph.evaluation.workers import rebuild, shipped
    from latentgraph.tools.base import Tool

    class Echo(Tool):
        name = tag = "echo"

        def run(self, text):
            return text

    model, tok = tiny("llama", 64, seed=3)
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    source = str(tmp_path / "llama")
    team = lg.System([lg.Agent("a", source, "A {outer} {question}", latent_steps=2),
                      lg.Agent("b", source, "B {a} {question}", latent_steps=2)], rounds=1, answer="b")
    team.connect("a", "b")
    outer = lg.System([lg.Agent("outer", source, "O {question}", latent_steps=2),
                       team.node("team", entry=["a"])], rounds=1, answer="team")
    outer.connect("outer", "team")
    checkpoint, dtypes = shipped(outer, "cpu")
    assert set(dtypes) == {"outer", "team.a", "team.b"}  # the nested agents' dtypes travel too
    replica = rebuild(checkpoint, dtypes, {"team.b": [Echo()]}, {"device": "cpu"})
    assert [t.tag for t in replica.graph().agents["team.b"].tools] == ["echo"]
    assert all(agent.backbone.loaded for agent in replica.graph().agents.values())
    settings = {"do_sample": False, "max_new_tokens": 3}
    assert replica.run(QUESTIONS[:2], **settings).texts == outer.run(QUESTIONS[:2], **settings).texts
