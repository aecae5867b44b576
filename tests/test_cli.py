"""The command line on tiny systems: run (text and JSON), render, styles, errors, opting in to tools."""

import json
import os
import subprocess
import sys
import time

import pytest
from typer.main import get_command
from typer.testing import CliRunner

import latentgraph as lg
from latentgraph.cli import app
from latentgraph.core.config import SystemConfig


def test_run_json_is_one_object_with_the_documented_keys(saved):
    result = CliRunner().invoke(app, ["run", "What is 2 + 2?", "--style", str(saved), "--json", "--greedy",
                                      "--max-new-tokens", "4", "--rounds", "2", "--latent-steps", "3"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert set(record) == {"question", "answer", "style", "mode", "rounds", "seconds", "tokens_out"}
    assert record["question"] == "What is 2 + 2?" and record["mode"] == "latent" and len(record["rounds"]) == 2
    first = record["rounds"][0]
    assert first["round"] == 1 and list(first["agents"]) == ["planner", "critic", "solver"]
    assert set(first["agents"]["critic"]) == {"prompt", "seconds", "tokens_in", "latents_in", "cache_in",
                                              "latent_steps", "tokens_out"}
    assert first["agents"]["critic"]["cache_in"] == 0  # no KV edge
    assert first["agents"]["critic"]["latents_in"] == 3 and first["agents"]["critic"]["latent_steps"] == 3
    solver = record["rounds"][1]["agents"]["solver"]
    assert 1 <= solver["tokens_out"] <= 4 and record["tokens_out"] == solver["tokens_out"]
    assert record["seconds"] == pytest.approx(sum(a["seconds"] for r in record["rounds"]
                                                  for a in r["agents"].values()), abs=1e-3)


def test_run_prints_the_answer_and_a_table(saved):
    result = CliRunner().invoke(app, ["run", "Hi?", "--style", str(saved), "--greedy", "--max-new-tokens", "2",
                                      "--mode", "single"])
    assert result.exit_code == 0, result.output
    assert "single mode" in result.output and "solver" in result.output and "planner" not in result.output


def test_render_writes_a_file(saved, tmp_path):
    result = CliRunner().invoke(app, ["render", str(saved), "-o", str(tmp_path / "sys.dot")])
    assert result.exit_code == 0, result.output
    assert "solver (answer)" in (tmp_path / "sys.dot").read_text()


def test_unknown_style_fails_with_a_clear_message(tmp_path):
    result = subprocess.run([sys.executable, "-m", "latentgraph", "run", "Q", "--style", "no_such_style"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1 and "is not 'default', a style (sequential_light, " in result.stderr
    assert "deliberation, latent_mas)" in result.stderr
    assert "Traceback" not in result.stderr


def test_uncached_style_fails_fast_naming_the_repo_and_the_fix(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "latentgraph", "run", "Q", "--style", "sequential_light"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert time.perf_counter() - start < 60  # fails before loading anything
    assert result.returncode == 1, result.stderr
    message = " ".join(result.stderr.split())
    assert "hub repo 'RecursiveMAS/Sequential-Light-Planner-Qwen3-1.7B' is neither cached nor reachable" in message
    assert "hf download RecursiveMAS/Sequential-Light-Planner-Qwen3-1.7B" in message


def test_version_is_exposed():
    assert lg.__version__


def test_allow_unsandboxed_tools_opts_the_tool_agent_in(published_hub):
    from latentgraph.cli import load
    from latentgraph.tools import PROTECTIONS

    def python_tool(system):
        (tool,) = system.agents["toolcaller"].tools
        return tool.sandbox.require

    assert python_tool(load("deliberation", weights=False)) == PROTECTIONS  # fails closed
    assert python_tool(load("deliberation", weights=False, allow_unsandboxed_tools=True)) == ()
    commands = get_command(app).commands
    for name in ("run", "eval"):
        assert "--allow-unsandboxed-tools" in [opt for param in commands[name].params for opt in param.opts]


def test_allow_unsandboxed_tools_opts_code_scoring_in(monkeypatch, tmp_path):
    import types

    from latentgraph import cli
    from latentgraph.evaluation import datasets
    from latentgraph.evaluation import runner as evaluation
    from latentgraph.evaluation.datasets import Example

    code = [Example("k1", "Write add(a, b).", "", "code", tests="assert add(2, 3) == 5")]
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: code)
    empty = types.SimpleNamespace(agents={})
    empty.graph = lambda: empty  # a system with no agents, nested or not
    monkeypatch.setattr(cli, "load", lambda style, **kwargs: empty)
    runners = []

    def evaluate(system, examples, *, code_runner, **kwargs):
        runners.append(code_runner)
        raise lg.InputError("stop here")

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    for flags in ([], ["--allow-unsandboxed-tools"]):
        result = CliRunner().invoke(app, ["eval", "--dataset", "code.jsonl", "--output", str(tmp_path), *flags])
        assert isinstance(result.exception, lg.InputError)
    assert runners[0] is None  # evaluate's default: every protection required
    assert isinstance(runners[1], evaluation.SandboxRunner) and runners[1].require == ()


DECLARED = """\
rounds: 2
answer: solver
agents:
  - name: planner
    backbone: {planner}
    prompt: "Plan how to solve: {{question}}"
    feedback_prompt: "Feedback: {{feedback}}\\nImprove your plan for: {{question}}"
    latent_steps: 2
    inner_link: {{type: mlp, hidden_dim: 16}}
  - {{name: critic, backbone: {critic}, prompt: "Plan: {{planner}}\\nRefine it for: {{question}}", latent_steps: 2}}
  - {{name: solver, backbone: {solver}, prompt: "Plan: {{critic}}\\n{{question}}", latent_steps: 2}}
edges:
  - {{src: planner, dst: critic, link: linear}}
  - {{src: critic, dst: solver, mode: text}}
  - {{src: solver, dst: planner, slot: feedback, feedback: true}}
"""


def test_a_system_declared_in_a_yaml_file_runs_with_fresh_links(saved, tmp_path):
    backbones = {name: saved.parent / f"backbone-{name}" for name in ("planner", "critic", "solver")}
    path = tmp_path / "my_system.yaml"
    path.write_text(DECLARED.format(**backbones))
    result = CliRunner().invoke(app, ["run", "What is 2 + 2?", "--style", str(path), "--json", "--greedy",
                                      "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "links are freshly initialised, not trained" in result.stderr
    record = json.loads(result.stdout)
    assert len(record["rounds"]) == 2 and list(record["rounds"][0]["agents"]) == ["planner", "critic", "solver"]
    system = lg.System.from_config(path)
    assert system.agents["planner"].inner_link.config.hidden_dim == 16 and system.edges["critic->solver"].mode == "text"
    assert system.links["planner->critic"].config.type == "linear"


def test_a_config_file_beside_links_runs_with_those_links(saved):
    import yaml

    config = json.loads((saved / "latentgraph_config.json").read_text())
    (saved / "system.yaml").write_text(yaml.safe_dump(config))
    args = ["What is 2 + 2?", "--json", "--greedy", "--max-new-tokens", "4", "--rounds", "1"]
    from_dir = CliRunner().invoke(app, ["run", args[0], "--style", str(saved), *args[1:]])
    from_yaml = CliRunner().invoke(app, ["run", args[0], "--style", str(saved / "system.yaml"), *args[1:]])
    assert from_dir.exit_code == 0 and from_yaml.exit_code == 0, from_yaml.output
    assert "freshly initialised" not in from_yaml.stderr
    assert json.loads(from_yaml.stdout)["answer"] == json.loads(from_dir.stdout)["answer"]
    assert lg.System.from_config(saved / "system.yaml").to_config() == SystemConfig.from_file(
        saved / "latentgraph_config.json")
