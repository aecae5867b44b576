"""The per-row tool loop inside decoding, driven by a tiny llama that follows a script (see scripted.py)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from scripted import scripted_backbone

import latentgraph as lg
from latentgraph.core.backbone import get_backbone
from latentgraph.core.speak import Sampling, generate, run_to_end
from latentgraph.tools import Tool

# Row "alpha" calls the calculator after 4 tokens, row "beta" searches after 3, row "gamma" never calls.
SCRIPT = {
    "alpha": "a1", "a1": "a2", "a2": "<calc>", "<calc>": "6*7", "6*7": "</calc>", "</calc>": "so",
    "beta": "b1", "b1": "<search>", "<search>": "capital", "capital": "</search>", "</search>": "so",
    "gamma": "c1", "c1": "c2", "c2": "c3", "c3": "c4", "c4": "c5",
    "</result>": "so", "so": "done",
}
WORDS = ["question", "about", "<result>", "42", "paris", "error:"]
PROMPTS = ["question alpha", "a question about beta", "gamma"]  # different lengths: left padding


class Calculator(Tool):
    name, tag, description = "calculator", "calc", "evaluates arithmetic"

    def run(self, text: str) -> str:
        return str(eval(text, {"__builtins__": {}}))  # the scripted input is "6*7"


class Lookup(Tool):
    name, tag, description = "lookup", "search", "looks a word up"

    def run(self, text: str) -> str:
        return {"capital": "paris"}[text]


@pytest.fixture(scope="module")
def scripted():
    model, tokenizer = scripted_backbone(SCRIPT, WORDS)
    return get_backbone(model, tokenizer=tokenizer)


def encode(backbone, prompts):
    """Left-padded prompt embeddings (B, L, H) and mask (B, L)."""
    ids = [backbone.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    length = max(map(len, ids))
    embeds = torch.stack([F.pad(backbone.embed(torch.tensor(x)), (0, 0, length - len(x), 0)) for x in ids])
    mask = torch.tensor([[0] * (length - len(x)) + [1] * len(x) for x in ids])
    return embeds, mask


def decode(backbone, generation):
    return backbone.tokenizer.decode(generation.ids)


GREEDY = Sampling(do_sample=False, max_new_tokens=12)


def test_rows_call_tools_at_their_own_steps_and_results_are_spliced_in(scripted):
    rows = run_to_end(generate(scripted, *encode(scripted, PROMPTS), GREEDY, tools=[Calculator(), Lookup()]))
    texts = [decode(scripted, g) for g in rows]
    assert texts[0] == "a1 a2 <calc> 6*7 </calc> <result> 42 </result> so done <eos>"
    assert texts[1] == "b1 <search> capital </search> <result> paris </result> so done <eos>"
    assert texts[2] == "c1 c2 c3 c4 c5 <eos>"
    assert [(c.tool, c.input, c.output, c.step) for c in rows[0].calls] == [("calculator", "6*7", "42", 4)]
    assert [(c.tool, c.input, c.output, c.step) for c in rows[1].calls] == [("lookup", "capital", "paris", 3)]
    assert rows[2].calls == []
    assert all(c.seconds >= 0 for g in rows for c in g.calls)
    # the budget counts the model's tokens, not the fed results
    assert [g.sampled for g in rows] == [8, 7, 6]
    assert [len(g.ids) for g in rows] == [11, 10, 6]


def test_a_row_without_calls_decodes_as_if_alone_and_without_tools(scripted):
    together = run_to_end(generate(scripted, *encode(scripted, PROMPTS), GREEDY, tools=[Calculator(), Lookup()]))
    alone = run_to_end(generate(scripted, *encode(scripted, PROMPTS[2:]), GREEDY, tools=[Calculator(), Lookup()]))
    no_tools = run_to_end(generate(scripted, *encode(scripted, PROMPTS), GREEDY))
    assert together[2].ids == alone[0].ids == no_tools[2].ids
    # without tools nothing is fed: the closing tag is followed by the script
    assert decode(scripted, no_tools[0]) == "a1 a2 <calc> 6*7 </calc> so done <eos>"


def test_the_cached_continuation_equals_a_full_re_encode(scripted):
    """Logits at every step of the tool loop equal those of one full forward over prompt + output."""
    embeds, mask = encode(scripted, PROMPTS)
    seen = []
    hook = scripted.model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out[:, -1]))
    try:
        rows = run_to_end(generate(scripted, embeds, mask, GREEDY, tools=[Calculator(), Lookup()]))
    finally:
        hook.remove()
    cached = torch.stack(seen, dim=1)  # (B, steps, V): step s predicts token s
    for i, row in enumerate(rows):
        prompt = embeds[i, mask[i].bool()]  # (L_i, H)
        sequence = torch.cat([prompt, scripted.embed(torch.tensor(row.ids[:-1]))])[None]  # (1, L_i + n - 1, H)
        with torch.no_grad():
            full = scripted.model(inputs_embeds=sequence, use_cache=False).logits[0, len(prompt) - 1:]  # (n, V)
        assert (cached[i, : len(row.ids)] - full).abs().max().item() <= 1e-4
        assert full.argmax(-1).tolist() != row.ids or not row.calls  # fed results are not what the model chose


def test_the_tool_call_budget_is_per_row(scripted):
    rows = run_to_end(generate(scripted, *encode(scripted, PROMPTS), GREEDY, tools=[Calculator(), Lookup()],
                                      max_tool_calls=0))
    assert [c.output.startswith("error: the limit of 0 tool calls") for c in rows[0].calls + rows[1].calls] == [
        True, True]


def test_a_result_that_does_not_fit_the_context_ends_the_row(scripted):
    model, tokenizer = scripted_backbone(SCRIPT, WORDS, max_positions=2 + 12 + 2)  # prompt 2, no room for results
    small = get_backbone(model, tokenizer=tokenizer)
    (row,) = run_to_end(generate(small, *encode(small, ["question alpha"]), GREEDY, tools=[Calculator()]))
    assert decode(small, row) == "a1 a2 <calc> 6*7 </calc>"
    assert [(c.input, c.output) for c in row.calls] == [("6*7", "")]


def test_an_agent_with_tools_records_its_calls_in_the_trace(scripted):
    agent = lg.Agent("solver", scripted.model, tokenizer=scripted.tokenizer, system_prompt=None, latent_steps=2,
                     tools=[Calculator(), Lookup()])
    out = lg.System([agent], answer="solver", rounds=1).run(PROMPTS, do_sample=False, max_new_tokens=12)
    step = out.trace[0]["solver"]
    assert out.texts[0] == "a1 a2 <calc> 6*7 </calc> <result> 42 </result> so done"
    assert [[c.tool for c in calls] for calls in step.tool_calls] == [["calculator"], ["lookup"], []]
    assert step.tokens_out == [8, 7, 6]


@pytest.mark.parametrize("tools, message", [
    ([Calculator(), Calculator()], "share the tag <calc>"),
    (["python"], "must be latentgraph.Tool instances"),
    ([type("Bad", (Calculator,), {"tag": "result"})()], "'result' is taken"),
    ([type("Bad", (Calculator,), {"tag": "two words"})()], "a tag is a word"),
])
def test_bad_tools_are_refused_when_the_agent_is_built(scripted, tools, message):
    with pytest.raises(lg.GraphError, match=message):
        lg.Agent("solver", scripted.model, tokenizer=scripted.tokenizer, tools=tools)


# The deliberation tool-caller, scripted: Python first, then search, then search again past its budget.
DELIBERATION_SCRIPT = {
    "\\boxed{}.": "<python>", "<python>": "print(6*7)", "print(6*7)": "</python>", "</python>": "so",
    "</result>": "<search>", "<search>": "capital", "capital": "</search>", "</search>": "so",
}


def test_deliberation_runs_with_the_python_and_search_tools(published_hub):
    from latentgraph.tools import BM25Search, PythonTool

    model, tokenizer = scripted_backbone(DELIBERATION_SCRIPT, ["<result>"])
    search = BM25Search(["Paris is the capital of France.", "The Nile is a river in Africa."], k=1)
    with pytest.warns(UserWarning, match="backbones replaced"):
        system = lg.load_style("deliberation", backbones={"toolcaller": (model, tokenizer)},
                               tools=[PythonTool(require=()), search])  # runs code wherever it is
    toolcaller = system.agents["toolcaller"]
    toolcaller.max_tool_calls = 2
    for agent in system.agents.values():
        agent.latent_steps = 4
    assert "<python>...</python>" in toolcaller.system_prompt and "<search>...</search>" in toolcaller.system_prompt

    out = system.run(["What is 6 * 7?", "What is the capital of France?"], rounds=2, do_sample=False,
                     max_new_tokens=12)
    assert [list(steps) for steps in out.trace] == [["reflector", "toolcaller"]] * 2
    for calls in out.trace[-1]["toolcaller"].tool_calls:
        assert [(c.tool, c.input) for c in calls] == [("python", "print(6*7)"), ("bm25_search", "capital"),
                                                       ("bm25_search", "capital")]
        assert calls[0].output == "42"
        assert "Paris is the capital of France." in calls[1].output
        assert calls[2].output.startswith("error: the limit of 2 tool calls")
    assert out.texts[0].startswith("<python> print(6*7) </python> <result>")


def test_deliberation_answers_without_the_python_tool_when_its_sandbox_is_unavailable(published_hub, monkeypatch):
    import shutil

    import latentgraph.tools.sandbox as sandbox_module

    which = shutil.which  # as on a machine without bubblewrap
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "bwrap" else which(name))
    monkeypatch.setattr(sandbox_module, "_WARNED", set(), raising=False)
    model, tokenizer = scripted_backbone(DELIBERATION_SCRIPT, ["<result>"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        system = lg.load_style("deliberation", backbones={"toolcaller": (model, tokenizer)})
    (warning,) = [str(w.message) for w in caught if w.category is RuntimeWarning]  # and "backbones replaced"
    assert "apt-get install bubblewrap" in warning and "PythonTool(require=())" in warning
    for agent in system.agents.values():
        agent.latent_steps = 4

    out = system.run(["What is 6 * 7?"], rounds=2, do_sample=False, max_new_tokens=8)
    (calls,) = out.trace[-1]["toolcaller"].tool_calls
    assert calls[0].tool == "python" and calls[0].input == "print(6*7)"
    assert calls[0].output.startswith("error: the python tool is unavailable here (its sandbox lacks filesystem")
    assert calls[0].output.endswith("answer without it") and "42" not in out.texts[0]


def test_tools_go_only_to_styles_with_a_tool_agent(published_hub):
    with pytest.raises(lg.InputError, match="has no agent that uses tools.*deliberation"):
        lg.load_style("sequential_light", tools=[Calculator()])
    assert lg.load_style("deliberation", tools=[]).agents["toolcaller"].tools == []


def test_tools_set_later_are_checked_too(scripted):
    agent = lg.Agent("solver", scripted.model, tokenizer=scripted.tokenizer)
    agent.tools = [Calculator()]
    assert [t.tag for t in agent.tools] == ["calc"]
    with pytest.raises(lg.GraphError, match="share the tag <calc>"):
        agent.tools = [Calculator(), Calculator()]
