"""Per-row decoding: every row has its own settings and its own generator, so a row samples the text it
samples alone, whatever it is batched with."""

import pytest
import torch
from systems import QUESTIONS
from test_streaming import text_edge_system

import latentgraph as lg
from latentgraph.core.engine import InferenceStep, unroll
from latentgraph.core.sampling import Sampling, inverse_transform


def run_step(system, questions, sampling, seed):
    """Run ``system`` with an InferenceStep of its own; the RunOutput."""
    events = list(unroll(system.plan(), questions, InferenceStep(sampling, seed=seed)))
    return events[-1].output


def spoken(output):
    """What each agent said in each round, with its token counts."""
    return [{name: (step.text, step.tokens_out) for name, step in steps.items()} for steps in output.trace]


def row(output, i):
    """Row ``i`` of ``spoken(output)``."""
    return [{name: (texts[i], tokens[i]) for name, (texts, tokens) in steps.items()} for steps in spoken(output)]


@pytest.mark.parametrize("seed", [11, [11, 12, 13]])
def test_a_seeded_row_samples_what_it_samples_alone(tiny, seed):
    """Both agents sample (the planner for its text message, then the solver): a row's generator carries on from
    one to the other, and never serves another row."""
    system = text_edge_system(tiny, "qwen3")
    settings = {"temperature": 1.5, "top_p": 0.9, "max_new_tokens": 10}
    together = system.run(QUESTIONS, seed=seed, **settings)
    for i, question in enumerate(QUESTIONS):
        alone = system.run([question], seed=seed if isinstance(seed, int) else [seed[i]], **settings)
        assert row(alone, 0) == row(together, i)
    assert together.texts == system.run(QUESTIONS, seed=seed, **settings).texts
    other = system.run(QUESTIONS, seed=12, **settings)
    assert other.texts != together.texts  # the seed matters
    if isinstance(seed, int):  # with one seed, equal questions sample equal text
        twice = system.run([QUESTIONS[0]] * 2, seed=seed, **settings)
        assert twice.texts[0] == twice.texts[1]


def test_unseeded_rows_draw_from_torchs_generator(tiny):
    system = text_edge_system(tiny, "llama")
    settings = {"temperature": 1.5, "max_new_tokens": 10}
    torch.manual_seed(5)
    first = system.run(QUESTIONS[:2], seed=[3, None], **settings)
    torch.manual_seed(5)
    again = system.run(QUESTIONS[:2], seed=[3, None], **settings)
    assert first.texts == again.texts
    assert row(first, 0) == row(system.run(QUESTIONS[:1], seed=3, **settings), 0)


def test_rows_with_their_own_settings_decode_as_they_do_alone(tiny):
    system = text_edge_system(tiny, "gemma3_text")
    settings = [Sampling(do_sample=False, max_new_tokens=3), Sampling(temperature=1.5, top_p=0.9, max_new_tokens=9),
                Sampling(temperature=0.7, top_k=5, top_p=1.0, max_new_tokens=6)]
    seeds = [None, 2, 3]
    together = run_step(system, QUESTIONS, settings, seeds)
    for i, question in enumerate(QUESTIONS):
        assert row(run_step(system, [question], [settings[i]], [seeds[i]]), 0) == row(together, i)
    for steps in together.trace:
        for step in steps.values():
            assert all(n <= s.max_new_tokens for n, s in zip(step.tokens_out, settings))
    assert max(together.trace[0]["planner"].tokens_out) > 3  # the batch went on past the first row's budget
    # the greedy row is the row of a greedy run
    greedy = run_step(system, QUESTIONS, Sampling(do_sample=False, max_new_tokens=3), None)
    assert row(greedy, 0) == row(together, 0)


@pytest.mark.parametrize("sampling, seed, message", [
    ([Sampling(), Sampling()], None, r"2 Sampling settings for 3 questions; pass one per question"),
    (Sampling(), [1, 2], r"2 seeds for 3 questions; pass one per question"),
])
def test_per_row_settings_must_come_one_per_question(tiny, sampling, seed, message):
    step = InferenceStep(sampling, seed=seed)
    with pytest.raises(lg.InputError, match=message):
        next(unroll(text_edge_system(tiny, "llama").plan(), QUESTIONS, step))


@pytest.mark.parametrize("sampling, seed, message", [
    ([Sampling(), "greedy"], None, "sampling must be a Sampling, or a list with one Sampling per question"),
    ([], None, "sampling must be a Sampling, or a list"),
    (Sampling(), "7", "seed must be an integer from 0 to 2\\*\\*64 - 1, got '7'"),
    (Sampling(), [1, 2.5], "seed must be an integer from 0 to 2\\*\\*64 - 1, got 2.5"),
    (Sampling(), True, "seed must be an integer"),
])
def test_bad_per_row_settings_are_refused_when_the_step_is_made(sampling, seed, message):
    with pytest.raises(lg.InputError, match=message):
        InferenceStep(sampling, seed=seed)


def test_run_checks_its_seeds_before_the_first_event(tiny):
    system = text_edge_system(tiny, "llama")
    with pytest.raises(lg.InputError, match="2 seeds for 3 questions"):
        system.stream(QUESTIONS, seed=[1, 2])


def test_inverse_transform_picks_each_token_as_often_as_its_probability():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3], [0.25, 0.25, 0.25, 0.25, 0.0]])
    grid = (torch.arange(1000) + 0.5) / 1000  # evenly spread uniform numbers
    picks = torch.stack([inverse_transform(probs, torch.full((2,), u.item())) for u in grid])  # (1000, 2)
    counts = torch.stack([torch.bincount(picks[:, r], minlength=5) for r in range(2)])
    assert counts.tolist() == [[0, 200, 0, 500, 300], [250, 250, 250, 250, 0]]
    # the extremes of [0, 1) never land on a token of zero probability
    edges = [inverse_transform(probs, torch.full((2,), u)).tolist() for u in (0.0, 1 - 2 ** -24)]
    assert edges == [[1, 0], [4, 3]]
