"""Bad input fails at build or validation time, with a message that names the culprit and the fix."""

import pytest
import torch
from torch import nn

import latentgraph as lg
from latentgraph.core.links import LinkConfig


@pytest.fixture
def make(tiny):
    """``make(name, prompt=..., hidden=64, **agent_kwargs)`` builds an agent on a tiny llama."""

    def agent(name, prompt="{question}", hidden=64, **kwargs):
        model, tokenizer = tiny("llama", hidden)
        return lg.Agent(name, model, tokenizer=tokenizer, prompt=prompt, latent_steps=2, **kwargs)

    return agent


def test_unknown_agent_in_an_edge(make):
    system = lg.System([make("a")], answer="a")
    with pytest.raises(lg.GraphError, match=r"edge 'a->ghost': unknown agent 'ghost'; agents are \['a'\]"):
        system.connect("a", "ghost")


def test_placeholder_without_an_edge(make):
    system = lg.System([make("a"), make("b", "{plan} {question}")], answer="b").connect("a", "b", slot="notes")
    with pytest.raises(lg.GraphError) as info:
        system.validate()
    message = str(info.value)
    assert "agent 'b' prompt has placeholder {plan} but no edge delivers slot 'plan'" in message
    assert "edge 'a->b' delivers slot 'notes' but agent 'b' prompt has no {notes}" in message


def test_forward_cycle_names_the_edge_and_the_cycle(make):
    system = lg.System([make("a", "{c}"), make("b", "{a}"), make("c", "{b}")], answer="c")
    system.connect("a", "b").connect("b", "c")
    cycle = r"edge 'c->a' closes a cycle of forward edges \(c -> a -> b -> c\).*feedback=True"
    with pytest.raises(lg.GraphError, match=cycle):
        system.connect("c", "a")
    with pytest.raises(lg.GraphError, match="edge 'a->a' closes a cycle"):
        system.connect("a", "a")


def test_no_answer_node(make):
    system = lg.System([make("a"), make("b", "{a}")]).connect("a", "b")
    with pytest.raises(lg.GraphError, match="no answer node: pass answer="):
        system.validate()
    system.answer = "zed"
    with pytest.raises(lg.GraphError, match="answer node 'zed' is not an agent"):
        system.validate()


def test_duplicate_agent_names(make):
    with pytest.raises(lg.GraphError, match="duplicate agent name 'a'"):
        lg.System([make("a"), make("a")])


@pytest.mark.parametrize("name", ["has space", "1st", "a-b", "a.b", ""])
def test_names_must_be_identifiers(make, name):
    with pytest.raises(lg.GraphError, match="agent name .* is not a Python identifier"):
        make(name)
    system = lg.System([make("a"), make("b")], answer="b")
    with pytest.raises(lg.GraphError, match="edge 'a->b' slot name .* is not a Python identifier"):
        system.connect("a", "b", slot=name)


def test_link_dims_must_match_the_backbones(make):
    system = lg.System([make("a", hidden=64), make("b", "{a}", hidden=48)], answer="b")
    with pytest.raises(lg.GraphError, match=r"edge 'a->b': link dims 48 -> 64 do not match the backbones \(64 -> 48\)"):
        system.connect("a", "b", link=LinkConfig(role="outer", in_dim=48, out_dim=64))
    with pytest.raises(lg.GraphError, match=r"edge 'a->b': the link module maps \(1, 1, 64\) to \(1, 1, 64\)"):
        system.connect("a", "b", link=nn.Linear(64, 64))
    system.connect("a", "b")
    system.links["a->b"] = nn.Linear(64, 32)  # swapped after the edge was made: caught by validate
    with pytest.raises(lg.GraphError, match=r"edge 'a->b': the link module maps \(1, 1, 64\) to \(1, 1, 32\)"):
        system.validate()
    with pytest.raises(lg.GraphError, match=r"agent 'c' inner link: link dims 32 -> 32 do not match"):
        make("c", inner_link=LinkConfig(role="inner", in_dim=32, out_dim=32))


@pytest.mark.parametrize("rounds", [0, -1, 1.5, True, "3"])
def test_rounds_must_be_positive(make, rounds):
    with pytest.raises(lg.GraphError, match="rounds must be an integer >= 1"):
        lg.System([make("a")], rounds=rounds)
    system = lg.System([make("a")])
    with pytest.raises(lg.GraphError, match="rounds must be an integer >= 1"):
        system.rounds = rounds
    assert system.rounds == 3


def test_latent_steps_must_not_be_negative(tiny):
    model, tokenizer = tiny("llama", 64)
    for bad in (-1, True, False, 2.0, "3"):
        with pytest.raises(lg.GraphError, match="agent 'a': latent_steps must be an integer >= 0"):
            lg.Agent("a", model, tokenizer=tokenizer, latent_steps=bad)
    agent = lg.Agent("a", model, tokenizer=tokenizer, latent_steps=0)
    with pytest.raises(lg.GraphError, match="agent 'a': latent_steps must be an integer >= 0, got True"):
        agent.latent_steps = True
    assert agent.latent_steps == 0


def test_feedback_needs_a_feedback_prompt_with_its_slot(make):
    system = lg.System([make("a"), make("b", "{a}")], answer="b").connect("a", "b")
    system.connect("b", "a", slot="fb", feedback=True)
    with pytest.raises(lg.GraphError, match=r"agent 'a' receives feedback \(b->a\) but has no feedback_prompt"):
        system.validate()
    system.agents["a"].feedback_prompt = "{question}"
    with pytest.raises(lg.GraphError, match="edge 'b->a' delivers slot 'fb' but agent 'a' feedback_prompt has no {fb}"):
        system.validate()
    system.agents["a"].prompt = "{fb} {question}"
    system.agents["a"].feedback_prompt = "{fb} {question}"
    with pytest.raises(lg.GraphError, match="agent 'a' prompt has {fb}, but edge 'b->a' is feedback"):
        system.validate()


def test_two_edges_into_one_slot(make):
    system = lg.System([make("a"), make("b"), make("c", "{x}")], answer="c")
    system.connect("a", "c", slot="x").connect("b", "c", slot="x")
    with pytest.raises(lg.GraphError, match=r"agent 'c' receives 2 edges into slot 'x' \(a->c, b->c\)"):
        system.validate()


def test_agents_that_never_run_or_are_unconnected(make):
    system = lg.System([make("a"), make("b", "{a}"), make("c"), make("d")], answer="d").connect("a", "b")
    with pytest.raises(lg.GraphError) as info:
        system.validate()
    assert "agent 'b' receives messages but never runs" in str(info.value)
    assert "agent 'c' is not connected" in str(info.value)


def test_edge_arguments(make):
    system = lg.System([make("a"), make("b", "{a} {question}")], answer="b").connect("a", "b")
    with pytest.raises(lg.GraphError, match=r"edge 'a->b' already exists; disconnect\('a', 'b'\) first"):
        system.connect("a", "b")
    with pytest.raises(lg.GraphError, match="slot 'question' is the task text"):
        system.connect("b", "a", slot="question", feedback=True)
    with pytest.raises(lg.GraphError, match=r"mode must be one of \['kv', 'latent', 'text'\], got 'pigeon'"):
        system.connect("b", "a", mode="pigeon", feedback=True)
    with pytest.raises(lg.GraphError, match="a kv edge fills no slot .*; drop slot="):
        system.connect("b", "a", mode="kv", slot="x", feedback=True)
    with pytest.raises(lg.GraphError, match="kv= does not apply to a text edge; drop it"):
        system.connect("b", "a", mode="text", kv="thoughts", feedback=True)
    with pytest.raises(lg.GraphError, match="edge 'b->a': kv='some'"):
        system.connect("b", "a", mode="kv", kv="some", feedback=True)
    with pytest.raises(lg.GraphError, match="a text edge carries no link"):
        system.connect("b", "a", mode="text", link="linear", feedback=True)
    with pytest.raises(lg.GraphError, match="no edge 'b->a'"):
        system.disconnect("b", "a")


def test_empty_batch_and_non_string_questions(make):
    system = lg.System([make("a")])
    with pytest.raises(lg.InputError, match="no questions"):
        system.run([])
    with pytest.raises(lg.InputError, match="questions must be strings"):
        system.run([3])


def test_prompt_longer_than_the_context_fails_before_any_forward(tiny):
    from latentgraph.testing import tiny_backbone

    model, tokenizer = tiny_backbone("qwen2", 64, max_positions=64)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    a = lg.Agent("a", model, tokenizer=tokenizer, latent_steps=8)
    b = lg.Agent("b", model, tokenizer=tokenizer, prompt="{a} {question}", latent_steps=8)
    system = lg.System([a, b], rounds=1, answer="b").connect("a", "b")
    with pytest.raises(lg.InputError, match=r"agent 'a': question 1 needs \d+ positions .* has 64; shorten"):
        system.run(["short", "long " * 30], max_new_tokens=16)
    assert calls == []


def test_non_finite_latents_are_reported(make):
    a = make("a")
    system = lg.System([a, make("b", "{a}")], answer="b").connect("a", "b")
    with torch.no_grad():
        a.inner_link.proj1.weight.fill_(float("nan"))
    with pytest.raises(lg.InputError, match="agent 'a' produced non-finite latents .* in round 1"):
        system.run("hi", max_new_tokens=2)


@pytest.mark.parametrize("questions, message", [
    (None, "run\\(\\) takes a question or a list of questions, got NoneType"),
    ({"a": 1}, "run\\(\\) takes a question or a list of questions, got dict"),
    (("q", 3), "questions must be strings; these are not: 1: int"),
])
def test_questions_must_be_a_string_or_a_list_of_strings(make, questions, message):
    system = lg.System([make("a")])
    with pytest.raises(lg.InputError, match=message):
        system.run(questions, max_new_tokens=1)


@pytest.mark.parametrize("settings, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got True"),
    ({"temperature": 0}, "temperature must be a number > 0 when sampling, got 0"),
    ({"top_p": 1.5}, "top_p must be a number in \\(0, 1\\], got 1.5"),
    ({"top_k": 0}, "top_k must be an integer >= 1 or None, got 0"),
])
def test_bad_decoding_settings_fail_before_any_forward(make, settings, message):
    a = make("a")
    calls = []
    a.model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(lg.InputError, match=message):
        lg.System([a]).run("hi", **settings)
    assert calls == []


@pytest.mark.parametrize("seed, shown", [
    ("x", "'x'"), (True, "True"), (1.5, "1.5"), (-1, "-1"), (2**64, str(2**64)),
    (99999999999999999999999, "99999999999999999999999"),
    (10**5000, "an integer of 16610 bits"),  # too long for Python to print: the message says its size
], ids=["text", "bool", "float", "negative", "2**64", "23 digits", "5001 digits"])
@pytest.mark.parametrize("call", ["run", "stream"])
def test_a_seed_torch_cannot_take_fails_before_any_forward(make, call, seed, shown):
    a = make("a")
    calls = []
    a.model.register_forward_pre_hook(lambda *_: calls.append(1))
    system = lg.System([a])
    with pytest.raises(lg.InputError, match=f"seed must be an integer from 0 to 2\\*\\*64 - 1, got {shown}"):
        getattr(system, call)("hi", seed=seed, max_new_tokens=2)
    assert calls == []


def test_the_largest_seed_torch_takes_seeds_sampling(make):
    system = lg.System([make("a")])
    first, again = (system.run(["hi", "ho"], seed=2**64 - 1, max_new_tokens=6).texts for _ in range(2))
    assert first == again


def test_latent_steps_and_rounds_are_checked_when_set_and_bools_are_not_counts(make):
    a = make("a")
    system = lg.System([a])
    for value in (-1, True, 1.5):
        with pytest.raises(lg.GraphError, match=f"agent 'a': latent_steps must be an integer >= 0, got {value}"):
            a.latent_steps = value
        with pytest.raises(lg.GraphError, match=f"rounds must be an integer >= 1, got {value}"):
            system.rounds = value
    with pytest.raises(lg.GraphError, match="latent_steps must be an integer >= 0, got True"):
        lg.Agent("b", a.model, tokenizer=a.tokenizer, latent_steps=True)
    with pytest.raises(lg.InputError, match="rounds must be an integer >= 1, got True"):
        system.run("hi", rounds=True, max_new_tokens=1)
    assert a.latent_steps == 2 and system.rounds == 3


def test_a_shared_loaded_model_cannot_take_a_second_dtype_or_device(tiny):
    model, tokenizer = tiny("llama", 32, seed=7)
    first = lg.Agent("a", model, tokenizer=tokenizer, dtype="float32")
    with pytest.raises(lg.GraphError, match="already in torch.float32 for another agent, which shares its weights; "
                                            "it cannot also be in torch.bfloat16"):
        lg.Agent("b", model, tokenizer=tokenizer, dtype="bfloat16")
    assert model.dtype == torch.float32 and first.backbone.dtype == torch.float32
    assert lg.Agent("c", model, tokenizer=tokenizer, dtype=torch.float32).backbone.dtype == torch.float32


@pytest.mark.parametrize("device, message", [
    ("gpu7", "unknown device 'gpu7'"),
    pytest.param("cuda", "CUDA is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_device_this_machine_lacks_is_an_input_error(tiny, device, message):
    model, tokenizer = tiny("llama", 32)
    with pytest.raises(lg.InputError, match=message):
        lg.Agent("a", "some/repo", device=device)
    with pytest.raises(lg.InputError, match=message):
        lg.Agent("a", model, tokenizer=tokenizer, device=device)


def test_bad_dtypes_and_backbone_types_are_graph_errors(tiny):
    model, tokenizer = tiny("llama", 32)
    with pytest.raises(lg.InputError, match="unknown dtype 'float33'"):
        lg.Agent("a", model, tokenizer=tokenizer, dtype="float33")
    with pytest.raises(lg.GraphError, match="a backbone is a hub id, a local directory or a loaded model, got 42"):
        lg.Agent("a", 42)


@pytest.mark.parametrize("path", ["/no/such/folder", "./models/gone", "~/gone/model", "a/b/c"])
def test_a_missing_local_folder_is_not_reported_as_a_hub_repo(path):
    with pytest.raises(lg.CheckpointError) as info:
        lg.Agent("a", path)
    assert f"backbone directory '{path}' does not exist; check the path" in str(info.value)
    assert "hf download" not in str(info.value)
