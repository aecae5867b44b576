"""The OpenAI-compatible server on a tiny system, through the official ``openai`` client: every answer equals the
system's answer to the same question alone, plain or streamed, alone or batched with others."""

import gc
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from serving import WAIT, Gate, running, wait_until
from systems import sequential

from latentgraph.core.engine import InferenceStep, unroll
from latentgraph.core.sampling import Sampling
from latentgraph.serve.limits import Limits
from latentgraph.serve.protocol import question_of
from latentgraph.serve.records import event_record

QUESTION = "What is 17 * 23?"


@pytest.fixture(scope="module")
def system(tiny):
    torch.manual_seed(0)
    return sequential(tiny)


@pytest.fixture(scope="module")
def served(system):
    with running(system, limits=Limits(max_batch_size=16, batch_wait_ms=20, max_n=4)) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.api, api_key="unused", max_retries=0, timeout=WAIT)


def alone(system, question, max_tokens=8, **sampling):
    """The system's answer to ``question`` alone: greedy unless sampling settings are given."""
    return system.run([question], max_new_tokens=max_tokens, **({"do_sample": False} | sampling))


def chat(client, question, **options):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                          **options)


def test_models_lists_the_system_under_its_name(client, served):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(served.url + "/health").json() == {"status": "ok", "model": "tiny"}


def test_a_greedy_chat_equals_the_run_alone_and_counts_its_tokens(client, system):
    out = alone(system, QUESTION, max_tokens=8)
    answer = chat(client, QUESTION, temperature=0, max_tokens=8)
    final = out.trace[-1][system.answer]
    assert answer.choices[0].message.content == out.texts[0]
    assert answer.choices[0].message.role == "assistant" and answer.model == "tiny"
    assert answer.choices[0].finish_reason == ("length" if final.tokens_out[0] == 8 else "stop")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (final.tokens_in[0], final.tokens_out[0])
    assert answer.usage.total_tokens == final.tokens_in[0] + final.tokens_out[0]


def test_earlier_turns_and_a_system_message_come_before_the_question_as_a_transcript(client, system):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    question = "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello\n\n" + QUESTION
    expected = alone(system, question, max_tokens=6).texts[0]
    answer = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=6)
    assert answer.choices[0].message.content == expected


def test_the_transcript_format():
    from latentgraph.serve.protocol import ChatRequest

    request = ChatRequest.model_validate_json(json.dumps({"model": "m", "messages": [
        {"role": "developer", "content": "Rule"}, {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]}))
    assert question_of(request.messages) == "System: Rule\n\nUser: Q1\n\nAssistant: A1\n\nQ2"
    single = ChatRequest.model_validate_json(json.dumps({"model": "m", "messages": [{"role": "user", "content": "Q"}]}))
    assert question_of(single.messages) == "Q"


def test_a_stream_concatenates_to_the_plain_answer_with_no_extra_chunks(client, system):
    expected = alone(system, QUESTION, max_tokens=8)
    chunks = list(chat(client, QUESTION, temperature=0, max_tokens=8, stream=True))
    assert all(c.object == "chat.completion.chunk" and len(c.choices) == 1 for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.texts[0]
    assert [c.choices[0].finish_reason for c in chunks][-1] in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all("latentgraph" not in (c.model_extra or {}) for c in chunks)


def test_a_stream_with_include_usage_ends_with_the_usage(client, system):
    final = alone(system, QUESTION, max_tokens=5).trace[-1][system.answer]
    chunks = list(chat(client, QUESTION, temperature=0, max_tokens=5, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (final.tokens_in[0],
                                                                                   final.tokens_out[0])


def test_events_come_as_extra_chunks_only_when_asked(client, system):
    run = [event_record(e, 0) for e in system.stream([QUESTION], do_sample=False, max_new_tokens=4)]
    expected = [(0, r["type"], r["round"], r.get("agent"), r.get("text")) for r in run if r is not None]
    chunks = list(chat(client, QUESTION, temperature=0, max_tokens=4, stream=True,
                       extra_body={"latentgraph": {"events": True}}))
    extra = [c.model_extra["latentgraph"] for c in chunks if not c.choices]
    assert [(r["index"], r["event"]["type"], r["event"]["round"], r["event"].get("agent"), r["event"].get("text"))
            for r in extra] == expected
    assert {"AgentThought", "TokensDecoded", "AgentSpoke", "MessageDelivered"} <= {e[1] for e in expected}
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert answer == alone(system, QUESTION, max_tokens=4).texts[0]
    whole = chat(client, QUESTION, temperature=0, max_tokens=4, extra_body={"latentgraph": {"events": True}})
    assert [r["event"]["type"] for r in whole.model_extra["latentgraph"]["events"]] == [e[1] for e in expected]


def test_seeded_sampling_and_n_choices_equal_their_runs_alone(client, system):
    expected = [alone(system, QUESTION, max_tokens=8, do_sample=True, temperature=0.9, top_p=1.0, seed=11 + i).texts[0]
                for i in range(3)]
    answer = chat(client, QUESTION, temperature=0.9, max_tokens=8, seed=11, n=3)
    assert [c.message.content for c in answer.choices] == expected and [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage.prompt_tokens == alone(system, QUESTION, max_tokens=8).trace[-1][system.answer].tokens_in[0]


def stopped(system, question, max_tokens, stop):
    """The greedy answer alone, with stop strings (``System.run`` takes none: the engine's own step does)."""
    sampling = Sampling(do_sample=False, max_new_tokens=max_tokens, stop=stop)
    *_, finished = unroll(system.plan(), [question], InferenceStep(sampling))
    return finished.output.texts[0]


def test_stop_cuts_the_answer_before_the_first_stop_string(client, system):
    full = alone(system, QUESTION, max_tokens=12).texts[0]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = stopped(system, QUESTION, 12, [stop, "\x00never"])
    assert expected == full[:full.index(stop)].strip()
    answer = chat(client, QUESTION, temperature=0, max_tokens=12, stop=[stop, "\x00never"])
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"


def test_text_completions_take_the_prompt_as_the_question(client, system):
    questions = [QUESTION, "Why?"]
    expected = [alone(system, q, max_tokens=6) for q in questions]
    answer = client.completions.create(model="tiny", prompt=questions, temperature=0, max_tokens=6)
    assert answer.object == "text_completion"
    assert [c.text for c in answer.choices] == [out.texts[0] for out in expected]
    finals = [out.trace[-1][system.answer] for out in expected]
    assert answer.usage.prompt_tokens == sum(f.tokens_in[0] for f in finals)
    assert answer.usage.completion_tokens == sum(f.tokens_out[0] for f in finals)
    streamed = client.completions.create(model="tiny", prompt=QUESTION, temperature=0, max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected[0].texts[0]


def test_requests_with_different_settings_batched_together_each_equal_their_run_alone(client, system, served):
    requests = [dict(question=f"What is {i} + {i}?", temperature=0, max_tokens=4 + i % 3) for i in range(4)]
    requests += [dict(question=f"Why {i}?", temperature=0.8, max_tokens=6, seed=i) for i in range(4)]
    requests += [dict(question=QUESTION, temperature=0, max_tokens=10, stop=["a"])]
    expected = []
    for r in requests:
        settings = dict(do_sample=True, temperature=r["temperature"], top_p=1.0, seed=r["seed"]) if "seed" in r else {}
        expected.append(stopped(system, r["question"], r["max_tokens"], r["stop"]) if "stop" in r else
                        alone(system, r["question"], max_tokens=r["max_tokens"], **settings).texts[0])
    batches = served.metric("latentgraph_batch_size_count"), served.metric("latentgraph_batch_size_sum")
    with Gate(system.agents["planner"]) as gate, ThreadPoolExecutor(len(requests) + 1) as pool:
        blocker = pool.submit(chat, client, "Hold on", temperature=0, max_tokens=1)
        assert gate.entered.wait(WAIT)
        answers = [pool.submit(lambda r: chat(client, **r).choices[0].message.content, r) for r in requests]
        wait_until(lambda: served.service.batcher.depth == len(requests), "every request to queue up")
        gate.open()
        assert [a.result(WAIT) for a in answers] == expected
        blocker.result(WAIT)
    # the blocker alone, then every request in one batch, whatever its settings
    assert (served.metric("latentgraph_batch_size_count") - batches[0],
            served.metric("latentgraph_batch_size_sum") - batches[1]) == (2, 1 + len(requests))


def test_64_concurrent_streams_each_equal_their_answer_alone(client, system, served):
    questions = [f"What is {i} * {i % 7}?" for i in range(16)]
    expected = {q: alone(system, q, max_tokens=6).texts[0] for q in questions}
    batches = served.metric("latentgraph_batch_size_count"), served.metric("latentgraph_batch_size_sum")

    def streamed(question):
        return "".join(c.choices[0].delta.content or "" for c in chat(client, question, temperature=0, max_tokens=6,
                                                                      stream=True))

    with Gate(system.agents["planner"]) as gate, ThreadPoolExecutor(65) as pool:
        blocker = pool.submit(chat, client, "Hold on", temperature=0, max_tokens=1)
        assert gate.entered.wait(WAIT)
        answers = [(q, pool.submit(streamed, q)) for q in questions * 4]
        wait_until(lambda: served.service.batcher.depth == 64, "64 requests to queue up")
        assert served.metric("latentgraph_queue_depth") == 64
        gate.open()
        assert all(answer.result(WAIT) == expected[q] for q, answer in answers)
        blocker.result(WAIT)
    # the blocker alone, then the 64 in four batches of --max-batch-size 16
    assert (served.metric("latentgraph_batch_size_count") - batches[0],
            served.metric("latentgraph_batch_size_sum") - batches[1]) == (5, 65)


def test_a_client_that_goes_away_is_cancelled_and_the_server_goes_on(client, system, served):
    cancelled = served.metric("latentgraph_rows_cancelled_total")
    tokens = served.metric('latentgraph_tokens_total{kind="completion"}')
    ended = served.metric('latentgraph_requests_total{path="/v1/chat/completions",status="200"}')
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "stream": True}
    with Gate(system.agents["planner"]) as gate:
        with httpx.stream("POST", served.api + "/chat/completions", json=body, timeout=WAIT) as response:
            lines = response.iter_lines()  # kept: an iterator dropped closes the response
            first = next(lines)
            assert first.startswith("data: ") and "error" not in first, first  # admitted
            assert gate.entered.wait(WAIT)  # its batch is held; the client leaves now
        wait_until(lambda: served.metric('latentgraph_requests_total{path="/v1/chat/completions",status="200"}')
                   == ended + 1, "the server to see the client leave")
        gate.open()
        wait_until(lambda: served.metric("latentgraph_rows_cancelled_total") == cancelled + 1, "the cancel")
    assert served.metric('latentgraph_tokens_total{kind="completion"}') == tokens  # stopped before it answered
    assert chat(client, QUESTION, temperature=0, max_tokens=3).choices[0].message.content == \
        alone(system, QUESTION, max_tokens=3).texts[0]


def test_a_row_whose_client_went_away_stops_while_its_batch_mate_goes_on(client, system, served, monkeypatch):
    expected = alone(system, "Why?", max_tokens=8).texts[0]
    cancels = []
    cancel = InferenceStep.cancel
    monkeypatch.setattr(InferenceStep, "cancel", lambda step, row: cancels.append(row) or cancel(step, row))
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "stream": True}
    ended = 'latentgraph_requests_total{path="/v1/chat/completions",status="200"}'
    before = served.metric(ended)
    leave = threading.Event()

    def leaving():
        with httpx.stream("POST", served.api + "/chat/completions", json=body, timeout=WAIT) as response:
            lines = response.iter_lines()  # kept: an iterator dropped closes the response
            next(lines)  # admitted
            assert leave.wait(WAIT)

    planner = system.agents["planner"]
    with Gate(planner, rows=1) as first, Gate(planner, rows=2) as second, ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(chat, client, "Hold on", temperature=0, max_tokens=1)
        assert first.entered.wait(WAIT)
        gone = pool.submit(leaving)
        wait_until(lambda: served.service.batcher.depth == 1, "the first request to queue up")
        staying = pool.submit(lambda: chat(client, "Why?", temperature=0, max_tokens=8).choices[0].message.content)
        wait_until(lambda: served.service.batcher.depth == 2, "the second request to queue up")
        first.open()
        assert second.entered.wait(WAIT)  # both in one batch, held before it decodes
        leave.set()
        gone.result(WAIT)
        wait_until(lambda: served.metric(ended) == before + 2, "the server to see the client leave")
        second.open()
        assert staying.result(WAIT) == expected
        blocker.result(WAIT)
    assert cancels == [0]  # the first row of the batch: it stops at its next decoding step


def test_a_waiting_request_whose_client_went_away_is_dropped_before_its_batch(client, system, served):
    cancelled, batches = served.metric("latentgraph_rows_cancelled_total"), served.metric("latentgraph_batch_size_sum")
    gone = 'latentgraph_requests_total{path="/v1/chat/completions",status="499"}'
    left = served.metric(gone)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4})
    with Gate(system.agents["planner"]) as gate, ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(chat, client, "Hold on", temperature=0, max_tokens=1)
        assert gate.entered.wait(WAIT)
        with socket.create_connection(served.address, timeout=WAIT) as raw:
            raw.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            wait_until(lambda: served.service.batcher.depth == 1, "the request to queue up")
        wait_until(lambda: served.metric(gone) == left + 1, "the server to see the client leave")
        gate.open()
        blocker.result(WAIT)
        wait_until(lambda: served.metric("latentgraph_rows_cancelled_total") == cancelled + 1, "the drop")
    assert served.metric("latentgraph_batch_size_sum") == batches + 1  # the blocker's row only


def test_memory_stays_flat_over_hundreds_of_requests(client, served):
    from latentgraph.serve.batcher import Ticket
    from latentgraph.serve.protocol import Job, Row
    from latentgraph.serve.responses import Reply

    def ask(i):
        answer = chat(client, f"Q{i % 5}", temperature=0, max_tokens=1, stream=i % 2 == 0)
        return list(answer) if i % 2 == 0 else answer  # a stream read to its end

    def burst(count):
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(ask, range(count)))

    burst(32)  # warm: connections, caches, metric labels
    gc.collect()
    before = len(gc.get_objects())
    burst(224)
    gc.collect()
    per_request = {Ticket, Job, Row, Reply}
    assert [o for o in gc.get_objects() if type(o) in per_request] == []  # nothing is kept once answered
    assert len(gc.get_objects()) - before < 1000  # noise is a few hundred; a leak per request would exceed it
    assert served.service.batcher.depth == 0
