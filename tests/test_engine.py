"""The round engine on tiny backbones: the compiled plan, streamed events, one loop for inference and
training, early exit, and NaN/inf named where it starts."""

import pytest
import torch
from systems import QUESTIONS, sequential

import latentgraph as lg
from latentgraph.core.engine import InferenceStep, unroll
from latentgraph.core.events import (
    AgentFinished,
    AgentSpoke,
    AgentStarted,
    AgentThought,
    MessageDelivered,
    RoundEnded,
    RunFinished,
    TokensDecoded,
)
from latentgraph.core.speak import Sampling
from latentgraph.core.stopping import ThoughtsConverged
from latentgraph.testing import tiny_backbone
from latentgraph.training.data import TrainExample
from latentgraph.training.objectives import TrainingStep

EXAMPLES = [TrainExample("What is 17 * 23?", "The answer is 391.", plan="Multiply 17 by 23."),
            TrainExample("Half of 48?", "The answer is 24.", plan="Divide 48 by 2.", targets={"critic": "Halve."})]
GREEDY = {"do_sample": False, "max_new_tokens": 4}


@pytest.fixture
def make(tiny):
    """``make(name, prompt=..., **agent_kwargs)`` builds an agent on a tiny llama, 2 latent steps."""
    model, tokenizer = tiny("llama", 64)
    return lambda name, prompt="{question}", **kwargs: lg.Agent(name, model, tokenizer=tokenizer, prompt=prompt,
                                                                 latent_steps=2, **kwargs)


def test_the_plan_prints_each_turn_with_its_reads_and_sends(tiny):
    plan = sequential(tiny).plan()
    assert plan.rounds == 3 and plan.mode == "latent" and plan.answer == "solver"
    assert plan.table() == """\
round  agent    prompt           reads                          does               sends
1      planner  prompt           -                              thinks             planner->critic (latent, now)
1      critic   prompt           {planner} <- planner->critic   thinks             critic->solver (latent, now)
1      solver   prompt           {critic} <- critic->solver     thinks             solver->planner (latent, next round)
2      planner  feedback_prompt  {feedback} <- solver->planner  thinks             planner->critic (latent, now)
2      critic   prompt           {planner} <- planner->critic   thinks             critic->solver (latent, now)
2      solver   prompt           {critic} <- critic->solver     thinks             solver->planner (latent, next round)
3      planner  feedback_prompt  {feedback} <- solver->planner  thinks             planner->critic (latent, now)
3      critic   prompt           {planner} <- planner->critic   thinks             critic->solver (latent, now)
3      solver   prompt           {critic} <- critic->solver     speaks the answer  -"""
    assert str(plan).splitlines()[0] == "Plan: 3 rounds, latent mode, answer 'solver'"
    assert sequential(tiny).plan(rounds=1, mode="single").table() == """\
round  agent   prompt  reads              does               sends
1      solver  prompt  {critic} <- empty  speaks the answer  -"""


def test_a_plan_is_a_snapshot_and_checks_its_arguments(tiny):
    system = sequential(tiny)
    plan = system.plan(rounds=2, mode="text")
    system.disconnect("critic", "solver")
    assert [e.name for e in plan.turns[0][1].outgoing] == ["critic->solver"]  # the edit does not reach it
    assert all(e.mode == "text" for turn in plan.turns_in_order() for e in turn.outgoing)
    with pytest.raises(AttributeError):
        plan.answer = "planner"
    with pytest.raises(lg.InputError, match="rounds must be an integer >= 1"):
        system.plan(rounds=0)
    with pytest.raises(lg.InputError, match="mode must be one of"):
        system.plan(mode="telepathy")
    with pytest.raises(lg.GraphError, match="receives messages but never runs"):  # plan() validates the graph
        system.plan()


def expected_events(plan, output):
    """The (event, round, agent or edge) sequence a plan must produce, built from its turns; a speaking turn
    emits one TokensDecoded per decoding step: as many as its longest row's tokens (``output``'s trace)."""
    sequence = []
    for r, turns in enumerate(plan.turns, start=1):
        for turn in turns:
            sequence.append(("AgentStarted", r, turn.name))
            sequence += [("AgentThought", r, turn.name)] * turn.thinks
            if turn.speaks:
                steps = max(output.trace[r - 1][turn.name].tokens_out)
                sequence += [("TokensDecoded", r, turn.name)] * steps + [("AgentSpoke", r, turn.name)]
            sequence += [("MessageDelivered", r, e.name) for e in turn.outgoing]
            sequence.append(("AgentFinished", r, turn.name))
        sequence.append(("RoundEnded", r, None))
    return [*sequence, ("RunFinished", plan.rounds, None)]


def test_stream_yields_each_step_in_order_and_ends_with_the_output_of_run(tiny):
    system = sequential(tiny)
    forwards = []
    system.agents["planner"].backbone.decoder.register_forward_pre_hook(lambda *_: forwards.append(1))
    events = system.stream(QUESTIONS[:2], **GREEDY)
    first = next(events)
    assert isinstance(first, AgentStarted) and (first.round, first.agent, first.prompt) == (1, "planner", "prompt")
    assert forwards == []  # yielded before the agent did any work
    events = [first, *events]
    out = system.run(QUESTIONS[:2], **GREEDY)
    assert [(type(e).__name__, e.round, getattr(e, "agent", getattr(e, "edge", None))) for e in events] == \
        expected_events(system.plan(), out)
    assert isinstance(events[-1], RunFinished)
    final = events[-1].output
    assert final.texts == out.texts and not final.stopped_early and final.rounds_run == 3
    assert [list(steps) for steps in final.trace] == [list(steps) for steps in out.trace]
    for event in events:
        if isinstance(event, AgentFinished):
            assert final.trace[event.round - 1][event.agent] is event.step
        elif isinstance(event, AgentThought):
            step = final.trace[event.round - 1][event.agent]
            assert event.shape == step.latent_shape and event.norm == step.latent_norm
        elif isinstance(event, AgentSpoke):
            assert (event.round, event.agent, event.texts) == (3, "solver", final.texts)
        elif isinstance(event, RoundEnded):
            assert event.steps is final.trace[event.round - 1]
    deliveries = [e for e in events if isinstance(e, MessageDelivered)]
    assert [(e.edge, e.next_round, e.latent_shape) for e in deliveries[:3]] == [
        ("planner->critic", False, (2, 3, 48)), ("critic->solver", False, (2, 4, 32)),
        ("solver->planner", True, (2, 2, 64))]


def test_stream_checks_its_inputs_before_the_first_event(tiny):
    system = sequential(tiny)
    with pytest.raises(lg.InputError, match="no questions"):
        system.stream([])
    with pytest.raises(lg.InputError, match="stop must be a callable"):
        system.stream("hi", stop=3)


def test_training_and_inference_deliver_the_same_messages_in_the_same_order(tiny):
    """One engine: on one plan, the training step and the inference step send on the same edges, into the
    same slots, in the same order, and with the rollout regime the very same latents."""
    system = sequential(tiny)
    plan = system.plan()
    questions = [ex.question for ex in EXAMPLES]

    def deliveries(events):
        return [(e.round, e.edge, e.slot, e.next_round, e.latent_shape, e.latent)
                for e in events if isinstance(e, MessageDelivered)]

    inference = deliveries(unroll(plan, questions, InferenceStep(Sampling(do_sample=False, max_new_tokens=3))))
    streamed = deliveries(system.stream(questions, do_sample=False, max_new_tokens=3))
    rollout = deliveries(unroll(plan, questions, TrainingStep(EXAMPLES, regime="rollout")))
    teacher = deliveries(unroll(plan, questions, TrainingStep(EXAMPLES, regime="teacher")))
    assert len(inference) == 8  # three edges in each of three rounds, less the last round's feedback
    for other in (streamed, rollout, teacher):
        assert [d[:5] for d in other] == [d[:5] for d in inference]
    assert rollout[0][5].requires_grad and not inference[0][5].requires_grad
    for trained, inferred in zip(rollout, inference):
        assert torch.allclose(trained[5].detach(), inferred[5], atol=1e-5), trained[:2]


def test_a_stop_after_round_1_answers_from_the_round_1_prompt(tiny):
    system = sequential(tiny)
    seen, encodes = [], []
    solver = system.agents["solver"]
    original = solver.encode
    solver.encode = lambda *args: encodes.append(1) or original(*args)

    def stop(events):
        seen.append(events)
        return True

    stopped = system.run(QUESTIONS[:2], stop=stop, return_latents=True, **GREEDY)
    assert len(seen) == 1 and {e.round for e in seen[0]} == {1} and isinstance(seen[0][-1], AgentFinished)
    assert stopped.stopped_early and stopped.rounds_run == 1 and len(stopped.latents) == 1
    assert len(encodes) == 1  # the solver speaks from the prompt it encoded to think, not a new one
    step = stopped.trace[0]["solver"]
    assert step.latent_shape == (2, 2, 32) and step.text == stopped.texts  # thought for feedback, then spoke
    solver.encode = original
    # its round-1 prompt is the one it reads when the run is planned for one round: the same answer
    one = system.run(QUESTIONS[:2], rounds=1, return_latents=True, **GREEDY)
    assert stopped.texts == one.texts and not one.stopped_early
    assert one.trace[0]["solver"].latent_shape is None
    for agent in ("planner", "critic"):
        assert torch.equal(stopped.latents[0][agent], one.latents[0][agent])


def test_a_stop_before_the_answer_node_ran_answers_from_what_it_received(make):
    a, b = make("a"), make("b", "{a} {question}")
    system = lg.System([a, b], rounds=3, answer="b").connect("a", "b")
    assert [turn.name for turn in system.plan().turns[0]] == ["a"]  # b runs only in the last round
    events = list(system.stream(QUESTIONS[:2], stop=lambda events: True, **GREEDY))
    out = events[-1].output
    assert out.rounds_run == 1 and list(out.trace[0]) == ["a", "b"] and out.trace[0]["b"].latents_in == 2
    assert out.texts == system.run(QUESTIONS[:2], rounds=1, **GREEDY).texts
    names = [type(e).__name__ for e in events if not isinstance(e, TokensDecoded)]
    assert names[-5:] == ["AgentStarted", "AgentSpoke", "AgentFinished", "RoundEnded", "RunFinished"]


def test_thoughts_converged_stops_once_the_answer_nodes_thoughts_settle(tiny):
    system = sequential(tiny)
    watch = ThoughtsConverged(tol=0.0)
    full = system.run(QUESTIONS[:2], stop=watch, **GREEDY)
    assert not full.stopped_early and full.rounds_run == 3
    assert len(watch.changes) == 1 and watch.changes[0].shape == (2,)  # round 2 against round 1; not after 3
    assert full.texts == system.run(QUESTIONS[:2], **GREEDY).texts
    change = watch.changes[0].max().item()
    early = system.run(QUESTIONS[:2], stop=ThoughtsConverged(tol=change * 1.01), **GREEDY)
    assert early.stopped_early and early.rounds_run == 2  # round 1 has nothing to compare with
    assert early.texts == system.run(QUESTIONS[:2], rounds=2, **GREEDY).texts
    assert system.run(QUESTIONS[:2], stop=ThoughtsConverged(tol=change * 0.99), **GREEDY).rounds_run == 3  # every row


@pytest.mark.parametrize("receiver, do_sample", [("speaks", False), ("speaks", True), ("thinks", False)])
def test_nan_out_of_an_outer_link_names_the_edge(make, receiver, do_sample):
    planner, solver = make("planner"), make("solver", "{planner} {question}")
    system = lg.System([planner, solver], rounds=1, answer="solver").connect("planner", "solver")
    if receiver == "thinks":  # in round 1 of 2 the solver thinks, for its feedback
        planner.feedback_prompt = "{feedback} {question}"
        system.connect("solver", "planner", slot="feedback", feedback=True)
        system.rounds = 2
    with torch.no_grad():
        system.links["planner->solver"].proj1.weight.fill_(float("nan"))
    with pytest.raises(lg.InputError, match=r"edge 'planner->solver': its link produced non-finite values "
                                            r"\(NaN/inf\) in round 1 .*reload them"):
        system.run(QUESTIONS[:2], do_sample=do_sample, max_new_tokens=3, seed=0)


def test_non_finite_thoughts_blame_the_inner_link_or_the_backbone(make):
    a = make("a")
    system = lg.System([a, make("b", "{a}")], answer="b").connect("a", "b")
    with torch.no_grad():
        a.inner_link.proj1.weight.fill_(float("nan"))
    with pytest.raises(lg.InputError, match="agent 'a' produced non-finite latents .* round 1: its inner link"):
        system.run("hi", max_new_tokens=2)
    model, tokenizer = tiny_backbone("llama", 32)  # its own copy: the weights are spoiled below
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("inf"))
    c = lg.Agent("c", model, tokenizer=tokenizer, latent_steps=2)
    system = lg.System([c, lg.Agent("d", model, tokenizer=tokenizer, prompt="{c}")], answer="d").connect("c", "d")
    with pytest.raises(lg.InputError, match="agent 'c' produced non-finite latents .*: its backbone's hidden state"):
        system.run("hi", max_new_tokens=2)


def test_cli_run_shows_each_agent_step_live_on_stderr(saved):
    from typer.testing import CliRunner

    from latentgraph.cli import app

    result = CliRunner().invoke(app, ["run", "What is 2 + 2?", "--style", str(saved), "--greedy", "--rounds", "2",
                                      "--max-new-tokens", "3", "--latent-steps", "3", "--stop-tol", "0"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("round ")]
    assert [line.split(" · ")[1].split()[0] for line in lines] == ["planner", "critic", "solver"] * 2
    assert lines[0].startswith("round 1 · planner thought 3 latents (norm ") and lines[0].endswith(" s")
    assert lines[-1].startswith("round 2 · solver spoke ") and " tokens · " in lines[-1]
    assert result.stdout.strip() and "round 1 ·" not in result.stdout  # stdout keeps only the answer and table
