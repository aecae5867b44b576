"""Crash-safe writes: a save failed or killed at any of its file operations leaves the complete old or the
complete new version, never a mix, and no temporaries once Python sees the failure."""

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest
from faults import KILLED, count, fail, hidden, injected, killed_at, no_fsync

from latentgraph.errors import CheckpointError
from latentgraph.files import atomic
from latentgraph.files.atomic import atomic_directory, atomic_write_bytes, recover, write_directory

OLD = {"config.json": b'{"prompt": "old"}', "weights.bin": b"\x01" * 1000}
NEW = {"config.json": b'{"prompt": "new"}', "weights.bin": b"\x02" * 1500}
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills are simulated in forked children")


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    no_fsync(monkeypatch)


@pytest.fixture(params=["exchange", "fallback"])
def commit(request, monkeypatch):
    """Commit by atomic exchange, or by the two renames used where renameat2 is unavailable."""
    if request.param == "exchange" and atomic._renameat2 is None:
        pytest.skip("renameat2 is unavailable here")
    if request.param == "fallback":
        monkeypatch.setattr(atomic, "_renameat2", None)
    return request.param


def snapshot(folder):
    """What a reader sees in ``folder`` (hidden temporaries aside): ``{path: bytes, or "->target" for a
    symlink, or "/" for a folder}``."""
    seen = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in dirs + [f for f in files if not f.startswith(".")]:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            if os.path.islink(path):
                seen[key] = "->" + os.readlink(path)
            elif os.path.isdir(path):
                seen[key] = "/"
            else:
                with open(path, "rb") as f:
                    seen[key] = f.read()
    return seen


def with_extras(folder):
    """Give an existing checkpoint folder what a user or a training run adds: files the saves do not write."""
    (folder / "README.md").write_text("my notes")
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "trainer_state.pt").write_bytes(b"state")
    (folder / "checkpoint-2" / "nested").mkdir()
    (folder / "checkpoint-2" / "nested" / "log.jsonl").write_text("{}\n")
    os.symlink("README.md", folder / "notes")
    return snapshot(folder)


def test_a_save_writes_new_files_and_keeps_every_other_entry(tmp_path):
    target = tmp_path / "ckpt"
    assert write_directory(target, OLD) == target
    assert snapshot(target) == OLD
    os.chmod(target, 0o750)
    extras = with_extras(target)
    os.chmod(target / "checkpoint-2" / "nested", 0o555)
    inode = os.stat(target / "checkpoint-2" / "trainer_state.pt").st_ino
    write_directory(target, NEW)
    assert snapshot(target) == {**extras, **NEW}
    assert os.stat(target / "checkpoint-2" / "trainer_state.pt").st_ino == inode  # linked, not copied
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o750  # folders keep their modes
    assert stat.S_IMODE(os.stat(target / "checkpoint-2" / "nested").st_mode) == 0o555
    assert hidden(tmp_path) == []


def test_carried_files_are_copied_where_hard_links_fail(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    write_directory(target, OLD)
    extras = with_extras(target)

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "this filesystem has no hard links")

    monkeypatch.setattr(os, "link", no_links)
    write_directory(target, NEW)
    assert snapshot(target) == {**extras, **NEW}
    assert hidden(tmp_path) == []


def test_new_files_get_the_umask_mode_and_a_replaced_file_keeps_its_mode(tmp_path):
    previous = os.umask(0o027)
    try:
        write_directory(tmp_path / "ckpt", OLD)
        atomic_write_bytes(tmp_path / "summary.json", b"{}")
        (tmp_path / "settings.json").write_bytes(b"{}")
        os.chmod(tmp_path / "settings.json", 0o600)
        atomic_write_bytes(tmp_path / "settings.json", b"[]")
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "ckpt" / name).st_mode) for name in OLD}
    assert modes == {name: 0o640 for name in OLD}
    assert stat.S_IMODE(os.stat(tmp_path / "summary.json").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "settings.json").st_mode) == 0o600
    assert (tmp_path / "settings.json").read_bytes() == b"[]"


def test_a_save_failing_at_each_file_operation_leaves_the_old_folder(tmp_path, commit):
    """ENOSPC at operation k, for every k of a clean save: a CheckpointError and the old folder, whole; or,
    past the commit, the new one. Never a mix, never a temporary left behind."""
    write_directory(tmp_path / "clean", OLD)
    with_extras(tmp_path / "clean")
    names = count(lambda: write_directory(tmp_path / "clean", NEW))
    assert "exchange" in names and {"open", "write", "fsync", "link", "mkdir", "unlink", "rmdir"} <= set(names)
    outcomes = []
    for k in range(1, len(names) + 1):
        target = tmp_path / f"k{k}"
        write_directory(target, OLD)
        old = with_extras(target)
        try:
            with injected(k, fail(errno.ENOSPC)):
                write_directory(target, NEW)
        except CheckpointError as e:
            assert "the disk is full" in str(e) and "still holds its previous version" in str(e)
            assert snapshot(target) == old, (k, names[k - 1])
            outcomes.append("old")
        else:
            assert snapshot(target) == {**old, **NEW}, (k, names[k - 1])
            outcomes.append("new")
        assert hidden(tmp_path) == [], (k, names[k - 1])
    # old up to the commit (the exchange, or the second fallback rename), new after it; a failed hard link
    # is no failure: the file is copied instead
    committed = names.index("exchange") + (1 if commit == "exchange" else 3)
    assert outcomes == ["new" if k > committed or names[k - 1] == "link" else "old"
                        for k in range(1, len(names) + 1)], list(zip(names, outcomes))


def test_a_first_save_failing_at_each_file_operation_leaves_nothing(tmp_path):
    names = count(lambda: write_directory(tmp_path / "clean", NEW))
    for k in range(1, len(names) + 1):
        target = tmp_path / f"k{k}"
        try:
            with injected(k, fail(errno.ENOSPC)):
                write_directory(target, NEW)
        except CheckpointError as e:
            assert "nothing was written" in str(e)
            assert not target.exists()
        else:
            assert snapshot(target) == NEW
        assert hidden(tmp_path) == []


@needs_fork
def test_a_save_killed_at_each_file_operation_leaves_old_or_new(tmp_path, commit):
    """The process dies at operation k (no cleanup runs): the folder reads as the complete old or the
    complete new version; the next save deletes what the killed one left."""
    write_directory(tmp_path / "clean", OLD)
    with_extras(tmp_path / "clean")
    names = count(lambda: write_directory(tmp_path / "clean", NEW))
    outcomes = []
    for k in range(1, len(names) + 1):
        target = tmp_path / f"k{k}"
        write_directory(target, OLD)
        old = with_extras(target)
        assert killed_at(k, lambda target=target: write_directory(target, NEW)) == KILLED
        outcome = snapshot(recover(target))
        assert outcome in (old, {**old, **NEW}), (k, names[k - 1])
        outcomes.append("old" if outcome == old else "new")
        write_directory(target, NEW)  # the next save, by a live process, cleans up after the dead one
        assert snapshot(target) == {**old, **NEW}
        assert hidden(tmp_path) == [], (k, names[k - 1])
    committed = names.index("exchange") + (1 if commit == "exchange" else 3)
    assert outcomes == ["new" if k > committed else "old" for k in range(1, len(names) + 1)], \
        list(zip(names, outcomes))


@needs_fork
def test_a_kill_between_the_fallback_renames_is_recovered_by_readers(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", None)
    target = tmp_path / "ckpt"
    write_directory(target, OLD)
    names = count(lambda: write_directory(target, OLD))
    renames = [k for k, name in enumerate(names, start=1) if name == "rename"]
    assert killed_at(renames[1], lambda: write_directory(target, NEW)) == KILLED  # the old one is aside
    assert not target.exists() and any(".old-" in name for name in hidden(tmp_path))
    assert recover(target) == target and snapshot(target) == OLD


def killed_between_the_fallback_renames(target, files):
    """Kill a fallback save of ``files`` into the existing folder ``target`` between its two renames: the
    target is missing, its old version aside."""
    for leftover in target.parent.glob(f".{target.name}.*"):  # an earlier kill's: the save would delete it first
        shutil.rmtree(leftover)
    probe = target.parent / "probe"
    shutil.copytree(target, probe)  # the same entries: a save into it makes the same operations
    names = count(lambda: write_directory(probe, files))
    shutil.rmtree(probe)
    second_rename = [k for k, name in enumerate(names, start=1) if name == "rename"][1]
    assert killed_at(second_rename, lambda: write_directory(target, files)) == KILLED
    assert not target.exists() and any(f".{target.name}.old-" in name for name in os.listdir(target.parent))


@needs_fork
def test_a_folder_left_aside_is_put_back_for_a_path_inside_it(tmp_path, monkeypatch):
    """A training output whose save was killed between the fallback renames: reading or writing one of its
    checkpoint folders puts the output back first, whole."""
    monkeypatch.setattr(atomic, "_renameat2", None)
    output = tmp_path / "out"
    write_directory(output, OLD)
    write_directory(output / "checkpoint-2", NEW)
    before = snapshot(output)
    killed_between_the_fallback_renames(output, NEW)
    assert recover(output / "checkpoint-2" / "config.json") == output / "checkpoint-2" / "config.json"
    assert snapshot(output) == before and not any(".old-" in name for name in hidden(tmp_path))
    killed_between_the_fallback_renames(output, NEW)
    write_directory(output / "checkpoint-4", NEW)  # into the old output, not a new empty one beside it
    assert snapshot(output) == {**before, "checkpoint-4": "/", **{f"checkpoint-4/{k}": v for k, v in NEW.items()}}
    assert not any(".old-" in name for name in hidden(tmp_path))  # the killed saves' .tmp- go at the next save


def test_a_read_only_or_forbidden_target_raises_and_keeps_the_old_folder(tmp_path):
    target = tmp_path / "ckpt"
    write_directory(target, OLD)
    for number, words in [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
                          (errno.EDQUOT, "quota")]:
        with injected(1, fail(number)), pytest.raises(CheckpointError, match=words):
            write_directory(target, NEW)
        assert snapshot(target) == OLD and hidden(tmp_path) == []


def test_an_exception_while_writing_removes_the_temporary_folder(tmp_path):
    target = tmp_path / "ckpt"
    write_directory(target, OLD)
    with pytest.raises(ValueError), atomic_directory(target) as folder:
        (folder / "config.json").write_bytes(b"half")
        raise ValueError("the caller failed")
    assert snapshot(target) == OLD and hidden(tmp_path) == []


def test_a_file_where_the_folder_goes_is_refused(tmp_path):
    (tmp_path / "ckpt").write_text("not a folder")
    with pytest.raises(CheckpointError, match="a file of that name exists"):
        write_directory(tmp_path / "ckpt", OLD)
    assert (tmp_path / "ckpt").read_text() == "not a folder" and hidden(tmp_path) == []


def test_a_save_into_the_working_directory_keeps_it_usable(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    write_directory(target, OLD)
    monkeypatch.chdir(target)
    write_directory(".", NEW)
    assert os.getcwd() == str(target) and Path("config.json").read_bytes() == NEW["config.json"]


def test_a_symlinked_folder_is_written_through_the_link(tmp_path):
    write_directory(tmp_path / "real", OLD)
    os.symlink("real", tmp_path / "alias")
    write_directory(tmp_path / "alias", NEW)
    assert os.path.islink(tmp_path / "alias") and snapshot(tmp_path / "real") == NEW


def test_a_file_write_failing_at_each_operation_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    names = count(lambda: atomic_write_bytes(tmp_path / "clean.json", b"new"))
    for k in range(1, len(names) + 1):
        path.write_bytes(b"old")
        try:
            with injected(k, fail(errno.ENOSPC)):
                atomic_write_bytes(path, b"new")
        except CheckpointError as e:
            assert "the disk is full" in str(e)
            assert path.read_bytes() == b"old", (k, names[k - 1])
        else:
            assert path.read_bytes() == b"new", (k, names[k - 1])
        assert hidden(tmp_path) == []


@needs_fork
def test_a_file_write_killed_at_each_operation_leaves_old_or_new(tmp_path):
    path = tmp_path / "summary.json"
    names = count(lambda: atomic_write_bytes(tmp_path / "clean.json", b"new"))
    for k in range(1, len(names) + 1):
        path.write_bytes(b"old")
        assert killed_at(k, lambda: atomic_write_bytes(path, b"new")) == KILLED
        assert path.read_bytes() in (b"old", b"new"), (k, names[k - 1])
        atomic_write_bytes(path, b"newer")  # cleans up after the dead one
        assert hidden(tmp_path) == []
