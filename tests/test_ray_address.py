"""A Ray address that is malformed, or where no Ray cluster answers, ends in one error that says what to check,
within seconds (Ray alone retries for minutes, or forever), from the CLI and from Python.

No test here starts Ray (test_ray_eval.py joins a running one by its address). Whatever could reach Ray's
connect loop runs in a child process with a timeout, so a regression fails the test instead of hanging it; the
addresses are loopback ones."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
from systems import save_with_backbone_dirs, sequential

import latentgraph as lg
from latentgraph import ray_cluster
from latentgraph.errors import InputError
from latentgraph.evaluation.datasets import Example

ray = pytest.importorskip("ray")

WAIT = 120  # seconds a child may take before the test fails (a regression hangs for 14 minutes or more)
START = "ray start --head"  # what every unreachable-address error tells to check
MALFORMED = [
    ("", "Ray address '' is not host:port or 'auto'"),
    ("nonsense", "Ray address 'nonsense' is not host:port or 'auto'"),
    ("127.0.0.1", "is not host:port or 'auto'"),
    (":6379", "is not host:port or 'auto'"),
    ("127.0.0.1:http", "is not host:port or 'auto'"),
    ("127.0.0.1:99999", "port 99999 is not between 1 and 65535"),
    ("127.0.0.1:0", "port 0 is not between 1 and 65535"),
    ("::1:6379", "write an IPv6 host in brackets, e.g. [::1]:6379"),
    ("http://127.0.0.1:8265", "is a URL (the dashboard's, if its port is 8265); pass the cluster's GCS address"),
    ("ray://127.0.0.1:1", "is a Ray Client address, which latentgraph does not use"),
]


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    return save_with_backbone_dirs(sequential(tiny), tmp_path_factory.mktemp("saved"))


@pytest.fixture(scope="module")
def in_memory(tiny):
    return sequential(tiny)


@pytest.fixture
def silent_server():
    """A loopback TCP port that accepts connections (into its backlog) and never answers: not a Ray GCS."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"127.0.0.1:{server.getsockname()[1]}"


def eval_cli(saved, tmp_path, address, env=None) -> subprocess.CompletedProcess:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"}) + "\n")
    command = [sys.executable, "-m", "latentgraph", "eval", "--style", str(saved), "--dataset", str(data),
               "--format", "gsm8k", "--output", str(tmp_path / "out"), "--workers", "2", "--ray-address", address]
    return subprocess.run(command, capture_output=True, text=True, timeout=WAIT, env=env)


def the_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def join_in_child(address: str, env=None) -> str:
    """What ``join_ray(address)`` raises in a fresh process, as ``ClassName: message``."""
    code = ("import sys\nfrom latentgraph.ray_cluster import join_ray\ntry:\n    join_ray(sys.argv[1], local_cpus=1)\n"
            "except Exception as e:\n    print(f'{type(e).__name__}: {e}')")
    return subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=WAIT,
                          env=env, check=True).stdout.strip()


@pytest.mark.parametrize("address", ["auto", "127.0.0.1:6379", "head-node:1", "[::1]:65535"])
def test_well_formed_addresses_pass_the_form_check(address, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_cluster.check_address(address)  # raises nothing: only the malformed ones below are refused


@pytest.mark.parametrize("address, message", MALFORMED)
def test_a_malformed_address_is_refused_before_anything_runs(address, message, in_memory, tmp_path):
    with pytest.raises(InputError, match=re.escape(message)):
        ray_cluster.check_address(address)
    # through evaluate: refused before the system is checked for workers (its backbones, in memory, would be)
    with pytest.raises(InputError, match=re.escape(message)):
        lg.evaluate(in_memory, [Example("q", "What is 2 + 2?", "4", "math")], output=tmp_path, workers=2,
                    ray_address=address, progress=False)
    assert not (tmp_path / "results.jsonl").exists()


def test_auto_checks_the_ray_address_variable_it_would_join(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(InputError, match=r"RAY_ADDRESS \(which 'auto' joins\) 'http://127.0.0.1:8265' is a URL"):
        ray_cluster.check_address("auto")


@pytest.mark.parametrize("address, message", MALFORMED[:2] + MALFORMED[5:6] + MALFORMED[-2:])
def test_a_malformed_address_is_one_error_line_of_the_cli(address, message, saved, tmp_path):
    assert message in the_error_line(eval_cli(saved, tmp_path, address))


@pytest.mark.slow
def test_unreachable_addresses_are_one_error_line_of_the_cli(saved, tmp_path, silent_server):
    closed = the_error_line(eval_cli(saved, tmp_path, "127.0.0.1:1"))  # nothing listens on port 1
    assert "cannot join the Ray cluster at '127.0.0.1:1': 127.0.0.1:1 cannot be reached (Connection refused)" in closed
    assert START in closed
    silent = the_error_line(eval_cli(saved, tmp_path, silent_server))
    assert (f"cannot join the Ray cluster at '{silent_server}': something accepts connections there, but no Ray GCS "
            f"answered within {ray_cluster.PROBE_SECONDS} s; check that it is the GCS port") in silent
    assert START in silent


@pytest.mark.slow
def test_unreachable_addresses_are_input_errors_in_python(silent_server):
    assert join_in_child("127.0.0.1:1").startswith("InputError: cannot join the Ray cluster at '127.0.0.1:1': "
                                                   "127.0.0.1:1 cannot be reached (Connection refused)")
    assert join_in_child(silent_server).startswith(f"InputError: cannot join the Ray cluster at '{silent_server}': "
                                                   "something accepts connections there, but no Ray GCS answered")
    unknown = join_in_child("no-such-host.invalid:6379")
    assert unknown.startswith("InputError: cannot join the Ray cluster at 'no-such-host.invalid:6379': its host "
                              "'no-such-host.invalid' is unknown")
    auto = join_in_child("auto", env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})  # what 'auto' joins
    # Ray turns 127.0.0.1 into this machine's IP address, and so does the probe: it tries what ray.init would
    assert re.match(r"InputError: cannot join the Ray cluster at 'auto': [\d.]+:1 cannot be reached", auto), auto


def test_without_an_address_a_new_local_ray_starts_whatever_ray_address_says(monkeypatch):
    """Ray itself would join RAY_ADDRESS (or the last `ray start` cluster) and then refuse num_cpus."""
    calls = []
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    assert ray_cluster.join_ray(None, local_cpus=3) is True
    assert [(call["address"], call["num_cpus"]) for call in calls] == [("local", 3)]


def test_a_ray_init_that_fails_after_the_probe_is_an_input_error(monkeypatch):
    """The GCS answered the probe, then ray.init could not connect (the cluster went down in between)."""
    def fails(**_):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379")  # what ray.init says then

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_cluster, "_run_probe", lambda address: None)
    monkeypatch.setattr(ray, "init", fails)
    with pytest.raises(InputError, match=r"cannot join the Ray cluster at '127.0.0.1:6379' \(Failed to connect .*"
                                         r"ray start --head"):
        ray_cluster.join_ray("127.0.0.1:6379", local_cpus=1)
