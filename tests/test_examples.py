"""The examples run offline exactly as the README shows them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, folder: Path) -> list[str]:
    """Run ``examples/<name>`` offline in ``folder``; its output lines (it must exit 0)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_quickstart_runs_offline(tmp_path):
    lines = run_example("quickstart.py", tmp_path)
    assert sum(line.startswith("answer: ") for line in lines) == 2
    rows = [line.split() for line in lines if line[:1].isdigit()]  # the trace table
    assert [(row[0], row[1]) for row in rows] == [(str(r), a) for r in (1, 2, 3)
                                                  for a in ("planner", "critic", "solver")]
    assert rows[-1][5] == "-" and rows[0][5] == "2x8x64"  # the solver answers in round 3; thoughts B x m x H
    if "wrote quickstart.svg" in lines:
        assert (tmp_path / "quickstart.svg").read_text().lstrip().startswith("<?xml")


def test_readme_shows_the_quickstart():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "quickstart.py").read_text()
    for line in ('system.connect("solver", "planner", slot="feedback", feedback=True)',
                 'prompt="Plan: {critic}\\n{question}\\nAnswer in \\\\boxed{{}}.")'):
        assert line in readme and line in example


def test_subgraph_example_runs_the_team_as_one_node(tmp_path):
    lines = run_example("subgraph.py", tmp_path)
    trace = [row.split() for row in lines[lines.index("round  agent            prompt  tokens in  latents in  "
                                                      "thoughts  tokens out  seconds") + 1:] if row[:1].isdigit()]
    assert [row[1] for row in trace] == ["planner", "team.algebra", "team.arithmetic", "team.judge", "solver"]
    assert [row[4] for row in trace] == ["0", "4", "4", "8", "4"]  # latents in: one link per entry, two into the judge
    links = next(line for line in lines if line.startswith("links: "))
    assert "planner->team.algebra" in links and "planner->team.arithmetic" in links and "team.judge->solver" in links
    assert sum(line.startswith("answer: ") for line in lines) == 1


def test_routing_sends_each_question_to_one_expert_offline(tmp_path):
    lines = run_example("routing.py", tmp_path)
    routes = [line.rsplit(" -> ", 1)[1] for line in lines if " -> " in line and "'" in line[:1]]
    assert routes[:4] == ["math", "writer", "math", "writer"]  # digits go to the math expert
    assert len(routes) == 8 and set(routes[4:]) <= {"math", "writer"}  # the said route: one expert per question
    assert any("router->math (latent, now, when has_digits)" in line for line in lines)  # the plan shows conditions


def test_kv_edges_example_reports_each_receivers_cache(tmp_path):
    lines = run_example("kv_edges.py", tmp_path)
    rows = {line.split()[0]: line.split() for line in lines[:3]}
    prompt = {name: int(row[3]) for name, row in rows.items()}
    cache_in = {name: int(row[5]) for name, row in rows.items()}
    assert list(rows) == ["planner", "critic", "solver"]
    assert cache_in == {"planner": 0, "critic": prompt["planner"] + 6,
                        "solver": prompt["planner"] + 6 + prompt["critic"] + 4}  # the chain passes its cache on
    assert lines[3].endswith("True")
    assert lines[4] == "with kv='thoughts', the solver's cache_in is 4"  # the critic's 4 thought positions
    assert lines[5].startswith("answer: ")
