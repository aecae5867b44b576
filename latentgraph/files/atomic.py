"""Crash-safe writes: at every instant a file or folder holds its complete old or its complete new version.

- :func:`write_directory` (built on :func:`atomic_directory`) writes a folder such as a checkpoint. The new
  version is written into a hidden sibling ``.<name>.tmp-<pid>-<hex>``, every file and folder in it is
  fsynced, and it is committed in one step: ``rename`` when the target does not exist, else an atomic
  exchange of the two folders (Linux ``renameat2(RENAME_EXCHANGE)``), after which the old version, now at
  the sibling's name, is deleted. Entries of the old folder that the new version does not write (a user's
  README, a training output's ``checkpoint-N/`` folders) are carried into the new one before the exchange,
  as hard links (copies where links fail); they are never moved out of the old folder.
- :func:`atomic_write_bytes` and :func:`atomic_write_text` write one file: a temporary file in the same
  folder, fsync, ``os.replace``, fsync of the folder.

New files get mode ``0o666 & ~umask``, as ``open()`` gives; a replaced file or folder keeps its mode.

A failure Python sees (full disk, read-only or forbidden target, an exception while writing) removes the
temporary files, leaves the target as it was, and raises :class:`~latentgraph.errors.CheckpointError` naming
the target, the cause and the fix. A kill leaves the old or the new version at the target and, at worst, a
hidden temporary sibling: readers never look at those, and the next save of the same target deletes the
ones whose process is gone.

Where the exchange is unavailable (not Linux, an old C library, a filesystem that refuses it), a commit
renames the old folder aside to ``.<name>.old-<pid>-<hex>``, renames the new one in, and deletes the old
one. A kill between those two renames leaves no folder at the target but the complete old version aside;
:func:`recover`, which every loader and the next save call, puts it back (for a path inside it, too). Either
way no reader ever sees a mix of old and new files. Concurrent saves to the same folder are not supported,
and a mount point cannot be replaced as a whole: save into a folder inside it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointError

_TEMP = re.compile(r"^\.(?P<main>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_active: set[str] = set()  # temporary paths this process is writing now: never cleaned up as stale
_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or save somewhere else",
    errno.EDQUOT: "the disk quota is exceeded: free some space or save somewhere else",
    errno.EROFS: "the filesystem is read-only: save somewhere writable",
    errno.EACCES: "permission denied: save into a folder you may write to",
    errno.EPERM: "permission denied: save into a folder you may write to",
    errno.EXDEV: "it cannot be replaced as a whole (a mount point?): save into a folder inside it",
    errno.EBUSY: "it cannot be replaced as a whole (a mount point?): save into a folder inside it",
}


def write_directory(target: str | Path, files: Mapping[str, bytes]) -> Path:
    """Make the folder ``target`` hold ``files`` (``{name: content}``) plus the entries it already had that
    ``files`` does not name, in one crash-safe commit; returns ``target``."""
    with atomic_directory(target) as folder:
        for name, data in files.items():
            _create(folder / name, data)
    return Path(target)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; when the block ends without an exception, commit it
    as ``target`` (see the module docstring). An exception removes the folder and leaves ``target`` as it
    was; an ``OSError`` becomes a :class:`~latentgraph.errors.CheckpointError`."""
    target = _resolve(target)
    temporary, existed, committed = None, os.path.lexists(target), False
    try:
        recover(target)  # first: a parent folder left aside goes back, rather than a new empty one made
        os.makedirs(target.parent, exist_ok=True)
        _clean_stale(target)
        existed = os.path.lexists(target)
        if existed and not os.path.isdir(target):
            raise CheckpointError(f"cannot write the folder {target}: a file of that name exists; remove it "
                                  "or choose another folder")
        temporary = _temporary(target, "tmp")
        os.mkdir(temporary)
        yield temporary
        _commit(temporary, target, existed)
        committed = True
    except OSError as e:
        raise _error(target, e, existed) from e
    finally:
        if temporary is not None:
            if not committed and os.path.lexists(temporary):
                _remove_quietly(temporary)
            _active.discard(str(temporary))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace the file ``path`` by one holding ``data``, crash-safely; returns ``path``."""
    path = Path(path)
    target = _resolve(path)
    temporary, existed = None, os.path.lexists(target)
    try:
        _clean_stale(target)
        existed = os.path.lexists(target)
        temporary = _temporary(target, "tmp")
        _create(temporary, data, sync=True)
        if existed and os.path.isfile(target):
            os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(temporary, target)
        _sync_directory(target.parent, strict=False)  # committed: a failure here cannot undo it
    except OSError as e:
        raise _error(target, e, existed) from e
    finally:
        if temporary is not None:
            if os.path.lexists(temporary):
                _remove_quietly(temporary)
            _active.discard(str(temporary))
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded with ``encoding``."""
    return atomic_write_bytes(path, text.encode(encoding))


def recover(target: str | Path) -> Path:
    """The path to read ``target`` from: ``target``, unless a kill cut a fallback commit of it (or of a folder
    above it) between its two renames; the old version it left aside goes back, or is read there if still in use."""
    given = Path(target)
    path, missing = Path(os.path.realpath(given)), []  # missing: the absent last components, innermost first
    while not os.path.lexists(path) and path.name:
        missing.append(path.name)
        path = path.parent
    for name in reversed(missing):
        path /= name
        asides = [(aside, pid) for aside, kind, pid in _siblings(path) if kind == "old"]
        if not asides:
            return given  # nothing aside: absent, as it was
        aside, pid = max(asides, key=lambda found: _mtime(found[0]))
        if not _stale(aside, pid):  # a save is between its two renames right now: read the old version aside
            path = aside
            continue
        try:
            os.rename(aside, path)
            _sync_directory(path.parent, strict=False)
        except OSError:
            path = aside
    return given if path == Path(os.path.realpath(given)) else path


def _commit(temporary: Path, target: Path, existed: bool) -> None:
    """Sync ``temporary``'s files, carry the old entries over, sync its folders, and swap it in."""
    for root, _, names in os.walk(temporary):
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                _sync_file(path)
    if existed:
        _carry(target, temporary)
        os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
    for root, _, _ in os.walk(temporary, topdown=False):
        _sync_directory(Path(root))
    cwd = _cwd()
    if not existed:
        os.rename(temporary, target)
        _sync_directory(target.parent, strict=False)  # committed: a failure here cannot undo it
        return
    try:
        _exchange(temporary, target)
        old = temporary  # the exchange put the old version at the temporary name
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        old = _temporary(target, "old")
        try:
            os.rename(target, old)
            try:
                os.rename(temporary, target)
            except OSError:
                try:
                    os.rename(old, target)
                except OSError:
                    pass  # the old version stays aside, complete: recover() puts it back
                raise
        finally:
            _active.discard(str(old))
    # committed: what follows only tidies up, and no failure of it fails the save
    if cwd is not None and (cwd == str(target) or cwd.startswith(str(target) + os.sep)):
        try:
            os.chdir(cwd)  # the process stood in the old folder: stand in the new one at the same path
        except OSError:
            pass
    _sync_directory(target.parent, strict=False)
    _remove_quietly(old)


def _carry(source: Path, destination: Path) -> None:
    """Add to ``destination`` the entries of ``source`` it does not have: folders recreated, everything
    else hard-linked (copied where that fails). ``source`` is not changed."""
    present = set(os.listdir(destination))
    for name in os.listdir(source):
        match = _TEMP.match(name)
        if match:
            # a temporary left by a killed save of an entry: garbage, unless it is the complete old
            # version of an entry that a kill left missing (then it is carried under the entry's name)
            if match["kind"] != "old" or os.path.lexists(source / match["main"]):
                continue
            name, src = match["main"], source / name
        else:
            src = source / name
        if name in present:
            continue
        present.add(name)
        dst = destination / name
        if os.path.isdir(src) and not os.path.islink(src):
            os.mkdir(dst)
            _carry(src, dst)
            os.chmod(dst, stat.S_IMODE(os.lstat(src).st_mode))
            continue
        try:
            os.link(src, dst, follow_symlinks=False)
        except (OSError, NotImplementedError):
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
            elif os.path.isfile(src):
                shutil.copy2(src, dst)
                _sync_file(dst)
            else:
                warnings.warn(f"{src} is neither a file nor a folder and could not be linked; the new "
                              f"version of {source} goes without it", stacklevel=4)


def _create(path: Path | str, data: bytes, sync: bool = False) -> None:
    """Create the file ``path`` (it must not exist) holding ``data``, mode ``0o666 & ~umask``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
                 | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _sync_file(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(path: Path, strict: bool = True) -> None:
    """fsync a folder, so the entries created or renamed in it last through a crash (POSIX only)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if strict:
            raise


def _exchange(a: Path, b: Path) -> None:
    """Swap the folders ``a`` and ``b`` in one atomic step; ``OSError(EINVAL or ENOSYS)`` where the system
    or the filesystem cannot."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is unavailable")
    if _renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), str(a), None, str(b))


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.3
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def _resolve(target: str | Path) -> Path:
    """An absolute path whose last component is a real entry: a symlink to a folder is followed, so the
    folder it names is replaced, not the link."""
    path = Path(os.path.abspath(target))
    if os.path.islink(path):
        path = Path(os.path.realpath(path))
    if not path.name:
        raise CheckpointError(f"cannot write {target}: give a folder or file below the filesystem root")
    return path


def _temporary(target: Path, kind: str) -> Path:
    path = target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    _active.add(str(path))
    return path


def _siblings(target: Path) -> list[tuple[Path, str, int]]:
    """The temporaries of ``target`` in its folder: ``(path, "tmp" or "old", pid)``."""
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    found = []
    for name in names:
        match = _TEMP.match(name)
        if match and match["main"] == target.name:
            found.append((target.parent / name, match["kind"], int(match["pid"])))
    return found


def _clean_stale(target: Path) -> None:
    """Delete the temporaries of ``target`` that no running save owns (left by a kill)."""
    for path, _, pid in _siblings(target):
        if _stale(path, pid):
            _remove_quietly(path)


def _stale(path: Path, pid: int) -> bool:
    """Whether no running save owns the temporary ``path`` written by process ``pid``."""
    return str(path) not in _active if pid == os.getpid() else not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        mode = os.lstat(path).st_mode
        if mode & 0o700 != 0o700:  # an old version's read-only folder: its entries can only go once it is not
            os.chmod(path, stat.S_IMODE(mode) | 0o700)
        with os.scandir(path) as entries:
            children = [Path(entry.path) for entry in entries]
        for child in children:
            _remove(child)
        os.rmdir(path)
    else:
        os.unlink(path)


def _remove_quietly(path: Path) -> None:
    """Delete a temporary file or folder; warn when it cannot be, naming it."""
    try:
        _remove(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass
    if os.path.lexists(path):
        warnings.warn(f"could not delete the temporary {path}; the next save beside it deletes it, or delete "
                      "it yourself", stacklevel=4)


def _error(target: Path, e: OSError, existed: bool) -> CheckpointError:
    fix = _FIXES.get(e.errno or 0, "check the path and the disk")
    kept = f"{target} still holds its previous version" if existed else f"nothing was written to {target}"
    return CheckpointError(f"cannot write {target}: {e.strerror or e} ({fix}); {kept}")
