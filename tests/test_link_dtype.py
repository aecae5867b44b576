"""The ``link_dtype`` option: fp32 links by default, the link files' own dtype (bf16, the published numerics) with
``"auto"``, or any dtype asked for; in every loader, on the command line and on Ray workers."""

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import latentgraph as lg
from latentgraph.checkpoints.native import CONFIG_NAME, WEIGHTS_NAME, read_weights
from latentgraph.checkpoints.published import style_module
from latentgraph.core.events import AgentThought, MessageDelivered

STYLE = "sequential_light"  # planner (qwen3, 64) -> critic (llama, 48) -> solver (qwen2, 32), solver -> planner
QUESTIONS = ["What is 17 * 23?", "A train travels 60 km in 45 minutes. What is its speed in km/h?"]


def link_dtypes(system) -> set[torch.dtype]:
    return {p.dtype for p in system.parameters()}


def short(system, steps=3):
    for agent in system.agents.values():
        agent.latent_steps = steps
    return system


# The published links, written out from their formulas (the reference code's Adapter and CrossModelAdapter) and
# applied in the dtype of the state dict, as the reference code applies a link: input cast to the link's dtype.
def inner_reference(state, x):
    x = x.to(state["proj1.weight"].dtype)
    h = F.layer_norm(x, x.shape[-1:], state["pre_ln.weight"], state["pre_ln.bias"])
    h = F.linear(F.gelu(F.linear(h, state["proj1.weight"], state["proj1.bias"])), state["proj2.weight"],
                 state["proj2.bias"])
    return F.layer_norm(x + h, x.shape[-1:], state["post_ln.weight"], state["post_ln.bias"])


def outer_reference(state, x):
    x = x.to(state["proj1.weight"].dtype)
    h = F.layer_norm(x, x.shape[-1:], state["ln_source.weight"], state["ln_source.bias"])
    h = F.linear(F.gelu(F.linear(h, state["proj1.weight"], state["proj1.bias"])), state["proj2.weight"],
                 state["proj2.bias"])
    out = h + F.linear(x, state["residual_proj.weight"], state["residual_proj.bias"])
    return F.layer_norm(out, out.shape[-1:], state["ln_target.weight"], state["ln_target.bias"])


@contextmanager
def decoder_inputs(system) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Every ``inputs_embeds`` each agent's decoder is called with (prefills and latent steps; decoding steps
    pass token ids)."""
    calls = {name: [] for name in system.agents}

    def record(name, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            calls[name].append(kwargs["inputs_embeds"].detach().clone())

    hooks = [agent.backbone.decoder.register_forward_pre_hook(
        lambda module, args, kwargs, name=name: record(name, kwargs), with_kwargs=True)
        for name, agent in system.agents.items()]
    try:
        yield calls
    finally:  # the backbones are shared with other tests
        for hook in hooks:
            hook.remove()


def test_auto_computes_every_message_as_the_published_code_does_in_bf16(published_hub):
    system = short(lg.load_style(STYLE, device="cpu", link_dtype="auto"))
    assert link_dtypes(system) == {torch.bfloat16}
    assert {a.backbone.dtype for a in system.agents.values()} == {torch.float32}  # fp32 backbones, bf16 links
    inner = {role: published_hub.inner[(STYLE, role, "math")] for role in system.agents}
    outer = {f"{src}->{dst}": published_hub.outer[(STYLE, key, "math")]
             for key, (src, dst) in style_module(STYLE).LEGACY_KEYS.items()}
    thoughts, messages = {}, {}
    with decoder_inputs(system) as calls:
        for event in system.stream(QUESTIONS, rounds=2, do_sample=False, max_new_tokens=2):
            if isinstance(event, AgentThought):
                thoughts[(event.round, event.agent)] = event.thoughts
            elif isinstance(event, MessageDelivered) and event.latent is not None:
                messages[(event.round, event.edge)] = event.latent
    assert sorted(messages) == [(1, "critic->solver"), (1, "planner->critic"), (1, "solver->planner"),
                                (2, "critic->solver"), (2, "planner->critic")]

    # Each thought is the inner link applied in bf16 to the fp32 hidden state: e_k = I(h_k.bf16()).
    for (r, agent), t in thoughts.items():
        assert t.hidden.dtype == torch.float32 and t.embeds.dtype == torch.bfloat16
        assert torch.equal(t.embeds, inner_reference(inner[agent], t.hidden)), (r, agent)

    # Each message is O(I(H)) in bf16, where the thoughts reach the outer link through the sender's fp32
    # embeddings (bf16 -> fp32 -> bf16, which is exact).
    for (r, edge), message in messages.items():
        sender = edge.split("->")[0]
        embeds = inner_reference(inner[sender], thoughts[(r, sender)].hidden).float()
        assert message.dtype == torch.bfloat16
        assert torch.equal(message, outer_reference(outer[edge], embeds)), (r, edge)

    # Spliced into an fp32 receiver, a message is the fp32 copy of its bf16 values; each fed-back thought is
    # the fp32 copy of e_k (the reference casts the inner link's output to the embedding dtype).
    prefill = calls["critic"][0]  # the critic's first forward of round 1: its prompt, the planner's message in it
    assert prefill.dtype == torch.float32
    sent = messages[(1, "planner->critic")]
    for row in range(len(QUESTIONS)):
        width = sent.shape[1]
        windows = [prefill[row, i:i + width] for i in range(prefill.shape[1] - width + 1)]
        assert any(torch.equal(w, sent[row].float()) for w in windows), row
    steps = calls["critic"][1:3]  # the latent steps after the prefill: e_0 and e_1 fed back
    for k, fed in enumerate(steps):
        assert fed.dtype == torch.float32
        assert torch.equal(fed[:, 0], thoughts[(1, "critic")].embeds[:, k].float())


def test_the_default_keeps_links_in_fp32_with_the_published_values(published_hub):
    default = lg.load_style(STYLE, device="cpu")
    auto = lg.load_style(STYLE, device="cpu", link_dtype="auto")
    assert link_dtypes(default) == {torch.float32}
    for (name, x), (_, y) in zip(default.state_dict().items(), auto.state_dict().items()):
        assert torch.equal(x, y.float()), name  # the same values: bf16 -> fp32 is exact
    out = short(default).run(QUESTIONS[:1], rounds=1, do_sample=False, max_new_tokens=2, return_latents=True)
    assert out.latents[0]["planner"].dtype == torch.float32


@pytest.mark.parametrize("link_dtype", ["float16", torch.float64, "bfloat16"])
def test_a_named_dtype_applies_to_every_link_loaded_or_fresh(published_hub, tiny, link_dtype):
    wanted = getattr(torch, link_dtype) if isinstance(link_dtype, str) else link_dtype
    system = lg.load_style(STYLE, device="cpu", link_dtype=link_dtype)
    assert link_dtypes(system) == {wanted}
    published = published_hub.inner[(STYLE, "planner", "math")]["proj1.weight"]
    assert torch.equal(system.agents["planner"].inner_link.proj1.weight, published.to(wanted))
    assert link_dtypes(lg.load_style(STYLE, load_weights=False, link_dtype=link_dtype)) == {wanted}
    with pytest.warns(UserWarning, match="start fresh"):
        swapped = lg.load_style(STYLE, backbones={"critic": tiny("llama", 64)}, device="cpu", link_dtype=link_dtype)
    assert link_dtypes(swapped) == {wanted}


def test_auto_leaves_links_without_a_file_in_fp32(published_hub, tiny):
    assert link_dtypes(lg.load_style(STYLE, load_weights=False, link_dtype="auto")) == {torch.float32}
    with pytest.warns(UserWarning, match="start fresh"):
        swapped = lg.load_style(STYLE, backbones={"critic": tiny("llama", 64)}, device="cpu", link_dtype="auto")
    assert swapped.agents["critic"].inner_link.proj1.weight.dtype == torch.float32
    assert swapped.links["planner->critic"].proj1.weight.dtype == torch.float32
    assert swapped.agents["planner"].inner_link.proj1.weight.dtype == torch.bfloat16


def test_save_keeps_the_link_dtype_and_auto_reads_it_back(published_hub, tmp_path):
    system = short(lg.load_style(STYLE, device="cpu", link_dtype="auto"))
    before = system.run(QUESTIONS, rounds=2, do_sample=False, max_new_tokens=4, return_latents=True)
    system.save_pretrained(tmp_path)
    assert {t.dtype for t in read_weights(tmp_path / WEIGHTS_NAME).values()} == {torch.bfloat16}
    assert "dtype" not in (tmp_path / CONFIG_NAME).read_text()  # a load-time choice: not in the config

    again = short(lg.System.from_pretrained(tmp_path, device="cpu", link_dtype="auto"))
    assert link_dtypes(again) == {torch.bfloat16}
    after = again.run(QUESTIONS, rounds=2, do_sample=False, max_new_tokens=4, return_latents=True)
    assert after.texts == before.texts
    for r, latents in enumerate(before.latents):
        for agent, latent in latents.items():
            assert torch.equal(after.latents[r][agent], latent), (r, agent)

    default = lg.System.from_pretrained(tmp_path, device="cpu")  # the default: fp32, the same values
    assert link_dtypes(default) == {torch.float32}
    assert all(torch.equal(x, y.float()) for x, y in zip(default.state_dict().values(), again.state_dict().values()))
    as_file = lg.load(str(tmp_path / CONFIG_NAME), device="cpu", link_dtype="auto")  # a system file, links beside
    assert link_dtypes(as_file) == {torch.bfloat16}
    assert link_dtypes(lg.load(str(tmp_path), device="cpu", link_dtype="float16")) == {torch.float16}


def test_a_system_file_without_links_gets_fresh_links_in_the_named_dtype(saved, tmp_path):
    config = tmp_path / "system.json"
    config.write_text((saved / CONFIG_NAME).read_text())
    with pytest.warns(UserWarning, match="freshly initialised"):
        assert link_dtypes(lg.load(str(config), link_dtype="bfloat16")) == {torch.bfloat16}


@pytest.mark.parametrize("bad", ["bf16", "int8", torch.int32, torch.float8_e4m3fn, None])
def test_an_invalid_link_dtype_is_an_input_error_naming_the_values_allowed(published_hub, saved, bad):
    fix = "link_dtype must be 'auto' (each link in the dtype its file holds, as published) or a dtype links compute in"
    for load in (lambda: lg.load_style(STYLE, link_dtype=bad), lambda: lg.load("default", link_dtype=bad),
                 lambda: lg.load(str(saved), link_dtype=bad), lambda: lg.System.from_pretrained(saved, link_dtype=bad)):
        with pytest.raises(lg.InputError, match=f"{fix}.*got {bad!r}".replace("(", r"\(").replace(")", r"\)")):
            load()


def test_ray_workers_rebuild_links_in_the_drivers_dtype(saved):
    from latentgraph.evaluation.workers import rebuild, shipped

    system = lg.load(str(saved), device="cpu", link_dtype="bfloat16")
    checkpoint, dtypes = shipped(system, "cpu")
    replica = rebuild(checkpoint, dtypes, {}, {"device": "cpu"})
    assert link_dtypes(replica) == {torch.bfloat16}
    assert all(torch.equal(x, y) for x, y in zip(system.state_dict().values(), replica.state_dict().values()))


def test_cli_passes_link_dtype_and_convert_keeps_the_published_bf16(published_hub, saved, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from latentgraph.checkpoints import loading
    from latentgraph.cli import app

    result = CliRunner().invoke(app, ["convert", STYLE, str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    converted = read_weights(tmp_path / "out" / WEIGHTS_NAME)
    assert {t.dtype for t in converted.values()} == {torch.bfloat16}
    published = published_hub.inner[(STYLE, "planner", "math")]
    assert all(torch.equal(converted[f"planner.{key}"], value) for key, value in published.items())

    seen = []
    real = loading.load
    monkeypatch.setattr(loading, "load", lambda *a, **k: seen.append(k["link_dtype"]) or real(*a, **k))
    for args in (["run", "Q?", "--style", str(saved), "--greedy", "--max-new-tokens", "1", "--json"],
                 ["run", "Q?", "--style", str(saved), "--greedy", "--max-new-tokens", "1", "--link-dtype", "auto"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"}) + "\n")
    result = CliRunner().invoke(app, ["eval", "--style", str(saved), "--dataset", str(data), "--format", "gsm8k",
                                      "--output", str(tmp_path / "eval"), "--max-new-tokens", "1",
                                      "--link-dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert seen == ["float32", "auto", "bfloat16"]
