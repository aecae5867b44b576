"""``latentgraph serve --replicas``: the single server's app on Ray Serve replicas. Two replicas on a local Ray answer
as the single in-process server and ``System.run`` do, through the official ``openai`` client; the API key, CORS
and per-replica metrics hold; a replica killed under load ends its requests with an error, leaves the other
replica's untouched, and is replaced.

One local Ray instance (2 CPUs, loopback, no dashboard) and one deployment, started by ``serve_replicas`` as the
command starts it, serve the slow tests; Ray Serve's start-up is most of their time. The command line's checks
need no Ray."""

import asyncio
import json
import os
import queue
import re
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
from serving import WAIT, running, wait_until
from systems import save_with_backbone_dirs, sequential
from test_cli_errors import assert_one_error_line, run_main

import latentgraph as lg
from latentgraph.errors import InputError, WorkerError
from latentgraph.serve import replicas as replicas_module
from latentgraph.serve.limits import Limits
from latentgraph.serve.proxy import REPLICA_DIED, ProxyErrors
from latentgraph.serve.replicas import APP, Deployed, ReplicaOptions, serve_replicas, wait_for_stop

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

KEY = "replica-test-key"
ORIGIN = "http://app.example"
QUESTIONS = ["What is 17 * 23?", "Why?", "Plan the critic step 5."]  # words the tiny tokenizer knows
CHOICE = {"task": "math", "allow_unsandboxed_tools": False}
HEADER = "x-latentgraph-replica"
RESTART = 180.0  # seconds for Ray Serve to replace a killed replica on this slow machine


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    system = sequential(tiny)
    system.rounds = 1  # each replica decodes on one CPU: keep the answers quick
    return save_with_backbone_dirs(system, tmp_path_factory.mktemp("saved"))


@pytest.fixture(scope="module")
def system(saved):
    """The system as a replica loads it, in this process."""
    return lg.load(str(saved), device="cpu")


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    yield
    serve.shutdown()
    ray.shutdown()


@dataclass
class Replicas:
    url: str
    said: list[str]
    stop: threading.Event
    thread: threading.Thread

    def get(self, path: str, **options) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT, **options)


@pytest.fixture(scope="module")
def replicas(ray_instance, saved):
    """Two replicas served by ``serve_replicas`` in a thread (``until`` waits for the module's end, not Ctrl-C)."""
    said, stop, failure = [], threading.Event(), []

    def serving():
        try:
            serve_replicas(str(saved), CHOICE, ReplicaOptions(2), name="tiny", host="127.0.0.1", port=0,
                           limits=Limits(batch_wait_ms=20), api_key=KEY, cors_origins=[ORIGIN], say=said.append,
                           until=stop.wait)
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=serving, daemon=True)
    thread.start()
    wait_until(lambda: failure or any(line.startswith("serving") for line in said), "the replicas", timeout=600)
    assert not failure, failure
    yield Replicas(re.search(r" at (http://\S+)/v1 ", said[-1]).group(1), said, stop, thread)
    stop.set()
    thread.join(WAIT)


@pytest.fixture(scope="module")
def client(replicas):
    return openai.OpenAI(base_url=replicas.url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT)


def alone(system, question, max_tokens):
    return system.run([question], max_new_tokens=max_tokens, do_sample=False).texts[0]


def chat(client, question, **options):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                          temperature=0, **options)


def replica_ids(replicas, count=2, tries=60) -> set[str]:
    """The replicas that answer /health, asked until ``count`` of them have (each answer must be ok)."""
    seen = set()
    for _ in range(tries):
        response = replicas.get("/health")
        assert response.json() == {"status": "ok", "model": "tiny"}
        seen.add(response.headers[HEADER])
        if len(seen) == count:
            return seen
    raise AssertionError(f"only replicas {seen} answered {tries} requests")


# Before the deployment below starts (the module's tests run in order): Ray Serve runs once per cluster.
@pytest.mark.slow
def test_a_replica_that_cannot_load_the_system_fails_the_start_with_its_error(ray_instance, tmp_path):
    missing = tmp_path / "no-system"
    with pytest.raises(WorkerError, match=rf"the replicas could not start \(.*{re.escape(str(missing))}"):
        with Deployed(str(missing), CHOICE, ReplicaOptions(1), name="x", host="127.0.0.1", port=0, limits=Limits()):
            pass
    assert serve.status().applications == {}  # what it started, it stopped


@pytest.mark.slow
def test_requests_spread_over_both_replicas(replicas):
    assert len(replica_ids(replicas)) == 2


@pytest.mark.slow
def test_greedy_answers_equal_the_single_servers_and_the_runs_alone(replicas, client, system):
    with running(system, name="tiny") as single:
        single_client = openai.OpenAI(base_url=single.api, api_key="unused", max_retries=0, timeout=WAIT)
        for question in QUESTIONS:
            expected, answer = chat(single_client, question, max_tokens=8), chat(client, question, max_tokens=8)
            assert answer.choices[0].message.content == expected.choices[0].message.content
            assert answer.choices[0].message.content == alone(system, question, 8)
            assert answer.usage == expected.usage
            assert answer.choices[0].finish_reason == expected.choices[0].finish_reason


@pytest.mark.slow
def test_a_stream_through_ray_serves_proxy_concatenates_to_the_answer(client, system):
    chunks = list(chat(client, QUESTIONS[0], max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == alone(system, QUESTIONS[0], 12)
    assert chunks[-1].usage is not None and chunks[-1].choices == []


@pytest.mark.slow
def test_the_api_key_and_cors_hold_on_the_replicas(replicas):
    refused = httpx.get(replicas.url + "/v1/models", timeout=WAIT)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(replicas.url + "/health", timeout=WAIT).status_code == 200  # open, for load balancers
    preflight = httpx.options(replicas.url + "/v1/chat/completions", timeout=WAIT,
                              headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(replicas.url + "/v1/chat/completions", timeout=WAIT,
                          headers={"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.slow
def test_each_replica_reports_its_own_metrics(replicas):
    """A scrape counts once, after its answer, on the replica that answered it: each replica's count of scrapes
    goes up by one from one of its scrapes to its next, whatever the other replica answered in between."""
    scrapes: dict[str, list[float]] = {}
    while len(scrapes) < 2 or min(map(len, scrapes.values())) < 2:
        response = replicas.get("/metrics")
        counted = [line.split()[-1] for line in response.text.splitlines()
                   if line.startswith('latentgraph_requests_total{path="/metrics",status="200"}')]
        scrapes.setdefault(response.headers[HEADER], []).append(float(counted[0]) if counted else 0.0)
        assert sum(map(len, scrapes.values())) < 60, "one replica answered every scrape"
    for counts in scrapes.values():
        assert all(later == earlier + 1 for earlier, later in zip(counts, counts[1:])), counts


@dataclass
class Outcome:
    status: int | None  # None: the connection failed before a status came
    replica: str | None
    text: str
    complete: bool  # the answer's end came: a whole body, or a stream's [DONE]
    error: dict | None = None  # the error of an error status, or a stream's error event


def ask(url: str, question: str, max_tokens: int, stream: bool, heard=lambda replica: None) -> Outcome:
    """One greedy chat request and its outcome, whatever happens (each wait bounded by ``WAIT``); ``heard`` gets
    the answering replica's id once the response's status has come."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    outcome = Outcome(None, None, "", False)
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=WAIT,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            outcome.status, outcome.replica = response.status_code, response.headers.get(HEADER)
            heard(outcome.replica)
            if outcome.status != 200:
                outcome.error = json.loads(response.read())["error"]
                return outcome
            if not stream:
                outcome.text = json.loads(response.read())["choices"][0]["message"]["content"]
                outcome.complete = True
                return outcome
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    outcome.complete = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    outcome.error = chunk.get("error")
                    outcome.text += "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))
    except httpx.TransportError:  # no answer, or one cut short
        heard(None)
    return outcome


def replica_pid(replica: str) -> int:
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#Replica#{replica}", namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=WAIT)


@pytest.mark.slow
def test_a_replica_killed_under_load_fails_its_requests_with_an_error_and_is_replaced(replicas, system):
    question, tokens = QUESTIONS[0], 40  # long enough that the first request still runs when the kill comes
    expected = alone(system, question, tokens)
    ids = replica_ids(replicas)
    pids = {replica: replica_pid(replica) for replica in ids}
    heard = queue.Queue()
    with ThreadPoolExecutor(8) as pool:
        asked = [pool.submit(ask, replicas.url, question, tokens, i % 2 == 0, heard.put if i == 0 else lambda _: None)
                 for i in range(8)]
        victim = heard.get(timeout=WAIT)  # the replica streaming the first request
        assert victim in ids
        os.kill(pids[victim], signal.SIGKILL)
        outcomes = [a.result(2 * WAIT) for a in asked]  # none hangs
    (survivor,) = ids - {victim}
    for outcome in outcomes:
        if outcome.replica == survivor:  # untouched by the kill
            assert (outcome.status, outcome.complete, outcome.text) == (200, True, expected)
        elif outcome.complete:
            assert (outcome.status, outcome.text) == (200, expected)
        else:  # an error status, or a stream that ends with an error event (and no [DONE]), in OpenAI's shape
            assert outcome.status in (200, 500) and outcome.error["message"] == REPLICA_DIED, outcome
            assert outcome.status == 500 or outcome.replica == victim, outcome

    def replaced():  # a replica other than the two before answers
        return {replicas.get("/health").headers[HEADER] for _ in range(4)} - ids

    (new,) = wait_until(replaced, "Ray Serve to replace the killed replica", timeout=RESTART)
    assert replica_ids(replicas) == {survivor, new}
    deployment = serve.status().applications[APP].deployments["Replica"]
    assert (deployment.status, deployment.replica_states) == ("HEALTHY", {"RUNNING": 2})
    assert [ask(replicas.url, question, tokens, False).text for _ in range(4)] == [expected] * 4


@pytest.mark.slow
def test_a_second_deployment_on_the_same_cluster_is_refused_and_leaves_the_first(replicas, saved):
    with pytest.raises(InputError, match=r"Ray Serve already runs on this Ray cluster \(latentgraph\).*serve shutdown"):
        Deployed(str(saved), CHOICE, ReplicaOptions(1), name="x", host="127.0.0.1", port=0, limits=Limits()
                 ).__enter__()
    assert replicas.get("/health").status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("options, message", [
    (ReplicaOptions(3), "3 replicas with --threads-per-replica 1 need 3 CPUs, but the Ray cluster has 2"),
    (ReplicaOptions(1, gpus_per_replica=0.5), "1 replicas with --gpus-per-replica 0.5 need 0.5 GPUs, but the Ray "
                                              "cluster has 0"),
])
def test_more_replicas_than_the_cluster_holds_is_an_input_error(replicas, saved, options, message):
    with pytest.raises(InputError, match=re.escape(message)):
        Deployed(str(saved), CHOICE, options, name="x", host="127.0.0.1", port=0, limits=Limits()).__enter__()


@pytest.mark.slow
def test_stopping_shuts_ray_serve_down_and_keeps_a_ray_it_did_not_start(replicas):
    """The module's last test: it stops the deployment."""
    replicas.stop.set()
    replicas.thread.join(WAIT)
    assert not replicas.thread.is_alive() and replicas.said[-1] == "stopped"
    assert serve.status().applications == {} and serve.status().proxies == {}
    with pytest.raises(httpx.TransportError):
        httpx.get(replicas.url + "/health", timeout=5)
    assert ray.is_initialized()


def test_wait_for_stop_returns_on_ctrl_c_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    wait_for_stop()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_placement_follows_the_gpus_per_replica():
    assert ReplicaOptions(2).placement() == {"device": "cpu"}
    assert ReplicaOptions(2, gpus_per_replica=0.5).placement() == {"device": "cuda"}
    assert ReplicaOptions(2, gpus_per_replica=2).placement() == {"device_map": "auto"}


@pytest.mark.parametrize("args, message", [
    (["--replicas", "0"], "--replicas must be an integer >= 1"),
    (["--replicas", "2", "--threads-per-replica", "0"], "--threads-per-replica must be an integer >= 1"),
    (["--replicas", "2", "--gpus-per-replica", "-1"], "--gpus-per-replica must be a number >= 0"),
    (["--ray-address", "auto"], "set up replicas on Ray Serve: add --replicas N"),
    (["--gpus-per-replica", "1"], "set up replicas on Ray Serve: add --replicas N"),
    (["--replicas", "2", "--device", "cpu"], "--device place the backbones of this process"),
    (["--replicas", "2", "--ray-address", "http://head:8265"], "is a URL (the dashboard's"),
    (["--replicas", "2", "--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without an API key"),
])
def test_replica_flag_mistakes_are_one_error_line(monkeypatch, capsys, args, message):
    monkeypatch.delenv("LATENTGRAPH_API_KEY", raising=False)
    assert_one_error_line(run_main(monkeypatch, ["serve", "--style", "some-folder", *args]), capsys, message)


def test_without_ray_serve_the_error_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import fails as when Ray is not installed
    assert_one_error_line(run_main(monkeypatch, ["serve", "--replicas", "2"]), capsys,
                          'serving on replicas needs Ray Serve (ray is missing): pip install "latentgraph[replicas]"')


def test_the_replica_flags_reach_serve_replicas(monkeypatch):
    calls = []
    monkeypatch.setattr(replicas_module, "serve_replicas", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setenv("LATENTGRAPH_API_KEY", "k")
    assert run_main(monkeypatch, ["serve", "--style", "/systems/mine", "--task", "code", "--allow-unsandboxed-tools",
                                  "--replicas", "3", "--ray-address", "head:6379", "--gpus-per-replica", "0.5",
                                  "--threads-per-replica", "2", "--host", "0.0.0.0", "--port", "9000",
                                  "--max-batch-size", "4"]) == 0
    ((args, kwargs),) = calls
    assert args == ("/systems/mine", {"task": "code", "link_dtype": "float32", "allow_unsandboxed_tools": True},
                    ReplicaOptions(3, "head:6379", 0.5, 2))
    assert {k: kwargs[k] for k in ("name", "host", "port", "api_key", "allow_no_key")} == \
        {"name": "mine", "host": "0.0.0.0", "port": 9000, "api_key": "k", "allow_no_key": False}
    assert kwargs["limits"].max_batch_size == 4


def through_proxy_errors(*messages):
    """What a client gets when Ray Serve's proxy sends ``messages``, behind :class:`ProxyErrors`: its status, its
    headers and its body."""
    sent = []

    async def proxy(scope, receive, send):
        for message in messages:
            await send(message)

    async def keep(message):
        sent.append(message)

    asyncio.run(ProxyErrors(proxy)({"type": "http"}, None, keep))
    (start, *bodies) = sent
    return start["status"], dict(start["headers"]), b"".join(b["body"] for b in bodies)


def test_the_proxys_own_errors_reach_the_client_in_openais_shape():
    status, headers, body = through_proxy_errors()  # the replica died: the proxy sent nothing
    assert (status, headers[b"content-type"]) == (500, b"application/json")
    assert json.loads(body) == {"error": {"message": REPLICA_DIED, "type": "server_error", "param": None,
                                          "code": None}}
    status, headers, body = through_proxy_errors(
        {"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain"),
                                                                   (b"retry-after", b"2")]},
        {"type": "http.response.body", "body": b"No replicas ", "more_body": True},
        {"type": "http.response.body", "body": b"available."})
    assert (status, headers[b"retry-after"], json.loads(body)["error"]["message"]) == (503, b"2",
                                                                                       "No replicas available.")


def test_a_stream_whose_replica_dies_ends_with_an_error_event():
    start = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"x-latentgraph-replica", b"abc")]}
    status, _, body = through_proxy_errors(start, {"type": "http.response.body", "body": b"data: {}\n\n",
                                                   "more_body": True})
    first, last = body.decode().split("\n\n", 1)
    assert (status, first, json.loads(last.removeprefix("data: "))["error"]["message"]) == (200, "data: {}",
                                                                                          REPLICA_DIED)
    whole = through_proxy_errors(start, {"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    assert whole[2] == b"data: [DONE]\n\n"  # a stream that ended is left as it is


def test_a_replicas_own_error_passes_the_proxy_untouched():
    start = {"type": "http.response.start", "status": 404,
             "headers": [(b"content-type", b"application/json"), (b"x-latentgraph-replica", b"abc")]}
    assert through_proxy_errors(start, {"type": "http.response.body", "body": b'{"error": 1}'}) == \
        (404, dict(start["headers"]), b'{"error": 1}')


def test_without_replicas_the_same_choice_goes_to_the_single_server(monkeypatch):
    from latentgraph.serve import command, server

    calls, loads = [], []
    monkeypatch.setattr(server, "serve_system", lambda load_system, **kwargs: calls.append((load_system, kwargs)))
    monkeypatch.setattr(command, "load", lambda style, **options: loads.append((style, options)))
    assert run_main(monkeypatch, ["serve", "--style", "/systems/mine", "--task", "code", "--device", "cpu"]) == 0
    ((load_system, kwargs),) = calls
    load_system()
    assert loads == [("/systems/mine", {"task": "code", "link_dtype": "float32", "allow_unsandboxed_tools": False,
                                        "device": "cpu", "device_map": None, "max_memory": None,
                                        "offload_folder": None})]
    assert (kwargs["name"], kwargs["host"], kwargs["port"]) == ("mine", "127.0.0.1", 8000)
