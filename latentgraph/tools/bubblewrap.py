"""bubblewrap (``bwrap``) for the sandbox: the command line of a run's namespaces, and whether it works here.

A run inside bubblewrap gets new user, PID, network, IPC, UTS, cgroup and mount namespaces; the mount
namespace shows the system directories, the Python installation and the readable paths, read-only, and private
tmpfs at ``/tmp`` and ``/dev/shm``. Kept apart from :mod:`latentgraph.tools.sandbox` because it is one OS
mechanism with its own profile and probe.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Sequence

_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_ENTRIES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "passwd", "group",
                "nsswitch.conf", "hosts")


def python_dirs() -> list[str]:
    """Directories the interpreter needs: the environment, the base installation, and their real paths."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable)}
    return sorted(paths | {os.path.realpath(path) for path in paths})


def bwrap_args(bwrap: str, readable: Sequence[str], nested_userns: bool) -> list[str]:
    """The bwrap command line (up to its ``--``) of a run that may read ``readable``."""
    args = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup", "--cap-drop", "ALL", "--die-with-parent", "--new-session"]
    if not nested_userns:
        args += ["--disable-userns"]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for name in _ETC_ENTRIES:
        if os.path.lexists(f"/etc/{name}"):
            args += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
    args += ["--tmpfs", "/tmp"]
    for path in [*python_dirs(), *readable]:  # after /tmp, so that a path under /tmp is not hidden by it
        args += ["--ro-bind", path, path]
    return args + ["--remount-ro", "/", "--chdir", "/tmp"]


@functools.cache
def probe_bwrap(args: tuple[str, ...]) -> str | None:
    """Why bubblewrap cannot run this profile here, or None when it can."""
    try:
        probe = subprocess.run([*args, "--", sys.executable, "-I", "-S", "-c", "pass"], capture_output=True,
                               text=True, timeout=30, env={"PATH": os.defpath}, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bwrap failed to start ({err})"
    if probe.returncode != 0:
        reason = probe.stderr.strip() or f"exit status {probe.returncode}"
        return f"bwrap cannot create its namespaces here ({reason}); allow user namespaces or run as root"
    return None
