"""Training on every architecture, hybrid linear attention included, and on the published layouts.

Qwen3.5's linear-attention layers update their conv and recurrent states in place; under autograd a KV-cached
rollout must not overwrite a state an earlier operation saved. These tests train through a feedback loop on
every tiny architecture, check the rollout's values and gradients against the re-encoding reference, and
train one step of every published style from the simulated hub.
"""

import json
import math
import types

import pytest
import torch
from conftest import ALL_ARCHS

import latentgraph as lg
import latentgraph.core.backbone
from latentgraph.checkpoints.published import published_styles
from latentgraph.core.backbone import get_backbone, own_cache_class
from latentgraph.core.links import make_link
from latentgraph.core.think import latent_rollout
from latentgraph.training.data import TrainExample
from latentgraph.training.loop import TrainConfig, train

EXAMPLES = [
    TrainExample("What is 17 * 23?", "The answer is 391.", plan="Multiply 17 by 23."),
    TrainExample("Half of 48?", "The answer is 24.", plan="Divide 48 by 2."),
]


def feedback_pair(model, tokenizer):
    """a -> b, with b -> a feedback: b thinks in round 1, and its thoughts reach a in round 2."""
    a = lg.Agent("a", model, tokenizer=tokenizer, prompt="Plan: {question}", feedback_prompt="{fb}\nAgain: {question}",
                 latent_steps=2)
    b = lg.Agent("b", model, tokenizer=tokenizer, prompt="Plan: {a}\n{question}", latent_steps=2)
    system = lg.System([a, b], rounds=2, answer="b")
    system.connect("a", "b").connect("b", "a", slot="fb", feedback=True)
    return system


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_outer_links_moved_and_rest_frozen(system, links_before, backbones_before, inner_before):
    for name, link in system.links.items():
        after = link.state_dict()
        assert any(not torch.equal(after[k], v) for k, v in links_before[name].items()), f"link {name} did not move"
    for name, agent in system.agents.items():
        state = agent.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in backbones_before[name].items()), f"backbone of {name} changed"
        inner = agent.inner_link.state_dict()
        assert all(torch.equal(inner[k], v) for k, v in inner_before[name].items()), f"inner link of {name} changed"


def train_outer_and_check(system, config):
    """Train the outer links; check the loss is finite, the outer links moved, everything else is frozen."""
    links_before = {name: snapshot(link) for name, link in system.links.items()}
    backbones_before = {name: snapshot(agent.model) for name, agent in system.agents.items()}
    inner_before = {name: snapshot(agent.inner_link) for name, agent in system.agents.items()}
    log = train(system, EXAMPLES, config, progress=False)
    assert len(log) == config.steps and all(math.isfinite(r["loss"]) for r in log), log
    assert_outer_links_moved_and_rest_frozen(system, links_before, backbones_before, inner_before)
    return log


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("regime", ["teacher", "rollout"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_outer_training_through_a_feedback_loop_on_every_architecture(tiny, arch, regime, batch_size):
    system = feedback_pair(*tiny(arch, 32))
    config = TrainConfig(stage="outer", regime=regime, steps=1, batch_size=batch_size, lr=1e-3, warmup=0)
    log = train_outer_and_check(system, config)
    assert log[-1]["links"]["b->a"] > 0 and log[-1]["links"]["a->b"] > 0  # gradient reached both links


@pytest.mark.parametrize("arch", ["qwen3_5_text", "gemma3_text"])
def test_inner_joint_and_grad_steps_train_on_stateful_architectures(tiny, arch):
    """The other training paths: inner stage (teacher-forced, no cache), and joint rollout training with only
    the first rollout forward in the graph while later forwards run without gradients on the same cache."""
    model, tokenizer = tiny(arch, 32)
    system = feedback_pair(model, tokenizer)
    for agent in system.agents.values():
        agent.latent_steps = 4
    inner_before = {name: snapshot(agent.inner_link) for name, agent in system.agents.items()}
    log = train(system, EXAMPLES, TrainConfig(stage="inner", steps=1, batch_size=2, warmup=0), progress=False)
    assert math.isfinite(log[0]["loss"])
    assert all(any(not torch.equal(agent.inner_link.state_dict()[k], v) for k, v in inner_before[name].items())
               for name, agent in system.agents.items())
    for grad_steps in (1, 2):
        links_before = snapshot(system.links)
        log = train(system, EXAMPLES, TrainConfig(stage="joint", regime="rollout", grad_steps=grad_steps, steps=1,
                                                  batch_size=2, warmup=0), progress=False)
        assert math.isfinite(log[0]["loss"])
        assert any(not torch.equal(system.links.state_dict()[k], v) for k, v in links_before.items())


def _rollout_case(tiny):
    model, tokenizer = tiny("qwen3_5_text", 32)
    backbone = get_backbone(model, tokenizer=tokenizer)
    torch.manual_seed(1)
    inner = make_link("ln_res", role="inner", in_dim=32, out_dim=32, where="test")
    embeds = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded row
    embeds[0, :3] = 0
    weights = torch.randn(2, 5, 32)  # a fixed random read-out of the thoughts
    return backbone, inner, embeds.requires_grad_(), mask, weights


def _gradients(backbone, inner, embeds, mask, weights, **kwargs):
    inner.zero_grad(set_to_none=True)
    embeds.grad = None
    thoughts = latent_rollout(backbone, inner, embeds, mask, steps=5, **kwargs)
    ((thoughts.hidden * weights).sum() + (thoughts.embeds * weights).sum()).backward()
    return thoughts, {"embeds": embeds.grad.clone(), **{k: p.grad.clone() for k, p in inner.named_parameters()}}


@pytest.mark.parametrize("grad_steps", [None, 2])
def test_hybrid_rollout_under_autograd_is_exact(tiny, grad_steps):
    """Under autograd the KV-cached rollout gives the states of the no-grad rollout, and its gradients (into the
    inner link and the prompt embeddings) equal those of the rollout that re-encodes the whole sequence at
    every step and keeps no state between forwards. ``grad_steps=2`` runs later steps without gradients on
    the same cache, after states were saved."""
    backbone, inner, embeds, mask, weights = _rollout_case(tiny)
    with torch.no_grad():
        plain = latent_rollout(backbone, inner, embeds, mask, steps=5)
    cached, grads = _gradients(backbone, inner, embeds, mask, weights, grad_steps=grad_steps)
    assert cached.hidden.requires_grad
    torch.testing.assert_close(cached.hidden, plain.hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached.embeds, plain.embeds, rtol=0, atol=1e-6)
    reference, expected = _gradients(backbone, inner, embeds, mask, weights, grad_steps=grad_steps, use_cache=False)
    torch.testing.assert_close(cached.hidden, reference.hidden, rtol=1e-4, atol=1e-5)
    assert set(grads) == set(expected) and all(g.abs().sum() > 0 for g in grads.values())
    for name in grads:  # equal up to fp32 rounding (the two paths sum in different orders): ~2e-7 relative
        error = (grads[name] - expected[name]).norm() / expected[name].norm()
        assert error < 1e-5, (name, error.item())


def test_only_rollouts_under_autograd_copy_states(tiny, monkeypatch):
    """Inference keeps the in-place cache: no state copies when gradients are off."""
    backbone, inner, embeds, mask, _ = _rollout_case(tiny)
    if own_cache_class(type(backbone.model)) is not None:
        pytest.skip("this transformers keeps Qwen3.5's states in the model's own cache class, not a DynamicCache")
    copies = []
    fresh = latentgraph.core.backbone.AutogradCache._fresh
    monkeypatch.setattr(latentgraph.core.backbone.AutogradCache, "_fresh",
                        lambda self, *args: copies.append(args) or fresh(self, *args))
    with torch.no_grad():
        latent_rollout(backbone, inner, embeds, mask, steps=3)
    assert copies == [] and type(backbone.new_cache()) is latentgraph.core.backbone.DynamicCache
    latent_rollout(backbone, inner, embeds, mask, steps=3)
    assert copies  # the one linear-attention layer's states, at every step


def test_autograd_cache_copies_a_state_in_either_layout(tiny):
    """Transformers keeps a linear-attention layer's states as a dict by state index (5.14 on) or as one tensor
    (5.5 to 5.13); in both, the state about to be overwritten is swapped for an equal copy."""
    cache = latentgraph.core.backbone.AutogradCache(config=tiny("qwen3_5_text", 32)[0].config)
    state = torch.randn(2, 3)
    for layout, read in (({0: state}, lambda layer: layer.conv_states[0]), (state, lambda layer: layer.conv_states)):
        layer = types.SimpleNamespace(conv_states=layout)
        cache.layers[0] = layer
        cache._fresh("conv_states", 0, 0)
        assert read(layer) is not state and torch.equal(read(layer), state)


@pytest.mark.parametrize("style", published_styles())
def test_every_published_style_trains_one_step(published_hub, style):
    system = lg.load_style(style, device="cpu")
    for agent in system.agents.values():
        agent.latent_steps = 2
    system.rounds = 2
    train_outer_and_check(system, TrainConfig(stage="outer", steps=1, batch_size=2, lr=1e-3, warmup=0))


def test_train_cli_on_a_saved_hybrid_style(published_hub, tmp_path):
    """`latentgraph train --style DIR` in the default (rollout) regime on a saved distillation system, whose
    backbones are Qwen3.5."""
    from typer.testing import CliRunner

    from latentgraph.cli import app

    system = lg.load_style("distillation", device="cpu")
    for agent in system.agents.values():
        agent.latent_steps = 2
    system.rounds = 2
    system.save_pretrained(tmp_path / "system")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": e.question, "answer": e.answer, "plan": e.plan}) + "\n"
                            for e in EXAMPLES))
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--output", str(tmp_path / "trained"),
                                      "--style", str(tmp_path / "system"), "--steps", "1", "--lr", "1e-3"])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "trained" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and math.isfinite(log[0]["loss"])
    trained = lg.System.from_pretrained(tmp_path / "trained", device="cpu")
    assert any(not torch.equal(a, b) for a, b in zip(trained.links.state_dict().values(),
                                                     system.links.state_dict().values()))
