"""cgroup v1 for the sandbox: one cgroup per run and controller, which caps and kills the whole process tree.

A run's cgroups are made under this process's own cgroup, so that the limits and the accounting that apply to
us apply to the sandbox too. The ``pids`` controller caps processes and threads, the ``memory`` controller the
memory of the run (tmpfs files included); unlike rlimits these hold for root too. Kept apart from
:mod:`latentgraph.tools.sandbox` because it is one OS mechanism with its own probing, limits and teardown.
"""

from __future__ import annotations

import functools
import os
import signal
import time
import uuid
from pathlib import Path

_CGROUP_FS = Path("/sys/fs/cgroup")
CONTROLLERS = ("pids", "memory")


def _own_cgroup(controller: str) -> Path:
    """This process's cgroup directory in the cgroup v1 hierarchy of ``controller``."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return _CGROUP_FS / controllers / path.lstrip("/")
    raise OSError(f"no cgroup v1 hierarchy has the '{controller}' controller")


def _limit_files(controller: str, max_processes: int, memory_mb: int) -> dict[str, int]:
    if controller == "pids":
        return {"pids.max": max_processes}
    memory = memory_mb * 2**20  # memory+swap as well, where swap is accounted: nothing spills to swap
    return {"memory.limit_in_bytes": memory, "memory.memsw.limit_in_bytes": memory}


def make_cgroup(parent: Path, controller: str, max_processes: int, memory_mb: int) -> Path:
    """Makes a fresh run cgroup under ``parent`` and sets its limit for ``controller``."""
    path = parent / f"latentgraph-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    for name, value in _limit_files(controller, max_processes, memory_mb).items():
        if (path / name).exists():
            (path / name).write_text(str(value))
    return path


@functools.cache
def probe_cgroup(controller: str) -> Path | str:
    """The parent directory of this controller's run cgroups, or why there is none."""
    try:
        parent = _own_cgroup(controller)
        make_cgroup(parent, controller, max_processes=32, memory_mb=512).rmdir()  # Limits()'s defaults
        return parent
    except OSError as err:
        return f"cgroup v1 '{controller}' controller not usable ({err}); run as root on a cgroup v1 machine"


def oom_kills(memory_cgroup: Path) -> int:
    """How many processes of a run's memory cgroup the OOM killer has killed."""
    for line in (memory_cgroup / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def kill_cgroup(path: Path, deadline: float) -> bool:
    """Kills every process in a run's cgroup and removes it. Returns whether it was gone by ``deadline``."""
    while time.monotonic() < deadline:
        try:
            pids = [int(pid) for pid in (path / "cgroup.procs").read_text().split()]
            if not pids:
                path.rmdir()
                return True
        except FileNotFoundError:
            return True
        except OSError:  # EBUSY: the last processes are still being torn down
            pids = []
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:  # the pid may have been reused between reading and opening it: check before killing
                if path.name in Path(f"/proc/{pid}/cgroup").read_text():
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(pidfd)
        time.sleep(0.005)
    return False
