"""KV-cache edges in a system: the receiver's prompt continues the sender's KV cache (LatentMAS's working memory).

The definition tested exactly: with one KV in-edge, the receiver's thoughts and decoded text equal those of one
forward over [the sender's prompt embeddings; its m thought embeddings; the receiver's prompt embeddings as it
would be alone], positions continuing, on two architectures, alone and batched.
"""

import pytest
import torch
from systems import QUESTIONS

import latentgraph as lg
from latentgraph.core.events import AgentFinished
from latentgraph.core.sampling import Sampling
from latentgraph.core.speak import generate, run_to_end
from latentgraph.core.think import latent_rollout
from latentgraph.training.data import TrainExample
from latentgraph.training.objectives import unrolled_loss

ARCHS = ["llama", "qwen2"]


def agents(tiny, arch, *, steps=(3, 2)):
    model, tok = tiny(arch, 64, seed=1)
    return [lg.Agent("planner", model, tokenizer=tok, prompt="Plan: {question}", latent_steps=steps[0]),
            lg.Agent("solver", model, tokenizer=tok, prompt="Solve: {question}", latent_steps=steps[1])]


def concatenated(planner, receiver, questions):
    """The definition's single sequence, per question: [sender prompt; sender thoughts; receiver prompt]."""
    sent = planner.encode(questions, planner.template(False), {})
    thoughts = planner.think(sent)
    alone = receiver.encode(questions, receiver.template(False), {})
    rows = []
    for i in range(len(questions)):
        parts = [sent.embeds[i][sent.mask[i].bool()], thoughts.embeds[i].to(sent.embeds),
                 alone.embeds[i][alone.mask[i].bool()]]
        rows.append(torch.cat(parts))
    return rows


def run_alone(backbone, row, fn):
    return fn(row[None], torch.ones(1, len(row), dtype=torch.long))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batched", [False, True])
def test_a_kv_receiver_thinks_as_one_forward_over_the_concatenation(tiny, arch, batched):
    planner, solver = agents(tiny, arch)
    model, tok = tiny(arch, 64, seed=2)
    critic = lg.Agent("critic", model, tokenizer=tok, prompt="Check: {solver}")
    system = lg.System([planner, solver, critic], rounds=1, answer="critic")
    system.connect("planner", "solver", mode="kv").connect("solver", "critic")
    questions = QUESTIONS[:2] if batched else QUESTIONS[:1]
    out = system.run(questions, do_sample=False, max_new_tokens=2, return_latents=True)
    for i, row in enumerate(concatenated(planner, solver, questions)):
        reference = run_alone(solver.backbone, row, lambda e, m: latent_rollout(
            solver.backbone, solver.inner_link, e, m, solver.latent_steps))
        torch.testing.assert_close(out.latents[0]["solver"][i:i + 1], reference.hidden, atol=1e-5, rtol=0)
    assert out.trace[0]["solver"].cache_in > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batched", [False, True])
def test_a_kv_receiver_decodes_as_from_the_concatenation(tiny, arch, batched):
    planner, solver = agents(tiny, arch)
    system = lg.System([planner, solver], rounds=1, answer="solver").connect("planner", "solver", mode="kv")
    questions = QUESTIONS[:3] if batched else QUESTIONS[1:2]
    out = system.run(questions, do_sample=False, max_new_tokens=6)
    sampling = Sampling(do_sample=False, max_new_tokens=6)
    for i, row in enumerate(concatenated(planner, solver, questions)):
        (reference,) = run_alone(solver.backbone, row, lambda e, m: run_to_end(
            generate(solver.backbone, e, m, sampling)))
        assert out.texts[i] == reference.text


def test_the_trace_reports_the_cache_each_receiver_read_and_a_chain_passes_it_on(tiny):
    model, tok = tiny("llama", 64, seed=1)
    make = [lg.Agent(n, model, tokenizer=tok, prompt=f"{n}: {{question}}", latent_steps=m)
            for n, m in (("a", 3), ("b", 2), ("c", 4))]
    system = lg.System(make, rounds=1, answer="c")
    system.connect("a", "b", mode="kv").connect("b", "c", mode="kv")
    trace = system.run(QUESTIONS[:1], do_sample=False, max_new_tokens=2).trace[0]
    prompt = {n: trace[n].tokens_in[0] for n in "abc"}
    assert trace["a"].cache_in == 0
    assert trace["b"].cache_in == prompt["a"] + 3
    assert trace["c"].cache_in == prompt["a"] + 3 + prompt["b"] + 2  # b passes on what it continued

    system.disconnect("b", "c").connect("b", "c", mode="kv", kv="thoughts")
    assert system.run(QUESTIONS[:1], do_sample=False, max_new_tokens=2).trace[0]["c"].cache_in == 2


def test_several_kv_edges_are_read_in_edge_order_and_feedback_carries_into_the_next_round(tiny):
    model, tok = tiny("qwen2", 64, seed=1)
    make = [lg.Agent(n, model, tokenizer=tok, prompt=f"{n}: {{question}}", latent_steps=2) for n in "abc"]
    system = lg.System(make, rounds=2, answer="c")
    system.connect("a", "c", mode="kv").connect("b", "c", mode="kv").connect("c", "a", mode="kv", feedback=True)
    out = system.run(QUESTIONS[:2], do_sample=False, max_new_tokens=2)
    first, second = out.trace
    width = lambda step: max(step.tokens_in) + 2  # noqa: E731 (left-padded: the batch's longest prompt)
    assert "c" in first and first["c"].cache_in == width(first["a"]) + width(first["b"])
    assert first["a"].cache_in == 0 and second["a"].cache_in == width(first["c"]) + first["c"].cache_in
    assert second["a"].prompt == "prompt"  # a cache fed back fills no slot: no feedback_prompt needed


def test_a_kv_edge_needs_the_same_backbone_or_the_same_sizes(tiny):
    (model, tok), (other, other_tok) = tiny("llama", 64, seed=1), tiny("llama", 48, seed=1)
    system = lg.System([lg.Agent("a", model, tokenizer=tok), lg.Agent("b", other, tokenizer=other_tok)], answer="b")
    system.connect("a", "b", mode="kv")
    with pytest.raises(lg.GraphError, match=r"edge 'a->b' is a KV edge, but .*hidden_size 64 against 48.*same "
                                            r"backbone, or use mode='latent'"):
        system.validate()


@pytest.mark.parametrize("regime", ["rollout", "teacher"])
def test_training_through_a_kv_edge_reaches_the_senders_inner_link(tiny, regime):
    planner, solver = agents(tiny, "llama")
    system = lg.System([planner, solver], rounds=1, answer="solver").connect("planner", "solver", mode="kv")
    batch = [TrainExample(question=q, answer="42", targets={"planner": "step one"}) for q in QUESTIONS[:2]]
    unrolled_loss(system, batch, regime=regime).loss.backward()
    grads = [p.grad for p in planner.inner_link.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_the_text_baseline_continues_the_cache_of_what_the_sender_said(tiny):
    planner, solver = agents(tiny, "llama")
    system = lg.System([planner, solver], rounds=1, answer="solver").connect("planner", "solver", mode="kv")
    events = list(system.stream(QUESTIONS[:1], mode="text", do_sample=False, max_new_tokens=4))
    steps = {e.agent: e.step for e in events if isinstance(e, AgentFinished)}
    said = len(planner.tokenizer(steps["planner"].text[0], add_special_tokens=False)["input_ids"])
    assert steps["planner"].text is not None and steps["planner"].latent_shape is None  # it spoke, not thought
    assert steps["solver"].cache_in == steps["planner"].tokens_in[0] + max(1, said)


def test_kv_edges_round_trip_through_the_config_and_are_drawn(tiny, tmp_path):
    planner, solver = agents(tiny, "llama")
    system = lg.System([planner, solver], rounds=1, answer="solver")
    system.connect("planner", "solver", mode="kv", kv="thoughts")
    edge = system.to_config().edges[0]
    assert (edge.mode, edge.kv, edge.slot, edge.link) == ("kv", "thoughts", None, None)
    rebuilt = lg.System.from_config(system.to_config(), backbones={
        "planner": (planner.model, planner.tokenizer), "solver": (solver.model, solver.tokenizer)})
    assert rebuilt.edges == system.edges
    plain = lg.System([planner, solver], rounds=1, answer="solver").connect("planner", "solver", mode="kv")
    assert "kv" not in plain.to_config().edges[0].model_dump()  # written only when set
    source = lg.render(system).source
    assert 'planner -> solver [label="kv (thoughts)" color=navy fontcolor=navy style=bold]' in source


def test_the_cli_trace_table_has_a_cache_column_only_where_kv_edges_ran(tiny):
    from latentgraph.cli import trace_table

    planner, solver = agents(tiny, "llama")
    kv = lg.System([planner, solver], rounds=1, answer="solver").connect("planner", "solver", mode="kv")
    out = kv.run(QUESTIONS[:1], do_sample=False, max_new_tokens=2)
    table = trace_table(out)
    columns = [c.header for c in table.columns]
    assert "cache in" in columns
    assert list(table.columns[columns.index("cache in")].cells) == ["0", str(out.trace[0]["solver"].cache_in)]
    plain = lg.System([planner, lg.Agent("reader", planner.model, tokenizer=planner.tokenizer, prompt="{planner}")],
                      rounds=1, answer="reader").connect("planner", "reader")
    assert "cache in" not in [c.header for c in trace_table(plain.run("q", do_sample=False, max_new_tokens=2)).columns]
