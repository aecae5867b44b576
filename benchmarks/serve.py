"""Serving: what batching buys ``latentgraph serve``, with 1, 4 and 16 concurrent clients.

The system is loaded once. For each configuration, batching on (the server's defaults, ``--max-batch-size
16``) and off (``--max-batch-size 1``), a real server starts on a free loopback port; then, for each client
count, that many client threads each send ``--requests`` streamed greedy chat requests one after the other
(a bounded closed loop) and record, per request, the time to the first content delta, the total latency and
the completion tokens (the usage of the stream's last chunk). The script prints, per configuration and
client count, answers/s and tokens/s over the loop's wall time, TTFT and latency p50/p99, and the mean batch
size the server formed (from ``/metrics``); then the ratio batched / unbatched of answers/s at each client
count. Every question gets the same answer in every run (greedy), checked after the table: speed never
comes from different answers.

    python benchmarks/serve.py                        # the embedded default system; 1, 4, 16 clients
    python benchmarks/serve.py --clients 1 16 --requests 4 --max-tokens 64
    python benchmarks/serve.py --tiny --requests 1    # a tiny random system: checks the script (its test runs this)
"""

import argparse
import json
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files

import httpx
import torch

from latentgraph.serve.app import create_app
from latentgraph.serve.limits import Limits
from latentgraph.serve.server import Server, listen

NAME = "bench"
WAIT = 600.0  # seconds one request or the server's start may take before the benchmark fails


@dataclass
class Answer:
    question: str
    text: str
    tokens: int
    ttft: float  # seconds to the first content delta
    latency: float  # seconds to the end of the stream


def questions(count: int) -> list[str]:
    """The first ``count`` questions of the bundled GSM8K calibration set."""
    lines = (files("latentgraph") / "data" / "gsm8k_calibration.jsonl").read_text().splitlines()
    return [json.loads(line)["question"] for line in lines[:count]]


def tiny_system():
    """A two-agent system on tiny random backbones: the script's own check, in seconds."""
    import latentgraph as lg
    from latentgraph.testing import tiny_backbone

    torch.manual_seed(0)
    (planner_model, planner_tokenizer), (solver_model, solver_tokenizer) = (tiny_backbone("llama", 64, seed=0),
                                                                            tiny_backbone("qwen3", 48, seed=1))
    planner = lg.Agent("planner", planner_model, tokenizer=planner_tokenizer, prompt="Plan: {question}",
                       latent_steps=2)
    solver = lg.Agent("solver", solver_model, tokenizer=solver_tokenizer, prompt="{planner}\n{question}",
                      latent_steps=2)
    return lg.System([planner, solver], rounds=1, answer="solver").connect("planner", "solver")


@contextmanager
def serving(system, limits: Limits):
    """A real server of ``system`` on a free loopback port, once its system is ready; yields its URL."""
    server = Server(create_app(system, name=NAME, limits=limits), listen("127.0.0.1", 0), log_level="warning")
    server.start()
    try:
        deadline = time.monotonic() + WAIT
        while not (server.uvicorn.started and httpx.get(server.url + "/health").status_code == 200):
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.05)
        yield server.url
    finally:
        server.stop()


def ask(client: httpx.Client, url: str, question: str, max_tokens: int) -> Answer:
    """One streamed greedy chat request, timed."""
    body = {"model": NAME, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    text, tokens, first = [], 0, None
    start = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}: {response.read().decode()}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if content := choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(content)
    end = time.perf_counter()
    return Answer(question, "".join(text), tokens, (first or end) - start, end - start)


def closed_loop(url: str, clients: int, asked: list[list[str]], max_tokens: int) -> tuple[list[Answer], float]:
    """``clients`` threads, each asking its questions one after the other; the answers and the wall time."""
    answers: list[list[Answer]] = [[] for _ in range(clients)]
    failures: list[BaseException] = []

    def client_loop(c: int) -> None:
        try:
            with httpx.Client(timeout=WAIT) as client:
                answers[c].extend(ask(client, url, q, max_tokens) for q in asked[c])
        except BaseException as e:  # re-raised in the main thread
            failures.append(e)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        raise failures[0]
    return [a for per_client in answers for a in per_client], wall


def batch_sizes(url: str) -> tuple[float, float]:
    """The ``latentgraph_batch_size`` histogram's sum and count so far."""
    samples = dict(line.rsplit(" ", 1) for line in httpx.get(url + "/metrics").text.splitlines()
                   if line.startswith("latentgraph_batch_size_"))
    return float(samples.get("latentgraph_batch_size_sum", 0)), float(samples.get("latentgraph_batch_size_count", 0))


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile, linearly interpolated (the last value's for a single one)."""
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=Limits.max_batch_size, help="batching on")
    parser.add_argument("--batch-wait-ms", type=float, default=Limits.batch_wait_ms)
    parser.add_argument("--tiny", action="store_true", help="a tiny random system instead of the default one")
    args = parser.parse_args()

    if args.tiny:
        system = tiny_system()
    else:
        import latentgraph as lg

        system = lg.load("default")
    pool = questions(max(args.clients) * args.requests)
    configs = {"batched": Limits(max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms),
               "unbatched": Limits(max_batch_size=1, batch_wait_ms=args.batch_wait_ms)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{'tiny random system' if args.tiny else 'embedded default system'}; {args.requests} requests per "
          f"client, max_tokens {args.max_tokens}, temperature 0; batched: max_batch_size {args.max_batch_size}, "
          f"batch_wait_ms {args.batch_wait_ms:g}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = (f"{'config':<10}{'clients':>8}{'answers':>8}{'answers/s':>11}{'tokens/s':>10}{'TTFT p50':>10}"
              f"{'TTFT p99':>10}{'lat p50':>9}{'lat p99':>9}{'batch':>7}")
    print(header)
    rates: dict[tuple[str, int], float] = {}
    seen: dict[str, str] = {}
    differ: list[str] = []
    for config, limits in configs.items():
        with serving(system, limits) as url:
            with httpx.Client(timeout=WAIT) as client:  # warm-up: the first request pays one-time costs
                ask(client, url, pool[0], args.max_tokens)
            for clients in args.clients:
                asked = [pool[c * args.requests:(c + 1) * args.requests] for c in range(clients)]
                before = batch_sizes(url)
                answers, wall = closed_loop(url, clients, asked, args.max_tokens)
                after = batch_sizes(url)
                for a in answers:
                    if seen.setdefault(a.question, a.text) != a.text:
                        differ.append(f"{config}, {clients} clients: {a.question[:60]!r}")
                ttft, latency = [a.ttft for a in answers], [a.latency for a in answers]
                rates[config, clients] = len(answers) / wall
                mean_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                print(f"{config:<10}{clients:>8}{len(answers):>8}{rates[config, clients]:>11.3f}"
                      f"{sum(a.tokens for a in answers) / wall:>10.2f}{percentile(ttft, 50):>10.2f}"
                      f"{percentile(ttft, 99):>10.2f}{percentile(latency, 50):>9.2f}{percentile(latency, 99):>9.2f}"
                      f"{mean_batch:>7.1f}")
    for clients in args.clients:
        print(f"answers/s batched / unbatched, {clients:>2} clients: "
              f"{rates['batched', clients] / rates['unbatched', clients]:.2f}x")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if differ:
        raise SystemExit("different answers to the same question (greedy): " + "; ".join(differ))
    print(f"same answers: every question got the same answer in every run ({len(seen)} questions)")


if __name__ == "__main__":
    main()
