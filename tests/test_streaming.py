"""Token streaming: TokensDecoded events come live, one per decoding step, and each row's pieces add up exactly
to the text its AgentSpoke reports (held-back whitespace, multi-byte characters, tool results)."""

import gc

import pytest
import torch
from scripted import scripted_backbone
from systems import QUESTIONS
from test_tool_loop import PROMPTS, SCRIPT, WORDS, Calculator, Lookup

import latentgraph as lg
from latentgraph.core.detokenize import TextStream, reported
from latentgraph.core.engine import unroll
from latentgraph.core.events import AgentSpoke, AgentStarted, TokensDecoded
from latentgraph.testing import tiny_tokenizer
from latentgraph.training.data import TrainExample
from latentgraph.training.objectives import TrainingStep


def text_edge_system(tiny, arch, latent_steps=2):
    """planner --text--> solver: both decode, the planner for its message and the solver for the answer."""
    model, tokenizer = tiny(arch, 48)
    planner = lg.Agent("planner", model, "Plan: {question}", tokenizer=tokenizer, latent_steps=latent_steps)
    solver = lg.Agent("solver", model, "{planner} {question}", tokenizer=tokenizer, latent_steps=latent_steps)
    return lg.System([planner, solver], rounds=1, answer="solver").connect("planner", "solver", mode="text")


def pieces_by_turn(events):
    """Per (round, agent): each row's streamed pieces joined, the rows' finished flags per step, and the texts its
    AgentSpoke reported."""
    turns, current = {}, None
    for event in events:
        if isinstance(event, AgentStarted):
            current = (event.round, event.agent)
        elif isinstance(event, TokensDecoded):
            assert (event.round, event.agent) == current  # between the agent's start and its AgentSpoke
            joined, flags, _ = turns.setdefault(current, ([""] * len(event.texts), [], None))
            for i, piece in enumerate(event.texts):
                joined[i] += piece
            flags.append(event.finished)
        elif isinstance(event, AgentSpoke):
            assert (event.round, event.agent) == current
            joined, flags, _ = turns.get(current, (None, [], None))
            turns[current] = (joined, flags, event.texts)
    return turns


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "qwen3_5_text"])
def test_each_rows_pieces_add_up_to_its_spoken_text(tiny, arch):
    """Sampling at temperature 2 from a random model writes stray bytes, split characters and whitespace."""
    events = list(text_edge_system(tiny, arch).stream(QUESTIONS, temperature=2.0, top_p=1.0, seed=3,
                                                       max_new_tokens=24))
    turns = pieces_by_turn(events)
    assert list(turns) == [(1, "planner"), (1, "solver")]
    for joined, flags, texts in turns.values():
        assert joined == texts
        assert all(flags[-1]) and not all(flags[0])  # every row ends, and not all at the first step
        for before, after in zip(flags, flags[1:]):  # a row that has ended stays ended
            assert all(a for b, a in zip(before, after) if b)
    output = events[-1].output
    assert turns[(1, "solver")][2] == output.texts
    assert [len(f) for _, f, _ in turns.values()] == [max(output.trace[0][a].tokens_out) for a in ("planner", "solver")]


def test_pieces_come_live_as_tokens_are_decoded(tiny):
    system = text_edge_system(tiny, "llama")
    forwards = []
    system.agents["planner"].model.register_forward_pre_hook(lambda *_: forwards.append(1))  # the solver's too
    seen = {}
    for event in system.stream(QUESTIONS[:2], do_sample=False, max_new_tokens=6):
        if isinstance(event, AgentStarted):
            start = len(forwards)
        elif isinstance(event, TokensDecoded):
            seen.setdefault(event.agent, []).append(len(forwards) - start)
    # the k-th step's event comes after the prompt's forward and k - 1 token forwards, before the next one
    assert seen == {agent: list(range(1, len(steps) + 1)) for agent, steps in seen.items()}
    assert list(seen) == ["planner", "solver"] and len(seen["planner"]) > 1


def test_tool_results_stream_with_the_text(scripted_tools):
    agent = lg.Agent("solver", scripted_tools.model, tokenizer=scripted_tools.tokenizer, system_prompt=None,
                     latent_steps=2, tools=[Calculator(), Lookup()])
    events = list(lg.System([agent], rounds=1).stream(PROMPTS, do_sample=False, max_new_tokens=12))
    ((joined, flags, texts),) = pieces_by_turn(events).values()
    assert joined == texts
    assert texts[0] == "a1 a2 <calc> 6*7 </calc> <result> 42 </result> so done"
    assert len(flags) == 11  # one event per step, fed result tokens included


@pytest.fixture(scope="module")
def scripted_tools():
    from latentgraph.core.backbone import get_backbone

    model, tokenizer = scripted_backbone(SCRIPT, WORDS)
    return get_backbone(model, tokenizer=tokenizer)


def stream_tokens(tokenizer, ids, stops=()):
    """Feed ``ids`` one token at a time through a one-row TextStream; its pieces and its final text."""
    stream = TextStream(tokenizer, [stops])
    pieces = []
    for n in range(1, len(ids) + 1):
        stream.add(0, ids[:n])
        pieces.append(stream.step([ids[:n]], [False]).texts[0])
    pieces.append(stream.step([ids], [True]).texts[0])
    return pieces, stream.texts[0]


def test_a_character_split_over_tokens_is_shown_once_complete():
    tokenizer = tiny_tokenizer()
    text = "  héllo € 日本 wörld \n "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode(ids[:n]) for n in range(len(ids)))  # the tokens do split characters
    pieces, final = stream_tokens(tokenizer, ids)
    assert final == text.strip() == "".join(pieces)
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[-1] == ""  # nothing was held back at the end but whitespace, which the strip drops
    assert "".join(pieces[:3]) == "h"  # leading whitespace is never shown


def test_stray_bytes_and_special_tokens_stream_as_their_decoded_text():
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, len(tokenizer), (30,)).tolist()  # lone continuation bytes, specials, spaces
        pieces, final = stream_tokens(tokenizer, ids)
        assert "".join(pieces) == final == reported(tokenizer, ids)


def test_training_emits_no_token_events(tiny):
    system = text_edge_system(tiny, "llama")
    system.disconnect("planner", "solver").connect("planner", "solver")  # training needs latent edges
    examples = [TrainExample("What is 17 * 23?", "The answer is 391.", plan="Multiply.")]
    events = list(unroll(system.plan(), [ex.question for ex in examples], TrainingStep(examples)))
    assert [type(e).__name__ for e in events if isinstance(e, (TokensDecoded, AgentSpoke))] == ["AgentSpoke"]


def live_caches():
    from transformers import DynamicCache

    gc.collect()
    return [o for o in gc.get_objects() if issubclass(type(o), DynamicCache)]  # type(): no lazy-module lookups


def test_an_abandoned_stream_frees_its_cache(tiny):
    system = text_edge_system(tiny, "qwen3_5_text")
    assert live_caches() == []
    events = system.stream(QUESTIONS, do_sample=False, max_new_tokens=8)
    for event in events:
        if isinstance(event, TokensDecoded) and event.agent == "solver":
            break
    assert len(live_caches()) == 1  # the solver's, half-way through its decoding
    events.close()
    assert live_caches() == []
    events = system.stream(QUESTIONS, do_sample=False, max_new_tokens=8)
    next(e for e in events if isinstance(e, TokensDecoded))
    del events  # dropped without close(): garbage collected
    assert live_caches() == []
