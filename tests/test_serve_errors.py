"""Every request the server cannot answer gets OpenAI's error JSON with the right status, over raw HTTP, and the
server keeps serving after each; no traceback reaches a client. Security: API key, CORS, what is logged."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serving import WAIT, Gate, running, wait_until

import latentgraph as lg
from latentgraph.errors import CheckpointError
from latentgraph.serve.limits import Limits

LIMITS = Limits(max_batch_size=4, max_queue=2, max_tokens_cap=16, max_question_chars=2000, max_body_bytes=4096,
                max_n=2)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "Hi?"}], "max_tokens": 2, "temperature": 0}
LONG = " ".join(f"w{i}x{i * 7 % 13}" for i in range(200))  # under --max-question-chars, over the backbone's context


@pytest.fixture(scope="module")
def system(tiny):
    """Two agents, two rounds: small, and still a graph with a critic to break."""
    torch.manual_seed(0)
    (planner, tokenizer), (solver, solver_tokenizer) = tiny("qwen3", 64, seed=0), tiny("llama", 32, seed=1)
    system = lg.System([lg.Agent("planner", planner, tokenizer=tokenizer, prompt="Plan: {question}", latent_steps=2),
                        lg.Agent("solver", solver, tokenizer=solver_tokenizer, prompt="{planner}\n{question}",
                                 latent_steps=2)], rounds=1, answer="solver")
    return system.connect("planner", "solver")


@pytest.fixture(scope="module")
def served(system):
    with running(system, limits=LIMITS) as served:
        yield served


def chat(**changes):
    return {**GOOD, **changes}


def user(content):
    return [{"role": "user", "content": content}]


# name: (path, body (a dict is sent as JSON), status, param, code, what the message says)
CASES = {
    "malformed JSON": (CHAT, b'{"model": "tiny", ', 400, None, None, "not valid JSON"),
    "a body that is not an object": (CHAT, b"[1, 2]", 400, None, None, "must be a JSON object"),
    "max_tokens of the wrong type": (CHAT, chat(max_tokens="5"), 400, "max_tokens", None, "must be an integer"),
    "content of the wrong type": (CHAT, chat(messages=user(5)), 400, "messages[0].content", None,
                                  "must be a string or a list of text parts"),
    "an unknown role": (CHAT, chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role", None,
                        "must be one of"),
    "no messages": (CHAT, {"model": "tiny"}, 400, "messages", None, "is required"),
    "empty messages": (CHAT, chat(messages=[]), 400, "messages", None, "is empty"),
    "a last message that is not the user's": (
        CHAT, chat(messages=[*user("Q"), {"role": "assistant", "content": "A"}]), 400, "messages[1].role", None,
        "the last message must be the user's question"),
    "a tool message": (CHAT, chat(messages=[{"role": "tool", "content": "x"}, *user("Q")]), 400, "messages[0].role",
                       None, "runs no tools"),
    "an image": (CHAT, chat(messages=user([{"type": "image_url", "image_url": {"url": "x"}}])), 400,
                 "messages[0].content", None, "images and audio are not supported"),
    "max_tokens 0": (CHAT, chat(max_tokens=0), 400, "max_tokens", None, "between 1 and 16"),
    "max_tokens above the cap": (CHAT, chat(max_tokens=17), 400, "max_tokens", None, "--max-tokens-cap"),
    "max_tokens and max_completion_tokens differ": (CHAT, chat(max_completion_tokens=3), 400,
                                                    "max_completion_tokens", None, "differ"),
    "temperature above 2": (CHAT, chat(temperature=2.5), 400, "temperature", None, "between 0 and 2"),
    "top_p 0": (CHAT, chat(top_p=0), 400, "top_p", None, "above 0 and at most 1"),
    "n above the limit": (CHAT, chat(n=3), 400, "n", None, "--max-n"),
    "five stop strings": (CHAT, chat(stop=list("abcde")), 400, "stop", None, "at most 4"),
    "a stop that is not a string": (CHAT, chat(stop=[1]), 400, "stop", None, "a string or a list of strings"),
    "a seed that is not an integer": (CHAT, chat(seed=1.5), 400, "seed", None, "must be an integer"),
    "logprobs": (CHAT, chat(logprobs=True), 400, "logprobs", "unsupported_parameter", "log probabilities"),
    "tools": (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools",
              "unsupported_parameter", "not supported"),
    "stream_options without stream": (CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options",
                                      None, "only allowed with 'stream': true"),
    "an unknown model": (CHAT, chat(model="gpt-4"), 404, "model", "model_not_found", "serves 'tiny'"),
    "a streamed request that is invalid": (CHAT, chat(stream=True, max_tokens=0), 400, "max_tokens", None,
                                           "between 1 and 16"),
    "a question over --max-question-chars": (CHAT, chat(messages=user("x" * 2001)), 400, "messages",
                                             "context_length_exceeded", "--max-question-chars"),
    "a question over the backbone's context": (CHAT, chat(messages=user(LONG)), 400, "messages",
                                               "context_length_exceeded", "too long for this system"),
    "completion logprobs": (COMPLETIONS, {"model": "tiny", "prompt": "Q", "logprobs": 1}, 400, "logprobs",
                            "unsupported_parameter", "log probabilities are not supported"),
    "a prompt over the backbone's context": (COMPLETIONS, {"model": "tiny", "prompt": LONG}, 400, "prompt",
                                             "context_length_exceeded", "too long for this system"),
    "a prompt of token ids": (COMPLETIONS, {"model": "tiny", "prompt": [1, 2, 3]}, 400, "prompt", None,
                              "token ids are not supported"),
    "echo": (COMPLETIONS, {"model": "tiny", "prompt": "Q", "echo": True}, 400, "echo", "unsupported_parameter",
             "not supported"),
    "a body over --max-body-bytes": (CHAT, chat(messages=user("x" * 5000)), 413, None, "request_too_large",
                                     "--max-body-bytes"),
}


def assert_error(response, status, param=None, code=None, says=""):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == {401: "authentication_error", 404: "not_found_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    assert says in error["message"] and "Traceback" not in response.text


def assert_still_serving(url):
    response = httpx.post(url + CHAT, json=GOOD, timeout=WAIT)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_request_is_an_openai_error_and_the_server_goes_on(case, served):
    path, body, status, param, code, says = CASES[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(served.url + path, content=content, headers={"content-type": "application/json"},
                          timeout=WAIT)
    assert_error(response, status, param, code, says)
    assert_still_serving(served.url)


def test_a_body_over_the_limit_without_a_length_is_refused_as_it_comes(served):
    def chunks():
        yield json.dumps(chat(messages=user("x" * 3000))).encode()
        yield b" " * 3000

    response = httpx.post(served.url + CHAT, content=chunks(), timeout=WAIT)  # sent chunked: no Content-Length
    assert_error(response, 413, code="request_too_large", says="--max-body-bytes")
    assert_still_serving(served.url)


def test_unknown_paths_methods_and_models_are_openai_errors(served):
    assert_error(httpx.get(served.url + "/v1/nope", timeout=WAIT), 404, says="no route GET /v1/nope")
    assert_error(httpx.get(served.url + CHAT, timeout=WAIT), 405, says="no route GET /v1/chat/completions")
    assert_error(httpx.get(served.url + "/v1/models/gpt-4", timeout=WAIT), 404, "model", "model_not_found")
    assert_still_serving(served.url)


def test_a_full_queue_is_a_503_with_retry_after(served, system):
    with Gate(system.agents["planner"]) as gate, ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(httpx.post, served.url + CHAT, json=GOOD, timeout=WAIT)
        assert gate.entered.wait(WAIT)
        waiting = pool.submit(httpx.post, served.url + CHAT, json=chat(n=2, temperature=1, seed=1), timeout=WAIT)
        wait_until(lambda: served.service.batcher.depth == 2, "two rows to queue up (--max-queue 2)")
        response = httpx.post(served.url + CHAT, json=GOOD, timeout=WAIT)
        assert_error(response, 503, says="--max-queue 2")
        assert response.headers["retry-after"] == "1"
        gate.open()
        assert blocker.result(WAIT).status_code == 200 and waiting.result(WAIT).status_code == 200
    assert_still_serving(served.url)


def test_while_the_system_loads_health_and_requests_are_503_with_retry_after(system):
    loaded = threading.Event()

    def slow_load():
        assert loaded.wait(WAIT)
        return system

    with running(slow_load, ready=False) as served:
        health = httpx.get(served.url + "/health", timeout=WAIT)
        assert (health.status_code, health.json(), health.headers["retry-after"]) == (503, {"status": "loading"}, "5")
        response = httpx.post(served.url + CHAT, json=GOOD, timeout=WAIT)
        assert_error(response, 503, says="still loading")
        assert response.headers["retry-after"] == "5"
        assert [m["id"] for m in httpx.get(served.url + "/v1/models", timeout=WAIT).json()["data"]] == ["tiny"]
        loaded.set()
        wait_until(lambda: httpx.get(served.url + "/health", timeout=WAIT).status_code == 200, "the system")
        assert_still_serving(served.url)


def test_a_system_that_fails_to_load_says_why(tmp_path):
    def broken():
        raise CheckpointError(f"{tmp_path / 'gone'} does not exist; check the path")

    with running(broken, ready=False) as served:
        health = wait_until(lambda: (r := httpx.get(served.url + "/health", timeout=WAIT)).json()["status"] != "loading"
                            and r, "the load to fail")
        assert health.status_code == 503 and "does not exist; check the path" in health.json()["error"]
        assert_error(httpx.post(served.url + CHAT, json=GOOD, timeout=WAIT), 503, says="failed to load")


def test_an_internal_error_is_a_500_without_a_traceback_and_the_server_goes_on(served, system, monkeypatch):
    def broken(prompt, **options):
        raise RuntimeError("boom in a secret place")

    monkeypatch.setattr(system.agents["planner"], "think", broken)
    response = httpx.post(served.url + CHAT, json=GOOD, timeout=WAIT)
    assert_error(response, 500, says="internal error")
    assert "boom" not in response.text
    monkeypatch.undo()
    assert_still_serving(served.url)


def test_a_failure_after_a_stream_started_ends_it_with_an_error_event(served, system, monkeypatch):
    def broken(prompt, **options):
        raise RuntimeError("boom in a secret place")

    monkeypatch.setattr(system.agents["planner"], "think", broken)
    with httpx.stream("POST", served.url + CHAT, json=chat(stream=True), timeout=WAIT) as response:
        assert response.status_code == 200  # admitted: the stream had started when the batch failed
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == {"error": {"message": "internal error while answering; see the server's log",
                                    "type": "server_error", "param": None, "code": None}}
    monkeypatch.undo()
    assert_still_serving(served.url)


def test_an_api_key_is_required_in_constant_time_and_health_stays_open(system):
    with running(system, api_key="s3cret", cors_origins=["https://app.example"]) as served:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            response = httpx.post(served.url + CHAT, json=GOOD, headers=headers, timeout=WAIT)
            assert_error(response, 401, code="invalid_api_key", says="Authorization: Bearer")
            assert response.headers["www-authenticate"] == "Bearer"
        assert_error(httpx.get(served.url + "/metrics", timeout=WAIT), 401, code="invalid_api_key")
        assert httpx.get(served.url + "/health", timeout=WAIT).status_code == 200
        key = {"authorization": "Bearer s3cret"}
        assert httpx.post(served.url + CHAT, json=GOOD, headers=key, timeout=WAIT).status_code == 200
        preflight = httpx.options(served.url + CHAT, timeout=WAIT, headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.get(served.url + "/health", headers={"origin": "https://evil.example"}, timeout=WAIT)
        assert "access-control-allow-origin" not in other.headers


def test_no_cors_headers_unless_an_origin_is_given(served):
    response = httpx.get(served.url + "/health", headers={"origin": "https://app.example"}, timeout=WAIT)
    assert not [name for name in response.headers if name.startswith("access-control-")]
    preflight = httpx.options(served.url + CHAT, timeout=WAIT, headers={
        "origin": "https://app.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_questions_are_not_logged(system, capfd):
    secret = "What is the launch code 8472?"
    with running(system, log_level="info") as served:
        assert httpx.post(served.url + CHAT, json=chat(messages=user(secret)), timeout=WAIT).status_code == 200
        assert httpx.post(served.url + CHAT, json=chat(messages=user(secret), max_tokens=0),
                          timeout=WAIT).status_code == 400
    out, err = capfd.readouterr()
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in out + err  # the access log: paths and statuses
    assert "8472" not in out + err
