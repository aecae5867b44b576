"""Systems end to end on tiny random backbones: rounds, feedback, mixed architectures, text edges."""

import pytest
from conftest import ALL_ARCHS
from systems import QUESTIONS, sequential

import latentgraph as lg


def test_mixed_architectures_run_three_rounds_with_feedback(tiny):
    system = sequential(tiny)
    out = system.run(QUESTIONS[:2], do_sample=False, max_new_tokens=5)
    assert len(out.texts) == 2 and all(isinstance(t, str) and t for t in out.texts)
    # every agent runs every round (the solver thinks for feedback, then answers in round 3)
    assert [list(steps) for steps in out.trace] == [["planner", "critic", "solver"]] * 3
    assert [out.trace[r]["planner"].prompt for r in range(3)] == ["prompt", "feedback_prompt", "feedback_prompt"]
    assert [out.trace[r]["planner"].latents_in for r in range(3)] == [0, 2, 2]  # the solver thinks 2 steps
    assert out.trace[0]["critic"].latent_shape == (2, 4, 48)
    assert out.trace[0]["critic"].latents_in == 3
    assert [out.trace[r]["solver"].latent_shape for r in range(3)] == [(2, 2, 32), (2, 2, 32), None]
    last = out.trace[2]["solver"]
    assert last.text == out.texts and all(1 <= n <= 5 for n in last.tokens_out)
    assert out.tokens_out == sum(last.tokens_out)
    assert all(step.seconds > 0 and len(step.tokens_in) == 2 for steps in out.trace for step in steps.values())


def test_rounds_override_and_single_round(tiny):
    system = sequential(tiny)
    out = system.run(QUESTIONS[:1], rounds=1, do_sample=False, max_new_tokens=3)
    assert len(out.trace) == 1 and system.rounds == 3
    assert out.trace[0]["solver"].latent_shape is None  # no feedback to produce in the only round


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_batch_equals_one_by_one(tiny, arch):
    """Rows of different lengths give the same latents and greedy tokens together as alone."""
    system = sequential(tiny, archs=(arch, arch, arch), sizes=(64, 48, 64))
    together = system.run(QUESTIONS, do_sample=False, max_new_tokens=6, return_latents=True)
    for i, question in enumerate(QUESTIONS):
        alone = system.run([question], do_sample=False, max_new_tokens=6, return_latents=True)
        assert alone.texts == [together.texts[i]]
        for r in range(3):
            for agent, hidden in alone.latents[r].items():
                assert (hidden[0] - together.latents[r][agent][i]).abs().max() <= 1e-4, (r, agent)


def test_text_edges_put_decoded_text_into_the_receiver_prompt(tiny):
    system = sequential(tiny)
    system.disconnect("planner", "critic").connect("planner", "critic", mode="text")
    seen = []
    critic = system.agents["critic"]
    original = critic.render

    def spy(questions, template, messages):
        rows = original(questions, template, messages)
        seen.append((messages["planner"].text, rows))
        return rows

    critic.render = spy
    out = system.run(QUESTIONS[:2], do_sample=False, max_new_tokens=4)
    assert "planner->critic" not in system.links
    assert len(seen) == 4  # the pre-run length check, then one per round
    for r, (texts, rows) in enumerate(seen[1:]):
        assert texts == out.trace[r]["planner"].text
        assert out.trace[r]["planner"].latent_shape is None  # a text sender decodes, it does not think
        for text, row in zip(texts, rows):
            assert len(row) == 1 and f"Plan: {text}\nRefine it for:" in row[0]
    assert out.trace[0]["critic"].latents_in == 0


def test_sampling_with_a_seed_is_reproducible(tiny):
    system = sequential(tiny)
    a = system.run(QUESTIONS[:2], seed=7, max_new_tokens=8, temperature=1.0)
    b = system.run(QUESTIONS[:2], seed=7, max_new_tokens=8, temperature=1.0)
    assert a.texts == b.texts


def test_system_parameters_are_the_links_only(tiny):
    system = sequential(tiny)
    links = [*system.links.values(), *(a.inner_link for a in system.agents.values())]
    assert system.num_parameters() == sum(p.numel() for link in links for p in link.parameters())
    assert set(system.links) == {"planner->critic", "critic->solver", "solver->planner"}
    assert system.agents["critic"].model is tiny("llama", 48, seed=1)[0]


def test_agents_naming_one_backbone_share_its_weights(tiny, tmp_path):
    model, tokenizer = tiny("qwen2", 64)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    a = lg.Agent("a", str(tmp_path), device="cpu")
    b = lg.Agent("b", tmp_path, prompt="{a} {question}", device="cpu")
    assert a.backbone is b.backbone and not a.backbone.loaded  # config only, until first use
    assert a.hidden_size == 64
    assert a.model is b.model
    system = lg.System([a, b], rounds=1, answer="b").connect("a", "b")
    assert len(system.run("hi", do_sample=False, max_new_tokens=2).texts) == 1


def test_composite_gemma3_width_comes_from_the_text_config(tiny, tmp_path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    _, tokenizer = tiny("gemma3_text", 64)
    text = dict(vocab_size=len(tokenizer), hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=80, head_dim=16, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    agent = lg.Agent("g", tmp_path, device="cpu", latent_steps=2)
    assert agent.hidden_size == 40
    out = lg.System([agent], rounds=1).run(["hi"], do_sample=False, max_new_tokens=2)
    assert agent.model.get_input_embeddings().weight.shape[1] == 40 and len(out.texts) == 1


def test_text_mode_makes_every_edge_a_text_edge(tiny):
    system = sequential(tiny)
    out = system.run(QUESTIONS[:2], mode="text", do_sample=False, max_new_tokens=3)
    assert out.mode == "text" and list(system.links) == ["planner->critic", "critic->solver", "solver->planner"]
    for steps in out.trace:
        assert list(steps) == ["planner", "critic", "solver"]
        for step in steps.values():
            assert step.latent_shape is None and step.latents_in == 0  # nothing latent travels
            assert step.text is not None and all(1 <= n <= 3 for n in step.tokens_out)
    assert out.trace[1]["planner"].prompt == "feedback_prompt"
    assert out.tokens_out == sum(sum(s.tokens_out) for steps in out.trace for s in steps.values())


def test_single_mode_runs_the_answer_node_alone(tiny):
    system = sequential(tiny)
    solver = system.agents["solver"]
    seen = []
    original = solver.render
    solver.render = lambda questions, template, messages: seen.append(messages) or original(questions, template,
                                                                                             messages)
    out = system.run(QUESTIONS[:2], mode="single", do_sample=False, max_new_tokens=3)
    assert out.mode == "single" and [list(steps) for steps in out.trace] == [["solver"]]
    assert all(m["critic"].text == ["", ""] and m["critic"].latent is None for m in seen)  # its slot stays empty
    with pytest.raises(lg.InputError, match="mode must be one of"):
        system.run(QUESTIONS[:1], mode="telepathy")
