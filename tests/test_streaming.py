"""Token streaming: TokensDecoded events come live, one per decoding step, and each row's pieces add up exactly
to the text its AgentSpoke reports (held-back whitespace, multi-byte characters, tool results)."""

import gc
import threading

import pytest
import torch
from scripted import scripted_backbone
from systems import QUESTIONS
from test_tool_loop import PROMPTS, SCRIPT, WORDS, Calculator, Lookup

import latentgraph as lg
from latentgraph.core.detokenize import TextStream
from latentgraph.core.engine import InferenceStep, unroll
from latentgraph.core.events import AgentSpoke, AgentStarted, TokensDecoded
from latentgraph.core.sampling import Sampling
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
    """On a byte-level tokenizer the text is the tokens decoded at once, whatever bytes they hold."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, len(tokenizer), (30,)).tolist()  # lone continuation bytes, specials, spaces
        pieces, final = stream_tokens(tokenizer, ids)
        assert "".join(pieces) == final == tokenizer.decode(ids, skip_special_tokens=True).strip()


def sentencepiece_tokenizer():
    """A BPE tokenizer in the SentencePiece style: Metaspace, and byte fallback to <0xNN> tokens."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from latentgraph.testing import _CORPUS

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(_CORPUS.splitlines(), trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                                          special_tokens=["<unk>", "</s>"]))
    learned = json.loads(trained.to_str())["model"]
    vocab = dict(learned["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    bpe.add_special_tokens(["<unk>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="</s>")


def test_a_sentencepiece_style_tokenizer_streams_its_text_exactly():
    """Metaspace decoding drops the space of a text's first word, and byte fallback spells characters out of
    vocabulary as byte tokens: the decoded windows still add up to the text of all the tokens."""
    tokenizer = sentencepiece_tokenizer()
    text = "Step 1: héllo € 日本"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[1:]) != tokenizer.decode(ids)[len(tokenizer.decode(ids[:1])):]  # not concatenative
    assert "<0xE2>" in tokenizer.convert_ids_to_tokens(ids)
    pieces, final = stream_tokens(tokenizer, ids)
    assert "".join(pieces) == final == text
    torch.manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, len(tokenizer), (30,)).tolist()
        pieces, final = stream_tokens(tokenizer, ids)
        assert "".join(pieces) == final
        whole = tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert final == whole or "\ufffd" in whole  # the same text, but where bytes are not UTF-8


def test_a_stray_byte_after_a_shown_character_does_not_change_it():
    """Byte fallback decodes a run of byte tokens that is not UTF-8 as one U+FFFD per byte: "é" and a stray
    continuation byte decode together as three of them. What was shown stays."""
    tokenizer = sentencepiece_tokenizer()
    vocab = tokenizer.get_vocab()
    ids = tokenizer("Step 1: hé", add_special_tokens=False)["input_ids"] + [vocab["<0x82>"], vocab["l"]]
    assert tokenizer.decode(ids) == "Step 1: h\ufffd\ufffd\ufffdl"
    pieces, final = stream_tokens(tokenizer, ids)
    assert "".join(pieces) == final == "Step 1: hé\ufffdl"


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


def solver(backbone, tools=(Calculator(), Lookup())):
    """The scripted agent alone, with tools: its answers are known word for word (see test_tool_loop.py)."""
    agent = lg.Agent("solver", backbone.model, tokenizer=backbone.tokenizer, system_prompt=None, latent_steps=2,
                     tools=list(tools))
    return lg.System([agent], rounds=1)


def decode_with(system, questions, sampling, **step):
    """The solver's TokensDecoded events and its trace line, run with an InferenceStep of its own."""
    events = list(unroll(system.plan(), questions, InferenceStep(sampling, **step)))
    return [e for e in events if isinstance(e, TokensDecoded)], events[-1].output.trace[0]["solver"]


def assert_streamed_prefixes(decoded, texts):
    """At every step, what each row has shown so far begins its final text; in the end it is all of it."""
    shown = [""] * len(texts)
    for event in decoded:
        shown = [s + piece for s, piece in zip(shown, event.texts)]
        assert all(text.startswith(s) for s, text in zip(shown, texts)), (shown, texts)
    assert shown == texts


@pytest.mark.parametrize("stop, text, sampled", [
    (("c3",), "c1 c2", 3),
    (("c2 c",), "c1", 3),  # spans tokens: "c1 c2" is not shown until "c3" shows it is the stop string
    (("zz", "c4 c5", "c2 c4"), "c1 c2 c3", 5),
    ((" ",), "c1", 2),
])
def test_a_stop_string_ends_the_text_just_before_it(scripted_tools, stop, text, sampled):
    decoded, step = decode_with(solver(scripted_tools), ["gamma"], Sampling(do_sample=False, max_new_tokens=12,
                                                                           stop=stop))
    assert step.text == [text] and step.tokens_out == [sampled]
    assert_streamed_prefixes(decoded, step.text)
    assert not any(stop[0] in "".join(e.texts[0] for e in decoded[:n]) for n in range(len(decoded) + 1))


def test_rows_stop_on_their_own_strings_tool_results_included(scripted_tools):
    system = solver(scripted_tools)
    settings = [Sampling(do_sample=False, max_new_tokens=12, stop=stop) for stop in (("so",), ("paris",), ())]
    decoded, step = decode_with(system, PROMPTS, settings)
    assert step.text == ["a1 a2 <calc> 6*7 </calc> <result> 42 </result>",  # cut before "so"
                         "b1 <search> capital </search> <result>",  # the stop string came in the tool's answer
                         "c1 c2 c3 c4 c5"]
    assert_streamed_prefixes(decoded, step.text)
    for i, question in enumerate(PROMPTS):
        _, alone = decode_with(system, [question], [settings[i]])
        assert (alone.text, alone.tokens_out) == ([step.text[i]], [step.tokens_out[i]])


def test_a_stop_string_inside_a_sampled_token_cuts_the_text_there(tiny):
    """On a byte-level BPE whose tokens span several characters, a stop string may begin inside a token."""
    model, tokenizer = tiny("qwen3", 48)
    agent = lg.Agent("solver", model, tokenizer=tokenizer, latent_steps=2)
    system = lg.System([agent], rounds=1)
    settings = {"temperature": 1.5, "seed": 4, "max_new_tokens": 16}
    free = system.run(QUESTIONS, **settings).texts
    stops = [(text[5:8],) for text in free]  # three characters from the middle of each row's text
    assert all(len(s[0]) == 3 for s in stops)
    events = list(unroll(system.plan(), QUESTIONS, InferenceStep([Sampling(temperature=1.5, max_new_tokens=16,
                                                                           stop=s) for s in stops], seed=4)))
    texts = events[-1].output.texts
    assert texts == [text[:text.find(s[0])].strip() for text, s in zip(free, stops)]
    assert_streamed_prefixes([e for e in events if isinstance(e, TokensDecoded)], texts)


@pytest.mark.parametrize("stop, message", [
    (("",), "stop strings must not be empty"),
    (("a", "b", "c", "d", "e"), "stop takes at most 4 strings, got 5"),
    (("x" * 101,), "at most 100 characters, got 101"),
    ((3,), "stop must be a string or a list of strings"),
    (None, "stop must be a string or a list of strings"),
])
def test_bad_stop_strings_are_refused(stop, message):
    with pytest.raises(lg.InputError, match=message):
        Sampling(stop=stop)


def test_one_stop_string_or_a_list_is_kept_as_a_tuple():
    assert Sampling(stop="\n").stop == ("\n",) and Sampling(stop=["a", "b"]).stop == ("a", "b")
    assert Sampling(stop=["a"]) == Sampling(stop=("a",))


def cancel_after(events, step, agent, row, steps):
    """Drain ``events``, cancelling ``row`` from another thread once ``agent`` has decoded ``steps`` steps."""
    seen = []
    for event in events:
        seen.append(event)
        if isinstance(event, TokensDecoded) and event.agent == agent:
            steps -= 1
            if steps == 0:
                canceller = threading.Thread(target=step.cancel, args=(row,))
                canceller.start()
                canceller.join()
    return seen


def test_a_cancelled_row_ends_at_the_next_step_and_the_others_go_on(scripted_tools):
    system = solver(scripted_tools)
    greedy = Sampling(do_sample=False, max_new_tokens=12)
    _, full = decode_with(system, PROMPTS, greedy)
    step = InferenceStep(greedy)
    events = cancel_after(unroll(system.plan(), PROMPTS, step), step, "solver", row=2, steps=2)
    decoded = [e for e in events if isinstance(e, TokensDecoded)]
    cut = events[-1].output.trace[0]["solver"]
    assert cut.tokens_out[2] == 2 and cut.text[2] == "c1 c2"  # what it had when it was cancelled
    assert [e.finished[2] for e in decoded[:3]] == [False, False, True]
    assert cut.text[:2] == full.text[:2] and cut.tokens_out[:2] == full.tokens_out[:2]
    assert_streamed_prefixes(decoded, cut.text)


def test_cancelling_every_row_ends_decoding_without_another_forward(scripted_tools):
    system = solver(scripted_tools)
    forwards = []
    system.agents["solver"].model.register_forward_pre_hook(lambda *_: forwards.append(1))
    step = InferenceStep(Sampling(do_sample=False, max_new_tokens=12))
    events = unroll(system.plan(), PROMPTS[:1], step)
    events = cancel_after(events, step, "solver", row=0, steps=3)
    decoded = [e for e in events if isinstance(e, TokensDecoded)]
    assert len(forwards) == 3  # the prompt and two tokens: the third token's forward never ran
    assert [e.finished for e in decoded] == [[False]] * 3 + [[True]]
    assert events[-1].output.texts == ["a1 a2 <calc>"]


def test_a_row_cancelled_while_one_agent_speaks_ends_at_once_in_the_next(tiny):
    system = text_edge_system(tiny, "llama")
    full = system.run(QUESTIONS[:2], do_sample=False, max_new_tokens=6).trace[0]
    step = InferenceStep(Sampling(do_sample=False, max_new_tokens=6))
    events = cancel_after(unroll(system.plan(), QUESTIONS[:2], step), step, "planner", row=0, steps=1)
    trace = events[-1].output.trace[0]
    assert trace["planner"].tokens_out[0] == 1 and trace["solver"].tokens_out[0] == 0
    assert trace["solver"].text[0] == "" and trace["solver"].text[1] == full["solver"].text[1]
    solver_steps = [e for e in events if isinstance(e, TokensDecoded) and e.agent == "solver"]
    assert solver_steps[0].finished == [True, False]


@pytest.mark.parametrize("row", [-1, 3, "0", 1.0])
def test_cancel_takes_a_row_of_the_batch(scripted_tools, row):
    step = InferenceStep(Sampling())
    events = unroll(solver(scripted_tools).plan(), PROMPTS, step)
    next(events)
    with pytest.raises(lg.InputError, match=r"cancel\(\) takes the index of a question in the batch \(0 to 2\)"):
        step.cancel(row)
