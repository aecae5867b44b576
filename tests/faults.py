"""Fault injection for the crash-safety tests: fail or kill a save at its k-th file operation.

:mod:`latentgraph.files.atomic` makes every file operation of a save through its module-level ``os`` and
``_exchange``; :func:`injected` swaps in stand-ins that count those operations and act at the k-th one:
raise an ``OSError`` (a full disk, a read-only target) or end the process on the spot (a kill: no
``finally``, no cleanup). :func:`killed_at` runs a save in a forked child that is killed that way.
"""

import errno
import os
import signal
from contextlib import contextmanager

from latentgraph.files import atomic

OPERATIONS = ("open", "write", "close", "fsync", "mkdir", "link", "symlink", "rename", "replace", "unlink",
              "rmdir", "chmod")
KILLED = 77  # the exit status of a child killed at its k-th operation


class Counter:
    def __init__(self, at, action):
        self.at, self.action, self.names = at, action, []

    def __call__(self, name):
        self.names.append(name)
        if len(self.names) == self.at:
            self.action(name)


class Operations:
    """Stands in for ``os`` inside latentgraph.files.atomic; everything but :data:`OPERATIONS` is the real one."""

    def __init__(self, counter):
        self._counter = counter

    def __getattr__(self, name):
        real = getattr(os, name)
        if name not in OPERATIONS:
            return real

        def operation(*args, **kwargs):
            self._counter(name)
            return real(*args, **kwargs)

        return operation


@contextmanager
def injected(at=None, action=None):
    """Count latentgraph.files.atomic's file operations in the block (the names, in order, are in the yielded
    list); at the ``at``-th, call ``action(name)`` before doing it."""
    counter = Counter(at, action)
    real_os, real_exchange = atomic.os, atomic._exchange

    def exchange(a, b):
        counter("exchange")
        return real_exchange(a, b)

    atomic.os, atomic._exchange = Operations(counter), exchange
    try:
        yield counter.names
    finally:
        atomic.os, atomic._exchange = real_os, real_exchange


def fail(number=errno.ENOSPC):
    """An action raising ``OSError(number)``, as a full disk (ENOSPC) or a read-only target (EROFS) does."""

    def action(name):
        raise OSError(number, f"{os.strerror(number)} (injected in {name})")

    return action


def kill(name):
    os._exit(KILLED)


def count(save):
    """The file operations a clean ``save()`` performs."""
    with injected() as names:
        save()
    return list(names)


def killed_at(k, save, timeout=30):
    """Run ``save()`` in a forked child killed at its ``k``-th file operation; return the child's exit status
    (:data:`KILLED`, or 0 when the save finished first; ``-SIGALRM`` when it hung for ``timeout`` seconds)."""
    pid = os.fork()
    if pid == 0:  # the child: nothing but the save, then _exit (no pytest teardown, no atexit)
        status = 1
        try:
            signal.alarm(timeout)
            with injected(k, kill):
                save()
            status = 0
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def hidden(folder):
    """The temporaries (hidden entries) in ``folder`` and below."""
    return sorted(os.path.relpath(os.path.join(root, name), folder) for root, dirs, files in os.walk(folder)
                  for name in dirs + files if name.startswith("."))


def no_fsync(monkeypatch):
    """Make fsync free: these tests kill processes, which loses no written data (only a power cut does, and
    that is what the fsyncs are for), and hundreds of real fsyncs would make them slow."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
