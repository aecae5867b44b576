"""Waiting on a sandbox run and reading what it wrote: pidfds, the PID namespace's init, bounded output.

A run is watched through pidfds, so that no pid or process group is signalled after another process may have
taken it, and its output is read in bounded memory whatever its size. Kept apart from
:mod:`latentgraph.tools.sandbox` because it is about processes and files, not about isolation.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from typing import IO


def wait_for_run(proc: subprocess.Popen, status_fd: int | None, deadline: float) -> bool:
    """Waits for a run to end or for its deadline, then kills what is left. Returns whether it timed out.

    The child is watched through a pidfd and reaped only at the end, so that neither its pid nor its process
    group can be taken by another process while we still signal them.
    """
    child = os.pidfd_open(proc.pid)
    init = _namespace_init(status_fd, deadline) if status_fd is not None else None
    try:
        timed_out = not _readable(child, deadline - time.monotonic())
        if init is not None:
            _kill(init)  # ends the PID namespace: the kernel kills everything in it
            _readable(child, 5)  # then bwrap exits by itself, after reaping its init
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # without bwrap: whatever stayed in the process group
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        if init is not None:  # the init is gone only once every process of its namespace is
            _readable(init, 5)
    finally:
        for pidfd in (child, init):
            if pidfd is not None:
                os.close(pidfd)
    return timed_out


def _namespace_init(status_fd: int, deadline: float) -> int | None:
    """A pidfd of the PID namespace's init, from bwrap's first status line (None if bwrap failed)."""
    line = b""
    while not line.endswith(b"\n") and _readable(status_fd, deadline - time.monotonic()):
        chunk = os.read(status_fd, 4096)
        if not chunk:
            return None
        line += chunk
    try:
        return os.pidfd_open(json.loads(line.split(b"\n")[0])["child-pid"])
    except (ValueError, KeyError, ProcessLookupError):
        return None


def _readable(fd: int, timeout: float) -> bool:
    """Waits until ``fd`` is readable (for a pidfd: its process has exited) or ``timeout`` seconds pass."""
    poller = select.poll()  # unlike select(), poll() takes descriptors above 1024
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(timeout, 0) * 1000))


def _kill(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def read_head_and_tail(file: IO[bytes], max_bytes: int) -> str:
    """Reads an output file of any size in bounded memory: all of it, or its head and its tail."""
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    if size <= max_bytes:
        return file.read().decode("utf-8", "replace")
    head = file.read(max_bytes // 2)
    file.seek(size - max_bytes // 2)
    tail = file.read()
    cut = f"\n[... {size - len(head) - len(tail)} bytes of output cut ...]\n"
    return head.decode("utf-8", "replace") + cut + tail.decode("utf-8", "replace")
