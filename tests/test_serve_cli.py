"""``latentgraph serve`` in a process of its own: it prints where it listens and how to call it, answers as the
system does, and stops cleanly on Ctrl-C."""

import re
import signal
import subprocess
import sys
import threading

import httpx
from serving import wait_until

import latentgraph as lg

STARTUP = 180.0  # seconds for a fresh process to import torch and load a tiny system on a busy machine


def test_serve_prints_its_address_answers_and_stops_on_ctrl_c(saved):
    expected = lg.load(str(saved)).run(["What is 2 + 2?"], do_sample=False, max_new_tokens=4).texts[0]
    process = subprocess.Popen([sys.executable, "-m", "latentgraph", "serve", "--style", str(saved), "--port", "0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        found = wait_until(lambda: re.search(r"serving 'system' at (http://127\.0\.0\.1:\d+)/v1", "".join(lines)),
                           "the address line", STARTUP)
        url = found.group(1)
        assert f"curl {url}/v1/chat/completions" in "".join(lines)
        wait_until(lambda: httpx.get(url + "/health", timeout=STARTUP).status_code == 200, "the system", STARTUP)
        answer = httpx.post(url + "/v1/chat/completions", timeout=STARTUP, json={
            "model": "system", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "temperature": 0,
            "max_tokens": 4})
        assert answer.json()["choices"][0]["message"]["content"] == expected
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
    reader.join(10)
    output = "".join(lines)
    assert output.rstrip().endswith("stopped") and "Traceback" not in output, output


def test_serve_stops_with_one_error_line_when_the_system_fails_to_load(tmp_path, monkeypatch, capsys):
    from latentgraph import cli

    monkeypatch.setattr(sys, "argv", ["latentgraph", "serve", "--style", str(tmp_path / "gone"), "--port", "0"])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: '{tmp_path / 'gone'}' does not exist; check the path")
