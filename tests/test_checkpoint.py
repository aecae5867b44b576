"""latentgraph's own format: what is written, round trips, and clear failures on bad files."""

import errno
import json
import os
import re
import shutil
import stat
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import latentgraph as lg
from latentgraph.checkpoints.native import CONFIG_NAME, WEIGHTS_NAME
from latentgraph.core.agent import DEFAULT_SYSTEM_PROMPT
from latentgraph.core.config import SystemConfig


@pytest.fixture
def system(tiny):
    qwen, qwen_tok = tiny("qwen2", 64)
    llama, llama_tok = tiny("llama", 48)
    a = lg.Agent("a", qwen, tokenizer=qwen_tok, latent_steps=3, feedback_prompt="{fb} {question}",
                 inner_link="res_mlp")
    b = lg.Agent("b", llama, tokenizer=llama_tok, latent_steps=2, prompt="{a} and {{braces}} {question}",
                 system_prompt=None)
    system = lg.System([a, b], rounds=2, answer="b").connect("a", "b", link={"type": "ln_res", "hidden_dim": 20})
    system.connect("b", "a", slot="fb", feedback=True, mode="text")
    with torch.no_grad():
        for p in system.parameters():
            p.normal_()
    return system


@pytest.fixture
def backbones(tiny):
    return {"a": tiny("qwen2", 64), "b": tiny("llama", 48)}


def test_files_and_keys(system, tmp_path):
    system.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["format_version"] == 1 and config["rounds"] == 2 and config["answer"] == "b"
    assert config["agents"][0] == {
        "name": "a", "backbone": {"name_or_path": "Qwen2ForCausalLM", "revision": None},
        "prompt": "{question}", "feedback_prompt": "{fb} {question}", "system_prompt": DEFAULT_SYSTEM_PROMPT,
        "latent_steps": 3, "inner_link": {"type": "res_mlp"}}
    assert config["edges"] == [
        {"src": "a", "dst": "b", "slot": "a", "mode": "latent", "feedback": False,
         "link": {"type": "ln_res", "hidden_dim": 20}},
        {"src": "b", "dst": "a", "slot": "fb", "mode": "text", "feedback": True, "link": None}]
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert "a->b.proj1.weight" in tensors and "a.proj1.weight" in tensors and "b.pre_ln.weight" in tensors
    assert tensors["a->b.proj1.weight"].shape == (20, 64)
    assert sum(t.numel() for t in tensors.values()) == system.num_parameters()


def test_round_trip_is_exact(system, backbones, tmp_path):
    system.save_pretrained(tmp_path)
    loaded = lg.System.from_pretrained(tmp_path, backbones=backbones)
    for (name, x), (_, y) in zip(system.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), name
    assert loaded.agents["b"].prompt == "{a} and {{braces}} {question}" and loaded.agents["b"].system_prompt is None
    assert loaded.edges == system.edges
    run = dict(do_sample=False, max_new_tokens=4)
    assert loaded.run(["What is 2 + 2?"], **run).texts == system.run(["What is 2 + 2?"], **run).texts


def assert_same_links(loaded, system):
    """The loaded system carries the saved links, tensor for tensor."""
    expected = system.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.state_dict().items())


def test_unknown_keys_from_a_newer_latentgraph_are_tolerated_with_a_warning(system, backbones, tmp_path):
    system.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["latentgraph_version"] = "99.0.0"
    config["future_option"] = 1
    config["agents"][1]["backbone"]["quantization"] = "int4"
    config["edges"][0]["link"]["dropout"] = 0.1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['config.future_option', "
                                         r"'config.agents\[1\].backbone.quantization', "
                                         r"'config.edges\[0\].link.dropout'\] \(written by latentgraph 99.0.0"):
        loaded = lg.System.from_pretrained(tmp_path, backbones=backbones)
    assert_same_links(loaded, system)


def test_unknown_keys_from_this_version_are_an_error_naming_them(system, backbones, tmp_path):
    system.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["edges"][0]["link"]["hiden_dim"] = 20
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(lg.CheckpointError, match=r"unknown keys \['config.edges\[0\].link.hiden_dim'\]: a typo\?"):
        lg.System.from_pretrained(tmp_path, backbones=backbones)


@pytest.mark.parametrize("key, value, message", [
    ("rounds", "3", "rounds: Input should be a valid integer"),
    ("rounds", True, "rounds: Input should be a valid integer"),
    ("rounds", 0, "rounds: Input should be greater than or equal to 1"),
    ("format_version", 0, "format_version: Input should be greater than or equal to 1"),
    ("format_version", -5, "format_version: Input should be greater than or equal to 1"),
    ("format_version", "1", "format_version: Input should be a valid integer"),
    ("latent_steps", True, "agents.0.latent_steps: Input should be a valid integer"),
    ("latent_steps", -1, "agents.0.latent_steps: Input should be greater than or equal to 0"),
    ("feedback", "yes", "edges.1.feedback: Input should be a valid boolean"),
])
def test_config_values_of_the_wrong_type_are_not_coerced(system, backbones, tmp_path, key, value, message):
    system.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    if key == "latent_steps":
        config["agents"][0][key] = value
    elif key == "feedback":
        config["edges"][1][key] = value
    else:
        config[key] = value
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(lg.CheckpointError, match=f"does not describe a system: {message}"):
        lg.System.from_pretrained(tmp_path, backbones=backbones)


HUGE = "9" * 5000  # Python refuses to convert an integer of more than 4300 digits
DEEP = "[" * 5000 + "]" * 5000
AGENT = "agents: [{name: a, backbone: some/model}]\n"


@pytest.mark.parametrize("edit, message", [
    (lambda text: text.replace('"format_version": 1', f'"format_version": {HUGE}'),
     "is not JSON Python can read: it holds a value that cannot be converted \\(Exceeds the limit \\(4300 digits\\)"),
    (lambda text: text.replace('"rounds": 2', f'"rounds": {HUGE}'), "is not JSON Python can read: it holds a value"),
    (lambda text: text.replace('"rounds": 2', f'"rounds": {DEEP}'), "is not JSON Python can read: its lists or "
                                                                    "mappings are nested too deeply"),
    (lambda text: text.replace('"type": "res_mlp"', '"type": ["res_mlp"]'),
     "agents.0.inner_link: a link type is the name of a registered type \\(.*ln_res.*\\), got \\['res_mlp'\\]"),
    (lambda text: text.replace('"type": "ln_res"', '"type": {"name": "ln_res"}'),
     "edges.0.link: a link type is the name of a registered type .*, got {'name': 'ln_res'}"),
    (lambda text: text.replace('"type": "ln_res"', '"type": 7'), "edges.0.link: a link type is the name .*, got 7"),
], ids=["huge format_version", "huge rounds", "deep rounds", "list link type", "dict link type", "number link type"])
def test_a_config_file_python_cannot_hold_is_a_checkpoint_error(system, backbones, tmp_path, edit, message):
    system.save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(edit((tmp_path / CONFIG_NAME).read_text()))
    with pytest.raises(lg.CheckpointError, match=f"{CONFIG_NAME} .*{message}"):
        lg.System.from_pretrained(tmp_path, backbones=backbones)


@pytest.mark.parametrize("text, message", [
    (f"format_version: {HUGE}\n{AGENT}", "is not YAML Python can read: it holds a value that cannot be converted "
                                         "\\(Exceeds the limit \\(4300 digits\\)"),
    (f"rounds: {HUGE}\n{AGENT}", "is not YAML Python can read: it holds a value that cannot be converted"),
    (f"rounds: {DEEP}\n{AGENT}", "is not YAML Python can read: its lists or mappings are nested too deeply"),
    (f"format_version: 0x{'f' * 5000}\n{AGENT}", "has format version an integer of 20000 bits; this latentgraph reads "
                                                 "up to 1: upgrade latentgraph"),  # hex: YAML converts it, unlimited
    (f"{AGENT}edges: [{{src: a, dst: a, link: {{type: [ln_res]}}}}]\n",
     "does not describe a system: edges.0.link: a link type is the name"),
], ids=["huge format_version", "huge rounds", "deep rounds", "hex format_version", "list link type"])
def test_a_yaml_system_file_python_cannot_hold_is_a_checkpoint_error(tmp_path, text, message):
    (tmp_path / "system.yaml").write_text(text)
    with pytest.raises(lg.CheckpointError, match=f"system.yaml {message}"):
        SystemConfig.from_file(tmp_path / "system.yaml")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_link_tensors_that_are_not_floating_point_are_refused(system, backbones, tmp_path, dtype):
    system.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["a->b.proj2.bias"] = tensors["a->b.proj2.bias"].to(dtype)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(lg.CheckpointError, match=f"tensor 'a->b.proj2.bias' has dtype {dtype}; link parameters "
                                                 "are floating point"):
        lg.System.from_pretrained(tmp_path, backbones=backbones)


def test_the_config_file_is_exactly_to_config(system, backbones, tmp_path):
    system.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_text() == system.to_config().to_json()
    assert SystemConfig.from_file(tmp_path / CONFIG_NAME) == system.to_config()


def test_to_config_from_config_round_trip_gives_identical_greedy_texts(system, backbones):
    config = system.to_config()
    rebuilt = lg.System.from_config(config, backbones=backbones)
    assert rebuilt.to_config() == config and rebuilt.edges == system.edges
    with torch.no_grad():  # from_config gives fresh links; copy the weights to compare the runs
        for name, module in rebuilt.link_modules().items():
            module.load_state_dict(system.link_modules()[name].state_dict())
    run = dict(do_sample=False, max_new_tokens=6)
    questions = ["What is 2 + 2?", "Name a prime."]
    assert rebuilt.run(questions, **run).texts == system.run(questions, **run).texts
    from_json = lg.System.from_config(json.loads(config.to_json()), backbones=backbones)
    assert from_json.to_config() == config


def test_extra_tensors_are_tolerated_with_a_warning(system, backbones, tmp_path):
    system.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME) | {"c.proj.weight": torch.zeros(2)}
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.warns(UserWarning, match=r"ignoring 1 tensors that match no link: \['c.proj.weight'\]"):
        loaded = lg.System.from_pretrained(tmp_path, backbones=backbones)
    assert_same_links(loaded, system)


def test_missing_files(system, backbones, tmp_path):
    with pytest.raises(lg.CheckpointError, match="latentgraph_config.json is missing"):
        lg.System.from_pretrained(tmp_path, backbones=backbones)
    system.save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(lg.CheckpointError, match="links.safetensors is missing"):
        lg.System.from_pretrained(tmp_path, backbones=backbones)


@pytest.mark.parametrize("source", ["/no/such/checkpoint", "./no-such-checkpoint", "../no/such", "~/no/such",
                                    "no/such/checkpoint", "no such checkpoint"])
def test_a_path_that_cannot_be_a_hub_id_must_name_a_folder(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(lg.CheckpointError, match=re.escape(f"folder {source!r} does not exist; check the path")):
        lg.System.from_pretrained(source)
    with pytest.raises(lg.CheckpointError, match=re.escape(f"{source!r} does not exist; check the path")):
        lg.load(source)
    with pytest.raises(lg.CheckpointError, match=re.escape(f"backbone directory {source!r} does not exist")):
        lg.Agent("a", source, device="cpu")


def test_a_hub_id_is_looked_up_in_the_hub_cache():
    with pytest.raises(lg.CheckpointError, match="hub repo 'org/no-such-system' is neither cached nor reachable"):
        lg.System.from_pretrained("org/no-such-system")


def test_paths_under_the_home_folder_load(system, backbones, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    system.save_pretrained(tmp_path / "ckpt")
    assert_same_links(lg.System.from_pretrained("~/ckpt", backbones=backbones), system)
    model, tokenizer = tiny("llama", 48)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    agent = lg.Agent("b", "~/model", device="cpu")
    assert agent.backbone.name_or_path == str(tmp_path / "model") and agent.hidden_size == 48
    assert agent.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_missing_required_config_key(system, backbones, tmp_path):
    system.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["agents"][0]["backbone"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(lg.CheckpointError, match=r"does not describe a system: agents.0.backbone: Field required"):
        lg.System.from_pretrained(tmp_path, backbones=backbones)


def test_missing_tensor_wrong_shape_and_corrupt_file(system, backbones, tmp_path):
    system.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    save_file({k: v for k, v in tensors.items() if k != "a->b.proj2.bias"}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(lg.CheckpointError, match=r"links.safetensors lacks 1 link tensors: \['a->b.proj2.bias'\]"):
        lg.System.from_pretrained(tmp_path, backbones=backbones)
    save_file(tensors | {"a.proj1.weight": torch.zeros(3, 3)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(lg.CheckpointError, match=r"tensor 'a.proj1.weight' has shape \(3, 3\), the link expects"):
        lg.System.from_pretrained(tmp_path, backbones=backbones)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x00" * 100)
    with pytest.raises(lg.CheckpointError, match="links.safetensors is not a readable safetensors file"):
        lg.System.from_pretrained(tmp_path, backbones=backbones)


def test_newer_format_and_unknown_agent_injection(system, backbones, tmp_path):
    system.save_pretrained(tmp_path)
    with pytest.raises(lg.CheckpointError, match=r"backbones= names agent 'zz'"):
        lg.System.from_pretrained(tmp_path, backbones={"zz": backbones["a"]})
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config | {"format_version": 99}))
    with pytest.raises(lg.CheckpointError, match="format version 99; this latentgraph reads up to 1: upgrade"):
        lg.System.from_pretrained(tmp_path, backbones=backbones)


def test_a_plain_module_link_cannot_be_saved(system, tmp_path):
    system.links["a->b"] = nn.Linear(64, 48)
    with pytest.raises(lg.GraphError, match="edge 'a->b' link is a plain Linear.*register_link"):
        system.save_pretrained(tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()


def test_push_to_hub_uploads_the_saved_folder(system, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            return f"commit:{repo_id}"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert system.push_to_hub("me/sys", private=True, token="t") == "commit:me/sys"
    assert calls == {"token": "t", "create": ("me/sys", True, True), "files": [CONFIG_NAME, WEIGHTS_NAME]}



# Crash safety: a save failed or killed at any of its file operations leaves the complete old or the complete
# new checkpoint, never the new config beside the old weights.

NEW_PROMPT = "{a} then {question}"


@pytest.fixture
def versions(system, tmp_path, monkeypatch):
    """``system`` saved to ``tmp_path/"old"``, then changed in place into a new version (another prompt and
    other link weights); returns ``(old links, new links)``. fsync is made free: a kill loses no written
    data, and real fsyncs would make these tests slow."""
    from faults import no_fsync

    no_fsync(monkeypatch)
    system.save_pretrained(tmp_path / "old")
    old = {k: v.clone() for k, v in system.state_dict().items()}
    system.agents["b"].prompt = NEW_PROMPT
    with torch.no_grad():
        for p in system.parameters():
            p.add_(1.0)
    return old, {k: v.clone() for k, v in system.state_dict().items()}


def old_checkpoint_with_a_readme(tmp_path, name):
    directory = tmp_path / name
    shutil.copytree(tmp_path / "old", directory)
    (directory / "README.md").write_text("my notes")
    return directory


def loads_as(directory, backbones, versions):
    """Which version ``directory`` loads as, after checking its prompt and every link tensor, bit for bit,
    are that version's: never the new config beside the old weights."""
    loaded = lg.System.from_pretrained(directory, backbones=backbones)
    name = "new" if loaded.agents["b"].prompt == NEW_PROMPT else "old"
    assert name == "new" or loaded.agents["b"].prompt == "{a} and {{braces}} {question}"
    expected = versions[name == "new"]
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.state_dict().items()), name
    return name


def test_a_save_failing_at_any_file_operation_leaves_the_old_checkpoint(system, backbones, versions, tmp_path):
    from faults import count, fail, hidden, injected

    names = count(lambda: system.save_pretrained(old_checkpoint_with_a_readme(tmp_path, "clean")))
    committed = names.index("exchange") + 1 if "exchange" in names else names.index("rename") + 2
    for k in range(1, len(names) + 1):
        directory = old_checkpoint_with_a_readme(tmp_path, f"k{k}")
        try:
            with injected(k, fail()):
                system.save_pretrained(directory)
        except lg.CheckpointError as e:
            assert k <= committed and "disk is full" in str(e), (k, names[k - 1])
            assert loads_as(directory, backbones, versions) == "old", (k, names[k - 1])
        else:  # past the commit; or a hard link of the README failed, and it was copied instead
            assert k > committed or names[k - 1] == "link", (k, names[k - 1])
            assert loads_as(directory, backbones, versions) == "new", (k, names[k - 1])
        assert (directory / "README.md").read_text() == "my notes", (k, names[k - 1])
        assert hidden(tmp_path) == [], (k, names[k - 1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills are simulated in forked children")
def test_a_save_killed_at_any_file_operation_leaves_the_old_or_the_new_checkpoint(system, backbones, versions,
                                                                                    tmp_path):
    from faults import KILLED, count, hidden, killed_at

    names = count(lambda: system.save_pretrained(old_checkpoint_with_a_readme(tmp_path, "clean")))
    seen = []
    for k in range(1, len(names) + 1):
        directory = old_checkpoint_with_a_readme(tmp_path, f"k{k}")
        assert killed_at(k, lambda directory=directory: system.save_pretrained(directory)) == KILLED
        seen.append(loads_as(directory, backbones, versions))  # stale temporaries beside it do not matter
        assert (directory / "README.md").read_text() == "my notes"
        system.save_pretrained(directory)  # the next save deletes what the killed one left
        assert hidden(tmp_path) == [], (k, names[k - 1])
    assert seen[0] == "old" and seen[-1] == "new", list(zip(names, seen))


def test_a_read_only_or_full_target_raises_and_keeps_the_old_checkpoint(system, backbones, versions, tmp_path):
    from faults import fail, hidden, injected

    directory = old_checkpoint_with_a_readme(tmp_path, "ckpt")
    for number, words in [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
                          (errno.ENOSPC, "disk is full")]:
        with injected(1, fail(number)), pytest.raises(lg.CheckpointError, match=f"cannot write .*ckpt.*{words}"):
            system.save_pretrained(directory)
        assert loads_as(directory, backbones, versions) == "old" and hidden(tmp_path) == []


def test_other_files_in_the_folder_survive_a_save(system, backbones, versions, tmp_path):
    directory = old_checkpoint_with_a_readme(tmp_path, "ckpt")
    (directory / "checkpoint-2").mkdir()
    (directory / "checkpoint-2" / "trainer_state.pt").write_bytes(b"state")
    system.save_pretrained(directory)
    assert loads_as(directory, backbones, versions) == "new"
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "checkpoint-2", CONFIG_NAME, WEIGHTS_NAME]
    assert (directory / "README.md").read_text() == "my notes"
    assert (directory / "checkpoint-2" / "trainer_state.pt").read_bytes() == b"state"


def test_the_weights_get_the_mode_of_the_config(system, tmp_path):
    previous = os.umask(0o002)
    try:
        system.save_pretrained(tmp_path)
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in (CONFIG_NAME, WEIGHTS_NAME)}
    assert modes == {CONFIG_NAME: 0o664, WEIGHTS_NAME: 0o664}


class Exploit:
    """Unpickling this would create ``marker``; a safe load must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("write", [
    lambda path, marker: torch.save({"w": Exploit(marker)}, path, pickle_protocol=4),  # torch warns on protocol 4
    lambda path, marker: torch.jit.save(torch.jit.script(nn.Linear(2, 2)), path),  # and on a TorchScript archive
], ids=["pickle protocol 4", "TorchScript"])
def test_a_refused_pickle_is_our_error_alone_without_torch_warnings(tmp_path, write):
    from latentgraph.checkpoints.native import unpickle_safely

    path, marker = tmp_path / "state.pt", tmp_path / "pwned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecates itself; only the load's warnings are under test
        write(path, marker)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(lg.CheckpointError, match="state.pt is not "
                                                                                                 "a trainer state: "):
        warnings.simplefilter("always")
        unpickle_safely(path, "a trainer state")
    assert [str(w.message) for w in caught] == [] and not marker.exists()
