"""The benchmark scripts run: each on a tiny system, checked on what it prints."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_serve_benchmark_prints_every_config_and_client_count():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--tiny", "--requests", "1",
                             "--clients", "1", "3", "--max-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines if line.startswith(("batched ", "unbatched "))]
    assert [(row[0], row[1], row[2]) for row in rows] == [("batched", "1", "1"), ("batched", "3", "3"),
                                                          ("unbatched", "1", "1"), ("unbatched", "3", "3")]
    assert [row[-1] for row in rows[2:]] == ["1.0", "1.0"]  # --max-batch-size 1: every batch has one row
    assert all(float(value) > 0 for row in rows for value in row[3:])
    ratios = [line for line in lines if line.startswith("answers/s batched / unbatched")]
    assert [line.split(",")[1].split(":")[0].strip() for line in ratios] == ["1 clients", "3 clients"]
    assert lines[-1] == "same answers: every question got the same answer in every run (3 questions)"
