"""Every mistake a user can make on the command line ends in one `error:` line and a non-zero exit, never a
traceback. One table: each case prepares its files, runs the command and names what the line must say."""

import json
import os
import shutil
import socket
import sys
import warnings

import pytest
import torch

from latentgraph import cli

QUESTION = {"question": "What is 2 + 2?", "answer": "#### 4"}


class Evil:
    """A pickle that would run a shell command if a loader executed it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def data_file(tmp_path, text: str | None = None, encoding="utf-8", name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes((text if text is not None else json.dumps(QUESTION) + "\n").encode(encoding))
    return path


def checkpoint(tmp_path, saved, state=None, truncate=False, step=1, log=None, protocol=2):
    """A training checkpoint folder: the saved system, a trainer state (pickled with ``protocol``) and a log."""
    directory = tmp_path / "checkpoint-1"
    shutil.copytree(saved, directory)
    torch.save(state, directory / "trainer_state.pt", pickle_protocol=protocol)
    if truncate:  # a file cut short, as by a full disk
        data = (directory / "trainer_state.pt").read_bytes()
        (directory / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    log = log if log is not None else [{"step": step, "loss": 1.0}]
    (directory / "train_log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in log))
    return directory


STATE = {"step": 1, "optimizer": {"state": {}, "param_groups": []}, "schedule": {}}  # loads; matching is not needed


def edited(saved, tmp_path, edit):
    """A copy of the saved system whose config text went through ``edit``."""
    directory = tmp_path / "edited"
    shutil.copytree(saved, directory)
    config = directory / "latentgraph_config.json"
    config.write_text(edit(config.read_text()))
    return directory


def system_file(tmp_path, text, name="system.yaml"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


HUGE, DEEP = "9" * 5000, "[" * 5000 + "]" * 5000  # an integer Python will not convert; nesting it cannot parse
AGENT = "agents: [{name: a, backbone: some/model}]\n"


def with_backbone(saved, tmp_path, agent, path):
    """A copy of the saved system whose ``agent`` names another backbone folder."""
    directory = tmp_path / "edited"
    shutil.copytree(saved, directory)
    config = json.loads((directory / "latentgraph_config.json").read_text())
    next(a for a in config["agents"] if a["name"] == agent)["backbone"]["name_or_path"] = str(path)
    (directory / "latentgraph_config.json").write_text(json.dumps(config))
    return directory


def evil_backbone(saved, tmp_path):
    source = json.loads((saved / "latentgraph_config.json").read_text())["agents"][2]["backbone"]["name_or_path"]
    folder = tmp_path / "evil-backbone"
    shutil.copytree(source, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Evil()}, folder / "pytorch_model.bin")
    return with_backbone(saved, tmp_path, "solver", folder)


def backbone_with_config(saved, tmp_path, config=None):
    """The saved system, its solver's backbone a copy of that folder whose config.json holds ``config`` (a dict
    as JSON, a string as it is; None: no config.json)."""
    source = json.loads((saved / "latentgraph_config.json").read_text())["agents"][2]["backbone"]["name_or_path"]
    folder = tmp_path / "other-backbone"
    shutil.copytree(source, folder)
    (folder / "config.json").unlink()
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return with_backbone(saved, tmp_path, "solver", folder)


def empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def eval_output(tmp_path, settings=None, rows=()):
    out = tmp_path / "eval-out"
    out.mkdir()
    if settings is not None:
        (out / "settings.json").write_text(settings)
    (out / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def eval_args(saved, data, out):
    return ["eval", "--style", str(saved), "--dataset", str(data), "--format", "gsm8k", "--output", str(out),
            "--max-new-tokens", "2"]


def train_args(saved, tmp_path, *extra):
    return ["train", "--style", str(saved), "--data", str(data_file(tmp_path)), "--format", "gsm8k",
            "--output", str(tmp_path / "trained"), *extra]


HELD = []  # sockets kept open for the length of the session


def busy_port() -> int:
    """A loopback port another socket listens on."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    HELD.append(held)
    return held.getsockname()[1]


ROW = {"id": "data-1", "method": "latent", "rounds": 3, "sample": 0, "question": QUESTION["question"]}

CASES = {
    "convert a training-free style at a --revision": (
        lambda saved, tmp: ["convert", "latent_mas", str(tmp / "out"), "--revision", "v1"],
        "style 'latent_mas' is training-free: it has no published checkpoint, so revision= does not apply"),
    "run --max-new-tokens 0": (
        lambda saved, tmp: ["run", "Q?", "--style", str(saved), "--max-new-tokens", "0"],
        "max_new_tokens must be an integer >= 1, got 0"),
    "run --temperature 0 while sampling": (
        lambda saved, tmp: ["run", "Q?", "--style", str(saved), "--temperature", "0"],
        "temperature must be a number > 0 when sampling"),
    "run --latent-steps -1": (
        lambda saved, tmp: ["run", "Q?", "--style", str(saved), "--latent-steps", "-1"],
        "latent_steps must be an integer >= 0, got -1"),
    "run --device cuda without CUDA": (
        lambda saved, tmp: ["run", "Q?", "--style", str(saved), "--device", "cuda"],
        "CUDA is not available on this machine"),
    "run --device nonsense": (
        lambda saved, tmp: ["run", "Q?", "--style", str(saved), "--device", "gpu7"],
        "unknown device 'gpu7'"),
    "run on a backbone folder that does not exist": (
        lambda saved, tmp: ["run", "Q?", "--style", str(with_backbone(saved, tmp, "critic", tmp / "gone" / "model"))],
        "does not exist; check the path"),
    "run on a backbone folder without config.json": (
        lambda saved, tmp: ["run", "Q?", "--style", str(backbone_with_config(saved, tmp))],
        "other-backbone' has no config.json, so it is no model folder transformers can load"),
    "run on a backbone whose config.json has no model_type": (
        lambda saved, tmp: ["run", "Q?", "--style", str(backbone_with_config(saved, tmp, {"hidden_size": 32}))],
        "its config.json has no model_type"),
    "run on a backbone of a model type transformers does not know": (
        lambda saved, tmp: ["run", "Q?", "--style", str(backbone_with_config(saved, tmp, {"model_type": "nonesuch"}))],
        "is of model type 'nonesuch', which transformers"),
    "run on a backbone whose config.json is not JSON": (
        lambda saved, tmp: ["run", "Q?", "--style", str(backbone_with_config(saved, tmp, "{not json"))],
        "other-backbone' could not be read: It looks like the config file"),
    "run --style on a folder that does not exist": (
        lambda saved, tmp: ["run", "Q?", "--style", str(tmp / "gone" / "system")],
        "system' does not exist; check the path"),
    "run --style on a folder that holds no saved system": (
        lambda saved, tmp: ["run", "Q?", "--style", str(empty_folder(tmp))],
        "has no latentgraph_config.json, so it is no saved system"),
    "run on a backbone whose .bin holds a refused pickle": (
        lambda saved, tmp: ["run", "Q?", "--style", str(evil_backbone(saved, tmp)), "--max-new-tokens", "1"],
        "refused to unpickle it: it holds the global posix.system"),
    "run --link-dtype bf16": (
        lambda saved, tmp: ["run", "Q?", "--style", str(saved), "--link-dtype", "bf16"],
        "link_dtype must be 'auto' (each link in the dtype its file holds, as published) or a dtype links compute "
        "in: 'float32' (the default), 'bfloat16'"),
    "render to an unknown format": (
        lambda saved, tmp: ["render", str(saved), "-o", str(tmp / "x.exe")],
        "'.exe' is not a Graphviz output format"),
    "eval on a Latin-1 dataset": (
        lambda saved, tmp: eval_args(saved, data_file(tmp, '{"question": "Caf\u00e9?", "answer": "#### 4"}\n',
                                                      encoding="latin-1"), tmp / "out"),
        "is not UTF-8 text"),
    "eval --output naming an existing file": (
        lambda saved, tmp: eval_args(saved, data_file(tmp), data_file(tmp)),
        "is a file; pass a directory"),
    "eval into a folder whose settings.json is corrupt": (
        lambda saved, tmp: eval_args(saved, data_file(tmp), eval_output(tmp, "{not json", [ROW])),
        "settings.json is not valid JSON"),
    "eval into a folder whose settings.json was deleted": (
        lambda saved, tmp: eval_args(saved, data_file(tmp), eval_output(tmp, None, [ROW])),
        "holds results but no settings.json"),
    "eval --temperature while greedy": (
        lambda saved, tmp: eval_args(saved, data_file(tmp), tmp / "out") + ["--temperature", "0.6"],
        "add --sample"),
    "eval --link-dtype int8": (
        lambda saved, tmp: eval_args(saved, data_file(tmp), tmp / "out") + ["--link-dtype", "int8"],
        "got 'int8'"),
    "eval --workers 0": (
        lambda saved, tmp: eval_args(saved, data_file(tmp), tmp / "out") + ["--workers", "0"],
        "workers must be an integer >= 1"),
    "eval --threads-per-worker without --workers": (
        lambda saved, tmp: eval_args(saved, data_file(tmp), tmp / "out") + ["--threads-per-worker", "2"],
        "pass workers=N (--workers N) too"),
    "eval --workers with --device": (
        lambda saved, tmp: eval_args(saved, data_file(tmp), tmp / "out") + ["--workers", "2", "--device", "cpu"],
        "drop --device"),
    "eval --workers with --device-map": (
        lambda saved, tmp: eval_args(saved, data_file(tmp), tmp / "out") + ["--workers", "2", "--device-map", "auto",
                                                                           "--max-memory", "cpu=1GiB"],
        "drop --device-map, --max-memory"),
    "train --config that is not UTF-8": (
        lambda saved, tmp: train_args(saved, tmp, "--config", str(data_file(tmp, '{"lr": "\u00e9"}',
                                                                           encoding="latin-1", name="c.json"))),
        "is not UTF-8 text"),
    "train --resume from a corrupt trainer_state.pt": (
        lambda saved, tmp: train_args(saved, tmp, "--steps", "2", "--resume",
                                      str(checkpoint(tmp, saved, state={"step": 1, "optimizer": {}, "schedule": {}},
                                                     truncate=True))),
        "trainer_state.pt is not a latentgraph trainer state: it is corrupt (PytorchStreamReader failed reading"),
    "train --resume from a trainer state holding a refused pickle": (
        lambda saved, tmp: train_args(saved, tmp, "--steps", "2", "--resume",
                                      str(checkpoint(tmp, saved, state={"step": 1, "optimizer": Evil()}))),
        "refused to unpickle it: it holds the global posix.system"),
    "train --resume past --steps": (
        lambda saved, tmp: train_args(saved, tmp, "--steps", "1", "--resume",
                                      str(checkpoint(tmp, saved, state={"step": 2, "optimizer": {},
                                                                        "schedule": {}}, step=2))),
        "is at step 2, past the 1 steps this training runs: nothing to train"),
    "serve on an address other machines can reach without an API key": (
        lambda saved, tmp: ["serve", "--style", str(saved), "--host", "0.0.0.0", "--port", "0"],
        "refusing to serve on 0.0.0.0 without an API key"),
    "serve --max-batch-size 0": (
        lambda saved, tmp: ["serve", "--style", str(saved), "--port", "0", "--max-batch-size", "0"],
        "--max-batch-size must be an integer >= 1, got 0"),
    "serve on a port in use": (
        lambda saved, tmp: ["serve", "--style", str(saved), "--port", str(busy_port())],
        "cannot listen on 127.0.0.1:"),
    "serve --device-map that is not JSON": (
        lambda saved, tmp: ["serve", "--style", str(saved), "--port", "0", "--device-map", "{0: 1"],
        "--device-map is not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    "serve --link-dtype that is no dtype": (
        lambda saved, tmp: ["serve", "--style", str(saved), "--port", "0", "--link-dtype", "bf16"],
        "link_dtype must be 'auto'"),
    "train --resume from a trainer state of pickle protocol 4 holding a refused pickle": (  # torch warns on it
        lambda saved, tmp: train_args(saved, tmp, "--steps", "2", "--resume",
                                      str(checkpoint(tmp, saved, state={"step": 1, "optimizer": Evil()}, protocol=4))),
        "refused to unpickle it: it holds objects other than tensors"),
    "train --resume from a checkpoint whose log holds a line training did not write": (
        lambda saved, tmp: train_args(saved, tmp, "--steps", "2", "--resume",
                                      str(checkpoint(tmp, saved, state=STATE, log=[{"step": 1, "loss": 1.0},
                                                                                   {"loss": "garbage"}]))),
        "train_log.jsonl, line 2: a log record lacks ['step']"),
    "train --config with a negative seed": (
        lambda saved, tmp: train_args(saved, tmp, "--steps", "1", "--config",
                                      str(data_file(tmp, '{"seed": -1}', name="c.json"))),
        "invalid TrainConfig: seed: Input should be greater than or equal to 0"),
    "train --config nested 5000 deep": (
        lambda saved, tmp: train_args(saved, tmp, "--config", str(data_file(tmp, DEEP, name="c.json"))),
        "c.json is not JSON Python can read: its lists or mappings are nested too deeply"),
    "train on data with a 5000-digit number": (
        lambda saved, tmp: ["train", "--style", str(saved), "--output", str(tmp / "trained"), "--data",
                            str(data_file(tmp, '{"question": "q", "answer": ' + HUGE + "}\n"))],
        "data.jsonl, line 1: cannot read a training example (NotJSON: not JSON Python can read: it holds a value"),
    "run on a YAML system file whose format_version has 5000 digits": (
        lambda saved, tmp: ["run", "Q?", "--style", str(system_file(tmp, f"format_version: {HUGE}\n{AGENT}"))],
        "system.yaml is not YAML Python can read: it holds a value that cannot be converted (Exceeds the limit (4300 "
        "digits) for integer string conversion: value has 5000 digits); fix or replace the file"),
    "run on a YAML system file whose format_version is a 5000-digit hex number": (
        lambda saved, tmp: ["run", "Q?", "--style", str(system_file(tmp, f"format_version: 0x{HUGE}\n{AGENT}"))],
        "has format version an integer of 20000 bits; this latentgraph reads up to 1"),
    "render a YAML system file nested 5000 deep": (
        lambda saved, tmp: ["render", str(system_file(tmp, f"rounds: {DEEP}\n{AGENT}")), "-o", str(tmp / "x.svg")],
        "system.yaml is not YAML Python can read: its lists or mappings are nested too deeply"),
    "run on a JSON system file whose rounds has 5000 digits": (
        lambda saved, tmp: ["run", "Q?", "--style",
                            str(system_file(tmp, '{"rounds": ' + HUGE + ', "agents": []}', name="system.json"))],
        "system.json is not JSON Python can read: it holds a value that cannot be converted"),
    "run on a saved system whose rounds has 5000 digits": (
        lambda saved, tmp: ["run", "Q?", "--style", str(edited(saved, tmp, lambda text: text.replace(
            '"rounds": 3', f'"rounds": {HUGE}')))],
        "latentgraph_config.json is not JSON Python can read: it holds a value that cannot be converted"),
    "run on a saved system nested 5000 deep": (
        lambda saved, tmp: ["run", "Q?", "--style", str(edited(saved, tmp, lambda text: text.replace(
            '"rounds": 3', f'"rounds": {DEEP}')))],
        "latentgraph_config.json is not JSON Python can read: its lists or mappings are nested too deeply"),
    "run on a saved system whose link types are lists": (
        lambda saved, tmp: ["run", "Q?", "--style", str(edited(saved, tmp, lambda text: text.replace(
            '"type": "ln_res"', '"type": ["ln_res"]')))],
        "does not describe a system: agents.0.inner_link: a link type is the name of a registered type"),
    "run --seed above 2**64 - 1": (
        lambda saved, tmp: ["run", "Q?", "--style", str(saved), "--seed", "99999999999999999999999"],
        "seed must be an integer from 0 to 2**64 - 1, got 99999999999999999999999"),
    "eval --seed above 2**64 - 1": (
        lambda saved, tmp: eval_args(saved, data_file(tmp), tmp / "out") + ["--sample", "--seed",
                                                                           "99999999999999999999999"],
        "seed must be an integer from 0 to 2**64 - 1, got 99999999999999999999999"),
    "eval on a dataset nested 5000 deep": (
        lambda saved, tmp: eval_args(saved, data_file(tmp, DEEP + "\n"), tmp / "out"),
        "data.jsonl, line 1: not JSON Python can read: its lists or mappings are nested too deeply"),
    "eval --columns nested 5000 deep": (
        lambda saved, tmp: ["eval", "--style", str(saved), "--dataset", str(data_file(tmp)), "--output",
                            str(tmp / "out"), "--columns", DEEP],
        "--columns is not JSON Python can read: its lists or mappings are nested too deeply"),
    "run --device-map with a 5000-digit device": (
        lambda saved, tmp: ["run", "Q?", "--style", str(saved), "--device-map", '{"lm_head": ' + HUGE + "}"],
        "--device-map is not JSON Python can read: it holds a value that cannot be converted"),
    "run --max-memory with a 5000-digit size": (
        lambda saved, tmp: ["run", "Q?", "--style", str(saved), "--device-map", "auto", "--max-memory",
                            f"cpu={HUGE}"],
        "a number of thousands of digits is neither a device index nor a size"),
}


ROW_EDITS = {  # a stored results.jsonl row, as an edit of a good one -> what the error line says
    "missing keys": (lambda row: json.dumps({k: v for k, v in row.items() if k != "prediction"}).encode(),
                     "a result row lacks ['prediction']"),
    "a verdict as text": (lambda row: json.dumps({**row, "correct": "yes"}).encode(),
                          "a result row's 'correct' is 'yes', not true or false"),
    "null tokens": (lambda row: json.dumps({**row, "tokens": None}).encode(),
                    "a result row's 'tokens' is None, not an integer"),
    "bytes that are not UTF-8": (lambda row: json.dumps({**row, "gold": "GOLD"}).encode().replace(b"GOLD", b"\xe9"),
                                 "not UTF-8 text (byte b'\\xe9')"),  # a Latin-1 é
}


@pytest.mark.parametrize("edit", list(ROW_EDITS))
def test_a_results_row_that_is_not_one_is_one_error_line(edit, saved, tmp_path, monkeypatch, capsys):
    data = data_file(tmp_path)
    out = tmp_path / "out"
    assert run_main(monkeypatch, eval_args(saved, data, out)) == 0  # a first, complete run (settings must match)
    capsys.readouterr()
    stored, expected = ROW_EDITS[edit]
    (out / "results.jsonl").write_bytes(stored(json.loads((out / "results.jsonl").read_text())) + b"\n")
    assert_one_error_line(run_main(monkeypatch, eval_args(saved, data, out)), capsys,
                          f"results.jsonl, line 1: {expected}; delete the line to recompute it")


def show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_main(monkeypatch, args) -> int:
    monkeypatch.setattr(sys, "argv", ["latentgraph", *args])
    with warnings.catch_warnings():  # warnings on stderr, as a user sees them (pytest would record them away)
        warnings.simplefilter("default")
        warnings.showwarning = show_warning
        try:
            cli.main()
        except SystemExit as e:
            return e.code or 0
    return 0


def assert_one_error_line(code, capsys, expected):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", list(CASES))
def test_each_user_mistake_is_one_error_line_and_a_nonzero_exit(case, saved, tmp_path, monkeypatch, capsys):
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make_args, expected = CASES[case]
    args = make_args(saved, tmp_path)
    capsys.readouterr()
    assert_one_error_line(run_main(monkeypatch, args), capsys, expected)
