"""Agents in parallel: independent turns of a round run at once, in threads, and the run is the one that goes
one turn after the other: the same texts, latents, trace, stop and events in the same order."""

import dataclasses
import threading

import pytest
import torch

import latentgraph as lg
from latentgraph.core import engine
from latentgraph.core.engine import unroll
from latentgraph.core.events import AgentFinished, AgentStarted, RoundEnded, RunFinished
from latentgraph.core.parallel import batches
from latentgraph.core.stopping import ThoughtsConverged
from latentgraph.training.data import TrainExample
from latentgraph.training.objectives import TrainingStep

QUESTIONS = ["What is 17 * 23?", "Natalia sold clips to 48 of her friends in April. How many in May?"]


def mixture(tiny):
    """Three experts on three backbones -> a summariser, whose thoughts go back to the first expert."""
    backbones = [tiny(arch, 32, seed=i) for i, arch in enumerate(("llama", "qwen2", "qwen3"))]
    experts = [lg.Agent(f"expert{i}", model, f"As expert {i}, think about: {{question}}", tokenizer=tokenizer,
                        latent_steps=2 + i) for i, (model, tokenizer) in enumerate(backbones)]
    experts[0].feedback_prompt = "Summary so far: {summary}\nAs expert 0, think again about: {question}"
    model, tokenizer = tiny("llama", 48, seed=7)
    summariser = lg.Agent("summariser", model, tokenizer=tokenizer, latent_steps=2,
                          prompt="Experts: {expert0} {expert1} {expert2}\nAnswer: {question}")
    system = lg.System([*experts, summariser], rounds=2, answer="summariser")
    for expert in experts:
        system.connect(expert.name, "summariser")
    system.connect("summariser", "expert0", slot="summary", feedback=True)
    return system


def summary(event):
    """What an event says, without tensors or timings."""
    fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    fields.pop("thoughts", None)
    if isinstance(fields.get("latent"), torch.Tensor):
        fields["latent"] = tuple(fields["latent"].shape)
    if isinstance(fields.get("norm"), float):
        fields["norm"] = round(fields["norm"], 4)
    if isinstance(event, AgentFinished):
        fields["step"] = untimed(event.step)
    elif isinstance(event, RoundEnded):
        fields["steps"] = {name: untimed(step) for name, step in event.steps.items()}
    elif isinstance(event, RunFinished):
        fields["output"] = (event.output.texts, [{n: untimed(s) for n, s in r.items()} for r in event.output.trace])
    return type(event).__name__, fields


def untimed(step):
    return {**dataclasses.asdict(step), "seconds": None, "latent_norm": round(step.latent_norm or 0, 4)}


@pytest.fixture
def threaded(monkeypatch):
    """How many turns each threaded batch held, and the threads its turns ran on."""
    seen = []
    drain = engine.drain_in_threads

    def spy(runs):
        outcomes = drain(runs)
        seen.append(len(runs))
        return outcomes

    monkeypatch.setattr(engine, "drain_in_threads", spy)
    return seen


def test_the_plan_groups_consecutive_turns_that_do_not_deliver_to_each_other(tiny):
    system = mixture(tiny)
    names = [[[t.name for t in group] for group in system.plan().independent_groups(r)] for r in (1, 2)]
    assert names == [[["expert0", "expert1", "expert2"], ["summariser"]]] * 2
    system.connect("expert0", "expert1", slot="peer")
    system.agents["expert1"].prompt += " {peer}"
    groups = [[t.name for t in group] for group in system.plan().independent_groups(1)]
    assert groups == [["expert0"], ["expert1", "expert2"], ["summariser"]]


@pytest.mark.parametrize("mode", ["latent", "text"])
def test_experts_in_parallel_give_the_run_of_one_turn_after_the_other(tiny, threaded, mode):
    system = mixture(tiny)
    settings = {"mode": mode, "max_new_tokens": 4, "seed": 1, "return_latents": True}
    sequential = list(system.stream(QUESTIONS, parallel=False, **settings))
    assert threaded == []
    parallel = list(system.stream(QUESTIONS, parallel=True, **settings))
    # text mode: experts speak, and turns that sample on one device keep to plan order
    assert threaded == ([3, 3] if mode == "latent" else [])
    assert [summary(e) for e in parallel] == [summary(e) for e in sequential]
    started = [(e.round, e.agent) for e in parallel if isinstance(e, AgentStarted)]
    assert started == [(r, name) for r in (1, 2) for name in ("expert0", "expert1", "expert2", "summariser")]
    expected, got = sequential[-1].output, parallel[-1].output
    assert got.texts == expected.texts
    assert [list(r) for r in got.latents] == [list(r) for r in expected.latents]
    for round_got, round_expected in zip(got.latents, expected.latents):
        for name in round_got:
            torch.testing.assert_close(round_got[name], round_expected[name])


def test_a_stop_criterion_sees_the_same_round_in_parallel(tiny, threaded):
    system = mixture(tiny)
    runs = [list(system.stream(QUESTIONS, do_sample=False, max_new_tokens=3, stop=lambda events: True,
                               parallel=parallel)) for parallel in (False, True)]
    assert threaded == [3] and runs[1][-1].output.stopped_early
    assert [summary(e) for e in runs[1]] == [summary(e) for e in runs[0]]
    converged = [system.run(QUESTIONS, do_sample=False, max_new_tokens=3, rounds=3, parallel=parallel,
                            stop=ThoughtsConverged(tol=10.0)) for parallel in (False, True)]
    assert converged[0].rounds_run == converged[1].rounds_run == 2 and converged[0].texts == converged[1].texts


def test_an_error_in_a_parallel_turn_comes_after_the_events_before_it(tiny):
    system = mixture(tiny)
    with torch.no_grad():
        next(system.links["expert1->summariser"].parameters()).fill_(float("nan"))
    runs = []
    for parallel in (False, True):
        events = []
        with pytest.raises(lg.InputError, match="edge 'expert1->summariser'"):
            for event in system.stream(QUESTIONS, do_sample=False, max_new_tokens=3, parallel=parallel):
                events.append(summary(event))
        runs.append(events)
    assert runs[0] == runs[1]
    assert [fields.get("agent") for kind, fields in runs[0] if kind == "AgentStarted"] == ["expert0", "expert1"]


def test_training_unrolls_the_same_loss_and_gradients_in_parallel(tiny, threaded):
    system = mixture(tiny)
    batch = [TrainExample(question=q, answer="391", plan="multiply") for q in QUESTIONS]
    results = []
    for parallel in (False, True):
        system.zero_grad()
        step = TrainingStep(batch, regime="rollout")
        events = [summary(e) for e in unroll(system.plan(), QUESTIONS, step, parallel=parallel)
                  if not isinstance(e, (AgentFinished, RoundEnded, RunFinished))]
        step.losses[2].backward()
        results.append((events, step.losses[2].item(), {n: p.grad.clone() for n, p in system.named_parameters()}))
    assert threaded == [3, 3]
    (events, loss, grads), (events_parallel, loss_parallel, grads_parallel) = results
    assert events_parallel == events and loss_parallel == pytest.approx(loss, abs=1e-6)
    assert grads_parallel.keys() == grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads_parallel[name], grads[name], msg=name)


def test_by_default_agents_run_at_once_only_on_devices_they_do_not_share(tiny, monkeypatch):
    system = mixture(tiny)
    plan = system.plan()
    names = [[t.name for t in batch] for batch in batches(plan, 1, None)]
    assert names == [["expert0"], ["expert1"], ["expert2"], ["summariser"]]  # all on the CPU
    for i, name in enumerate(["expert0", "expert1", "expert2", "summariser"]):  # as if on GPUs 0, 1, 1, 0
        monkeypatch.setattr(system.agents[name].backbone, "_device", torch.device("cuda", [0, 1, 1, 0][i]))
    names = [[t.name for t in batch] for batch in batches(plan, 1, None)]
    assert names == [["expert0", "expert1"], ["expert2"], ["summariser"]]
    assert [[t.name for t in batch] for batch in batches(plan, 1, False)] == [[n] for n in
                                                                               ["expert0", "expert1", "expert2",
                                                                                "summariser"]]


def test_two_agents_on_one_backbone_never_run_at_once(tiny, threaded):
    model, tokenizer = tiny("llama", 32)
    agents = [lg.Agent(name, model, tokenizer=tokenizer, latent_steps=2) for name in ("a", "b")]
    other, other_tokenizer = tiny("qwen2", 32)
    agents.append(lg.Agent("c", other, "{question} {a} {b}", tokenizer=other_tokenizer, latent_steps=2))
    system = lg.System(agents, rounds=1, answer="c").connect("a", "c").connect("b", "c")
    system.run(QUESTIONS[:1], do_sample=False, max_new_tokens=2, parallel=True)
    assert threaded == []
    with pytest.raises(lg.InputError, match="parallel must be None"):
        system.stream("hi", parallel="yes")


def test_threads_really_run_the_turns(tiny, monkeypatch):
    system = mixture(tiny)
    threads = {}
    original = engine.InferenceStep.encode

    def spy(self, turn, questions, messages, prefix=None):
        threads[turn.name] = threading.get_ident()
        return original(self, turn, questions, messages, prefix)

    monkeypatch.setattr(engine.InferenceStep, "encode", spy)
    system.run(QUESTIONS, do_sample=False, max_new_tokens=2, rounds=1, parallel=True)
    main = threading.get_ident()
    assert threads["summariser"] == main and len({threads[f"expert{i}"] for i in range(3)} | {main}) == 4
