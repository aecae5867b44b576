"""The examples run offline exactly as the README shows them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("answer: ") for line in lines) == 2
    rows = [line.split() for line in lines if line[:1].isdigit()]  # the trace table
    assert [(row[0], row[1]) for row in rows] == [(str(r), a) for r in (1, 2, 3)
                                                  for a in ("planner", "critic", "solver")]
    assert rows[-1][5] == "-" and rows[0][5] == "2x8x64"  # the solver answers in round 3; thoughts B x m x H
    if "wrote quickstart.svg" in result.stdout:
        assert (tmp_path / "quickstart.svg").read_text().lstrip().startswith("<?xml")


def test_readme_shows_the_quickstart():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "quickstart.py").read_text()
    for line in ('system.connect("solver", "planner", slot="feedback", feedback=True)',
                 'prompt="Plan: {critic}\\n{question}\\nAnswer in \\\\boxed{{}}.")'):
        assert line in readme and line in example


def test_kv_edges_example_reports_each_receivers_cache(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "kv_edges.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[:3]}
    prompt = {name: int(row[3]) for name, row in rows.items()}
    cache_in = {name: int(row[5]) for name, row in rows.items()}
    assert list(rows) == ["planner", "critic", "solver"]
    assert cache_in == {"planner": 0, "critic": prompt["planner"] + 6,
                        "solver": prompt["planner"] + 6 + prompt["critic"] + 4}  # the chain passes its cache on
    assert lines[3].endswith("True")
    assert lines[4] == "with kv='thoughts', the solver's cache_in is 4"  # the critic's 4 thought positions
    assert lines[5].startswith("answer: ")
