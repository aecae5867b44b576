"""Evaluation on Ray workers: the same rows as in-process, none lost or doubled when a worker dies or the
driver stops, resumable either way, and clear errors for what cannot work.

One local Ray instance (2 CPUs, loopback, no dashboard) serves the module; the reference is one in-process
run of a tiny saved system whose backbones load by path, as workers need."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from systems import save_with_backbone_dirs, sequential
from test_cli_errors import assert_one_error_line, run_main
from typer.testing import CliRunner

import latentgraph as lg
from latentgraph.cli import app
from latentgraph.errors import InputError
from latentgraph.evaluation import workers
from latentgraph.evaluation.datasets import Example

ray = pytest.importorskip("ray")

QUESTIONS = ["What is 17 * 23?", "Natalia sold clips to 48 of her friends in April.", "Why?", "Plan the critic step 5.",
             "def solve(x): return x", "Read the question, then compute 9 - 4."]  # words the tiny tokenizer knows
EXAMPLES = [Example(f"q{i}", question, "391", "math") for i, question in enumerate(QUESTIONS)]
SETTINGS = {"methods": ["single", "latent"], "rounds": 1, "batch_size": 2, "max_new_tokens": 4, "progress": False}
PER_RUN = 12  # rows: 6 questions x 2 methods, in 6 batches


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    return save_with_backbone_dirs(sequential(tiny), tmp_path_factory.mktemp("saved"))


@pytest.fixture(scope="module")
def system(saved):
    return lg.System.from_pretrained(saved, device="cpu")


@pytest.fixture(scope="module")
def reference(system, tmp_path_factory):
    """The in-process run: its output folder, and its rows by key."""
    out = tmp_path_factory.mktemp("reference")
    report = lg.evaluate(system, EXAMPLES, output=out, **SETTINGS)
    return out, {key(row): row for row in report.rows}


def key(row):
    return row["id"], row["method"], row["rounds"], row["sample"]


def without_time(row):
    return {name: value for name, value in row.items() if name != "seconds"}


def written(out):
    """results.jsonl's rows by key, after checking that no key is there twice."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    keys = [key(row) for row in rows]
    assert len(keys) == len(set(keys)), "a row was written twice"
    return {key(row): row for row in rows}


def assert_same_rows(rows, expected):
    assert sorted(rows) == sorted(expected)
    assert {k: without_time(r) for k, r in rows.items()} == {k: without_time(r) for k, r in expected.items()}


def test_reference_answers_differ_per_question(reference):
    """Guards the comparisons below: a mix-up of rows between questions would show."""
    _, rows = reference
    assert len(rows) == PER_RUN
    for method in SETTINGS["methods"]:
        assert len({r["prediction"] for r in rows.values() if r["method"] == method}) >= len(EXAMPLES) - 2


@pytest.mark.slow
def test_ray_rows_equal_in_process_rows(ray_instance, system, reference, tmp_path):
    reference_out, expected = reference
    report = lg.evaluate(system, EXAMPLES, output=tmp_path, workers=2, **SETTINGS)
    assert_same_rows(written(tmp_path), expected)
    assert [key(r) for r in report.rows] == list(expected)  # the report keeps the in-process order
    summary, expected_summary = (json.loads((out / "summary.json").read_text()) for out in (tmp_path, reference_out))
    drop_time = [{k: v for k, v in s.items() if k != "seconds"} for s in expected_summary["scores"]]
    assert [{k: v for k, v in s.items() if k != "seconds"} for s in summary["scores"]] == drop_time
    assert summary["settings"] == expected_summary["settings"]  # the worker count is not a setting


@pytest.mark.slow
def test_a_killed_worker_loses_and_doubles_nothing(ray_instance, system, reference, tmp_path, monkeypatch):
    dispatch, seen = workers._dispatch, {}

    def kill_after_the_first_batch(ray_module, actors, batches):
        def pid(actor):
            return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))

        seen["pid before"] = pid(actors[0])
        results = dispatch(ray_module, actors, batches)
        yield next(results)
        ray.kill(actors[0], no_restart=False)  # as a crash would: Ray restarts it and reruns its batches
        yield from results
        seen["pid after"] = pid(actors[0])

    monkeypatch.setattr(workers, "_dispatch", kill_after_the_first_batch)
    lg.evaluate(system, EXAMPLES, output=tmp_path, workers=2, **SETTINGS)
    assert seen["pid after"] != seen["pid before"]  # the worker did die and come back
    assert_same_rows(written(tmp_path), reference[1])


class DriverStopped(Exception):
    pass


def stop_after(monkeypatch, batches_done=None):
    """Make the driver stop after ``batches_done`` batches (None: never), as a kill would; returns the list of
    how many batches each run handed to Ray workers."""
    dispatch, dispatched = workers._dispatch, []

    def stopping(ray_module, actors, batches):
        dispatched.append(len(batches))
        for done, finished in enumerate(dispatch(ray_module, actors, batches)):
            if done == batches_done:
                raise DriverStopped
            yield finished

    monkeypatch.setattr(workers, "_dispatch", stopping)
    return dispatched


@pytest.mark.slow
def test_a_stopped_ray_run_resumes_in_process(ray_instance, system, reference, tmp_path, monkeypatch):
    stop_after(monkeypatch, 2)
    with pytest.raises(DriverStopped):
        lg.evaluate(system, EXAMPLES, output=tmp_path, workers=2, **SETTINGS)
    monkeypatch.undo()
    first = (tmp_path / "results.jsonl").read_text()
    assert first.count("\n") == 4  # two batches of two
    lg.evaluate(system, EXAMPLES, output=tmp_path, **SETTINGS)
    assert (tmp_path / "results.jsonl").read_text().startswith(first)  # finished rows kept as they were
    assert_same_rows(written(tmp_path), reference[1])


@pytest.mark.slow
def test_a_killed_run_resumes_on_ray(ray_instance, system, reference, tmp_path, monkeypatch):
    """Resume is the same whoever wrote the rows; here an in-process run that a kill cut mid-write."""
    reference_out, expected = reference
    shutil.copy(reference_out / "settings.json", tmp_path)
    lines = (reference_out / "results.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "results.jsonl").write_text("".join(lines[:5]) + lines[5][:20])  # row 6 cut short
    dispatched = stop_after(monkeypatch)
    lg.evaluate(system, EXAMPLES, output=tmp_path, workers=2, **SETTINGS)
    assert dispatched == [4]  # row 6 alone, then the 3 batches of the method not started: nothing finished
    assert (tmp_path / "results.jsonl").read_text().startswith("".join(lines[:5]))
    assert_same_rows(written(tmp_path), expected)


@pytest.mark.slow
def test_an_error_on_a_worker_reaches_the_driver_as_raised(ray_instance, saved, tmp_path):
    copy = shutil.copytree(saved.parent, tmp_path / "copy")
    config = json.loads((copy / "system" / "latentgraph_config.json").read_text())
    for agent in config["agents"]:
        agent["backbone"]["name_or_path"] = str(copy / f"backbone-{agent['name']}")
    (copy / "system" / "latentgraph_config.json").write_text(json.dumps(config))
    system = lg.System.from_pretrained(copy / "system", device="cpu")
    shutil.rmtree(copy / "backbone-critic")  # as on a node that lacks the folder
    with pytest.raises(lg.CheckpointError, match=r"agent 'critic' on a Ray worker: backbone directory .* does not "
                                                 r"exist.*a folder must be at that path on every node"):
        lg.evaluate(system, EXAMPLES, output=tmp_path / "out", workers=1, **SETTINGS)
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.slow
def test_cli_eval_on_ray_workers(ray_instance, saved, reference, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"q": e.prompt, "a": e.gold}) + "\n" for e in EXAMPLES))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--dataset", str(data), "--columns", '{"question": "q", "gold": "a"}',
                                      "--style", str(saved), "--output", str(out), "--compare", "single,latent",
                                      "--rounds", "1", "--max-new-tokens", "4", "--batch-size", "2",
                                      "--workers", "2", "--threads-per-worker", "1"])
    assert result.exit_code == 0, result.output
    by_question = {(r["question"], r["method"]): r["prediction"] for r in written(out).values()}
    assert by_question == {(r["question"], r["method"]): r["prediction"] for r in reference[1].values()}


def test_without_ray_workers_say_how_to_install_it(system, monkeypatch, capsys, saved, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import fails as when Ray is not installed
    with pytest.raises(InputError, match=r'pip install "latentgraph\[ray\]"'):
        lg.evaluate(system, EXAMPLES, workers=2, **SETTINGS)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"}) + "\n")
    args = ["eval", "--style", str(saved), "--dataset", str(data), "--format", "gsm8k", "--output",
            str(tmp_path / "out"), "--workers", "2"]
    capsys.readouterr()
    assert_one_error_line(run_main(monkeypatch, args), capsys, 'pip install "latentgraph[ray]"')


@pytest.mark.parametrize("options, message", [
    ({"workers": 0}, "workers must be an integer >= 1"),
    ({"workers": 1.5}, "workers must be an integer >= 1"),
    ({"workers": 2, "threads_per_worker": 0}, "threads_per_worker must be an integer >= 1"),
    ({"workers": 2, "gpus_per_worker": -1}, "gpus_per_worker must be a number >= 0"),
    ({"threads_per_worker": 2}, "pass workers=N"),
    ({"ray_address": "auto"}, "pass workers=N"),
])
def test_bad_worker_options_are_input_errors(system, options, message):
    with pytest.raises(InputError, match=message):
        lg.evaluate(system, EXAMPLES, **{**SETTINGS, **options})


def test_a_backbone_in_memory_cannot_go_to_workers(tiny):
    with pytest.raises(InputError, match=r"agent 'planner': its backbone was given as a loaded model .*"
                                         r"save_pretrained\(folder\)"):
        lg.evaluate(sequential(tiny), EXAMPLES, workers=2, **SETTINGS)


@pytest.mark.parametrize("options, message", [
    ({"workers": 1, "gpus_per_worker": 1}, "need 1 GPUs, but the Ray cluster has 0"),
    ({"workers": 3}, "need 3 CPUs, but the Ray cluster has 2"),
])
def test_more_than_the_cluster_holds_is_an_input_error(ray_instance, system, options, message, tmp_path):
    with pytest.raises(InputError, match=message):
        lg.evaluate(system, EXAMPLES, output=tmp_path, **{**SETTINGS, **options})
    assert not (tmp_path / "results.jsonl").exists()


def join_in_child(address: str, how: str, token: bool = True) -> subprocess.CompletedProcess:
    """Another process joins Ray through join_ray, its probe included: by ``host:port``, or by 'auto' reading
    RAY_ADDRESS; with this process's Ray settings, or without the token mode ray.init set here."""
    env = {name: value for name, value in os.environ.items() if token or name != "RAY_AUTH_MODE"}
    if how == "auto":
        env["RAY_ADDRESS"] = address
    code = ("import sys, ray\nfrom latentgraph.ray_cluster import join_ray\ntry:\n    started = join_ray(sys.argv[1], "
            "local_cpus=1)\nexcept Exception as e:\n    sys.exit(f'{type(e).__name__}: {e}')\n"
            "print(started, ray.cluster_resources()['CPU'])")
    return subprocess.run([sys.executable, "-c", code, address if how == "host:port" else "auto"],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def loopback_address(ray_instance):
    """This module's Ray instance by the loopback address of its GCS."""
    return "127.0.0.1:" + ray.get_runtime_context().gcs_address.rpartition(":")[2]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["host:port", "auto"])
def test_a_running_cluster_is_joined_by_its_address(loopback_address, how):
    done = join_in_child(loopback_address, how)
    assert done.stdout.split() == ["True", "2.0"], done.stderr  # joined this 2-CPU instance, not a new 1-CPU one


@pytest.mark.slow
@pytest.mark.parametrize("how", ["host:port", "auto"])
def test_a_cluster_that_wants_a_token_says_so_at_once(loopback_address, how):
    if os.environ.get("RAY_AUTH_MODE") != "token":
        pytest.skip("this Ray started its instance without token authentication")
    done = join_in_child(loopback_address, how, token=False)  # ray.init would retry for 20 s, then fail vaguely
    shown = loopback_address if how == "host:port" else "auto"
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"InputError: cannot join the Ray cluster at '{shown}': the cluster requires a token, which this process "
        "lacks: set RAY_AUTH_MODE=token"), done.stderr


def test_cli_worker_flags_reach_ray(ray_instance, saved, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"}) + "\n")
    args = ["eval", "--style", str(saved), "--dataset", str(data), "--format", "gsm8k", "--output",
            str(tmp_path / "out"), "--workers", "2", "--gpus-per-worker", "0.5", "--threads-per-worker", "3"]
    capsys.readouterr()
    assert_one_error_line(run_main(monkeypatch, args), capsys, "2 workers with threads_per_worker=3 need 6 CPUs")
    capsys.readouterr()
    args[args.index("3")] = "1"
    assert_one_error_line(run_main(monkeypatch, args), capsys, "2 workers with gpus_per_worker=0.5 need 1 GPUs")
