"""latentgraph never runs code from a backbone's repository.

A model folder may point transformers (``auto_map``) to Python files of its own, for a config, a model or a
tokenizer that transformers does not implement. Left to decide, transformers asks "Do you wish to run the
custom code? [y/N]" and runs the file on ``y``. Here every such file writes a marker when it runs, and
whatever answers ``y`` (a terminal, a pipe), the marker never appears: loading is one CheckpointError, and one
``error:`` line from the command line."""

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time

import pytest
from test_cli_errors import assert_one_error_line, run_main
from transformers import AutoConfig, dynamic_module_utils

import latentgraph as lg
from latentgraph.core.backbone import get_backbone
from latentgraph.testing import tiny_tokenizer

YES = "y\n" * 20  # more answers than any number of prompts


def code_file(folder, marker, body):
    """A Python file in ``folder`` that writes ``marker`` when it runs, then defines ``body``."""
    (folder / "repo_code.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                         + textwrap.dedent(body))


def edit_json(path, **changes):
    fields = json.loads(path.read_text())
    fields.update(changes)
    path.write_text(json.dumps(fields))


def config_code(folder, marker):
    """Make a saved tiny Llama folder one of a model type transformers does not know, whose config and model
    classes are in the folder's code (which does work, when run: it subclasses Llama)."""
    code_file(folder, marker, """
        from transformers import LlamaConfig, LlamaForCausalLM

        class CustomConfig(LlamaConfig):
            model_type = "lg_custom"

        class CustomModel(LlamaForCausalLM):
            config_class = CustomConfig
    """)
    edit_json(folder / "config.json", model_type="lg_custom",
              auto_map={"AutoConfig": "repo_code.CustomConfig", "AutoModelForCausalLM": "repo_code.CustomModel"})
    return folder


def model_code(folder, marker):
    """A model type transformers knows (DistilBERT), but not as a causal LM: that class is the folder's code."""
    AutoConfig.for_model("distilbert", dim=32, hidden_dim=64, n_layers=1, n_heads=4, vocab_size=400,
                         auto_map={"AutoModelForCausalLM": "repo_code.CustomModel"}).save_pretrained(folder)
    code_file(folder, marker, "CustomModel = None\n")
    return folder


def tokenizer_code(folder, marker):
    """A config transformers knows (Falcon, which maps to no tokenizer class), with a tokenizer class of the
    folder's own code."""
    AutoConfig.for_model("falcon", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=400).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    code_file(folder, marker, """
        from transformers import PreTrainedTokenizerFast

        class CustomTokenizer(PreTrainedTokenizerFast):
            pass
    """)
    edit_json(folder / "tokenizer_config.json", tokenizer_class="CustomTokenizer",
              auto_map={"AutoTokenizer": [None, "repo_code.CustomTokenizer"]})
    return folder


@pytest.fixture
def answering_yes(monkeypatch, tmp_path):
    """Stdin that answers yes to every question, and a modules cache of this test's own (where transformers
    would copy the code it runs: none, when the test passes)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(YES))
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))


def custom_llama(tiny, tmp_path):
    """A tiny Llama saved as a model type of its folder's code; returns the folder and the code's marker."""
    model, tokenizer = tiny("llama", 32)
    folder = tmp_path / "custom"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return config_code(folder, tmp_path / "ran"), tmp_path / "ran"


def test_a_config_of_repository_code_is_refused_without_running_it(tiny, tmp_path, answering_yes):
    folder, marker = custom_llama(tiny, tmp_path)
    with pytest.raises(lg.CheckpointError) as refused:
        lg.Agent("a", str(folder), device="cpu")
    message = str(refused.value)
    assert f"backbone {str(folder)!r} needs code from its repository" in message
    assert "model type 'lg_custom'" in message and "repo_code.py" in message
    assert "latentgraph never runs repository code" in message and "backbones={agent: (model, tokenizer)}" in message
    assert not marker.exists()


def test_trust_remote_code_from_the_model_cards_changes_nothing(published_hub, tiny, tmp_path, answering_yes):
    folder, marker = custom_llama(tiny, tmp_path)
    with pytest.raises(lg.CheckpointError, match="latentgraph never runs repository code"):
        lg.load_style("distillation", device="cpu", trust_remote_code=True, backbones={"learner": str(folder)})
    assert not marker.exists()


@pytest.mark.parametrize("make, use, what", [
    (model_code, lambda backbone: backbone.model, "causal LM of model type 'distilbert'"),
    (tokenizer_code, lambda backbone: backbone.tokenizer, "tokenizer 'CustomTokenizer'"),
])
def test_a_model_or_tokenizer_of_repository_code_is_refused_without_running_it(make, use, what, tmp_path,
                                                                                answering_yes):
    marker = tmp_path / "ran"
    backbone = get_backbone(make(tmp_path / "custom", marker), device="cpu")  # its config is transformers' own
    with pytest.raises(lg.CheckpointError, match="latentgraph never runs repository code") as refused:
        use(backbone)
    assert what in str(refused.value) and "repo_code.py" in str(refused.value)
    assert not marker.exists()


def test_the_cli_refuses_it_in_one_line(saved, tmp_path, monkeypatch, capsys, answering_yes):
    marker = tmp_path / "ran"
    config_code(tmp_path / "backbone-critic", marker)  # a backbone folder of the saved system
    assert_one_error_line(run_main(monkeypatch, ["run", "Q?", "--style", str(saved), "--max-new-tokens", "1"]),
                          capsys, "needs code from its repository to load")
    assert not marker.exists()


def in_terminal(args, env, timeout=180):
    """Run ``args`` with a pseudo-terminal as stdin, stdout and stderr, typing ``y`` into it every half second
    (under the loading spinner, transformers' question loses its "[y/N]": a user answers what they can see);
    returns its exit status and everything it printed, without terminal escapes."""
    terminal, child = pty.openpty()
    process = subprocess.Popen(args, stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
    os.close(child)
    shown, typed, deadline = b"", 0.0, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if time.monotonic() - typed > 0.5:
                os.write(terminal, b"y\n")
                typed = time.monotonic()
            if select.select([terminal], [], [], 0.1)[0]:
                try:
                    chunk = os.read(terminal, 65536)
                except OSError:  # the child closed the terminal: it has exited
                    break
                if not chunk:
                    break
                shown += chunk
        status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
        os.close(terminal)
    return status, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a pseudo-terminal")
def test_the_cli_in_a_terminal_never_asks_and_never_runs_it(saved, tmp_path):
    marker = tmp_path / "ran"
    config_code(tmp_path / "backbone-critic", marker)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "COLUMNS": "1000"}
    status, shown = in_terminal([sys.executable, "-m", "latentgraph", "run", "Q?", "--style", str(saved),
                                 "--max-new-tokens", "1"], env)
    assert status == 1 and not marker.exists(), shown
    assert "Do you wish to run" not in shown and "Traceback" not in shown, shown
    errors = [line for line in shown.splitlines() if "error:" in line]
    assert len(errors) == 1 and "latentgraph never runs repository code" in errors[0], shown


def test_a_script_without_a_terminal_is_refused_and_the_model_loaded_by_hand_runs(saved, tmp_path):
    """Python with stdin a pipe answering yes: a CheckpointError, and nothing runs. The fix the message
    gives works: the user loads the model with trust_remote_code=True and passes it in."""
    marker = tmp_path / "ran"
    folder = config_code(tmp_path / "backbone-critic", marker)
    script = textwrap.dedent(f"""
        import json, pathlib
        import latentgraph as lg
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            lg.load({str(saved)!r}, device="cpu")
        except lg.CheckpointError as e:
            refused = str(e)
        ran_before = pathlib.Path({str(marker)!r}).exists()
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        system = lg.System.from_pretrained({str(saved)!r}, backbones={{"critic": (model, tokenizer)}}, device="cpu")
        out = system.run(["What is 2 + 2?"], rounds=1, do_sample=False, max_new_tokens=2)
        print(json.dumps({{"refused": refused, "ran_before": ran_before, "model": type(model).__name__,
                          "answered": len(out.texts) == 1, "latents": out.trace[0]["critic"].latents_in}}))
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], input=YES, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert "latentgraph never runs repository code" in report["refused"] and not report["ran_before"]
    assert report["model"] == "CustomModel" and report["answered"] and report["latents"] > 0
    assert marker.exists()  # the user's own load ran it, by choice
