"""Every loader of a saved folder first puts back what a save killed midway left aside.

Where folders cannot be exchanged atomically, a save renames the old folder aside and the new one in; a
kill between the two leaves no folder under the name, and its complete old version aside. A kill at any
step of such a save leaves the old or the new version, and System.from_pretrained, lg.load and the command
line's --style each load it whole: its config and every link tensor, exactly."""

import os
import shutil

import pytest
import torch
from faults import KILLED, count, killed_at, no_fsync
from test_cli_errors import run_main

import latentgraph as lg
from latentgraph import cli
from latentgraph.files import atomic

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills are simulated in forked children")


def through_the_cli(command):
    """A loader: the system the command line ``latentgraph *command(folder)`` loads, resolving its ``--style DIR``
    (or render's ``DIR``)."""

    def load(folder, monkeypatch):
        loaded, real = [], cli.load
        monkeypatch.setattr(cli, "load", lambda style, **kwargs: loaded.append(real(style, **kwargs)) or loaded[-1])
        assert run_main(monkeypatch, command(folder)) == 0
        return loaded[0]

    return load


LOADERS = {
    "from_pretrained": lambda folder, monkeypatch: lg.System.from_pretrained(folder, device="cpu"),
    "load": lambda folder, monkeypatch: lg.load(str(folder), device="cpu"),
    # cheap: render loads no backbone weights
    "render": through_the_cli(lambda folder: ["render", str(folder), "-o", str(folder.parent / "system.dot")]),
}
RUN = through_the_cli(lambda folder: ["run", "Q?", "--style", str(folder), "--device", "cpu", "--mode", "single",
                                      "--rounds", "1", "--max-new-tokens", "1"])


@pytest.fixture
def versions(saved):
    """The saved system, changed (a prompt and every link tensor) to be saved over it, and what each version
    is: ``{"old" or "new": (config, link tensors)}``."""
    system = lg.load(saved, device="cpu")

    def version():
        return system.to_config(), {key: value.clone() for key, value in system.state_dict().items()}

    old = version()
    system.agents["solver"].prompt += " Be brief."
    with torch.no_grad():
        for parameter in system.parameters():
            parameter.add_(1.0)
    return system, {"old": old, "new": version()}


def loaded_version(system, versions):
    """Which version ``system`` is, after checking it is that version exactly."""
    name = "new" if system.to_config() == versions["new"][0] else "old"
    config, tensors = versions[name]
    assert system.to_config() == config
    assert system.state_dict().keys() == tensors.keys()
    assert all(torch.equal(tensor, tensors[key]) for key, tensor in system.state_dict().items()), name
    return name


def test_every_loader_loads_the_old_or_the_new_version_after_a_kill_at_any_step(saved, versions, tmp_path,
                                                                                monkeypatch):
    no_fsync(monkeypatch)
    monkeypatch.setattr(atomic, "_renameat2", None)  # no exchange: the commit is two renames
    system, expected = versions
    names = count(lambda: system.save_pretrained(shutil.copytree(saved, tmp_path / "probe")))
    seen, left_aside = [], []
    for k in range(1, len(names) + 1):
        killed = shutil.copytree(saved, tmp_path / f"k{k}" / "system")
        assert killed_at(k, lambda killed=killed: system.save_pretrained(killed)) == KILLED
        left_aside.append(not killed.exists())
        outcomes = set()
        for loader, load in LOADERS.items():
            copy = shutil.copytree(killed.parent, tmp_path / f"k{k}-{loader}")  # with what lies beside the folder
            outcomes.add(loaded_version(load(copy / "system", monkeypatch), expected))
        assert len(outcomes) == 1, (k, names[k - 1], outcomes)
        seen.append(outcomes.pop())
    assert any(left_aside), names  # some kill came between the two renames
    assert "old" in seen and "new" in seen and seen == sorted(seen, key=["old", "new"].index), list(zip(names, seen))


def test_run_style_puts_back_a_folder_left_aside(saved, versions, tmp_path, monkeypatch):
    no_fsync(monkeypatch)
    monkeypatch.setattr(atomic, "_renameat2", None)
    system, expected = versions
    names = count(lambda: system.save_pretrained(shutil.copytree(saved, tmp_path / "probe")))
    second_rename = [k for k, name in enumerate(names, start=1) if name == "rename"][1]
    assert killed_at(second_rename, lambda: system.save_pretrained(saved)) == KILLED
    assert not saved.exists()
    assert loaded_version(RUN(saved, monkeypatch), expected) == "old" and saved.exists()
