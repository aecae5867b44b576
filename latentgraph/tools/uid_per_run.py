"""Runs with a uid of their own: how root runs model-written code where bubblewrap is unavailable.

Each run gets a fresh unprivileged uid (:func:`fresh_uid`), with no groups and ``no_new_privs``; the launcher
(:mod:`latentgraph.tools.launcher`) switches to it, after making private mounts where root may. When the run
ends, :func:`reap` kills every process of that uid, daemons included. :func:`probe_user` finds out once whether
this machine allows it, with private mounts or without. Kept apart from :mod:`latentgraph.tools.sandbox`
because it is the one fallback with programs, probing and cleanup of its own.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .bubblewrap import python_dirs
from .launcher import launcher_command

# Kills every process of a run's own uid, daemons included: with that uid, kill(-1) reaches exactly those.
_REAPER = r"""
import os, signal, sys, time
uid, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)

def alive():
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == str(os.getpid()):
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        except (OSError, ValueError):
            continue
        if status["Uid"].split()[0] == str(uid) and status["State"].split()[0] not in "ZX":
            return True
    return False

while time.monotonic() < deadline:
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        sys.exit(0)
    if not alive():  # only zombies left, which their parent reaps
        sys.exit(0)
    time.sleep(0.002)
sys.exit(1)
"""

RUN_UIDS = (2_000_000_000, 2_100_000_000)  # a fresh uid per run, unlikely to be any user's or container's


def fresh_uid() -> int:
    """An unused uid for one run: random in :data:`RUN_UIDS`, owning no process on this machine."""
    while True:
        uid = RUN_UIDS[0] + secrets.randbelow(RUN_UIDS[1] - RUN_UIDS[0])
        try:
            if all(entry.stat().st_uid != uid for entry in Path("/proc").iterdir() if entry.name.isdigit()):
                return uid
        except OSError:  # a process ended while we looked
            continue


def reap(uid: int) -> bool:
    """Kills every process of a run's uid. Returns whether none was left within 5 s."""
    try:
        reaper = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", _REAPER, str(uid), "5"], timeout=30,
                                env={"PATH": os.defpath}, capture_output=True, check=False)
    except subprocess.TimeoutExpired:
        return False
    return reaper.returncode == 0


def _reach(readable: Sequence[str]) -> list[str]:
    """What a run with its own uid must be able to read: the Python installation and the readable paths."""
    return sorted({os.path.realpath(path) for path in [*python_dirs(), *readable]})


_PROBE = ("import os, sys\n"  # reads every path it is given
          "for p in sys.argv[1:]:\n    os.listdir(p) if os.path.isdir(p) else open(p, 'rb').close()")


@functools.cache
def probe_user(readable: tuple[str, ...], tmp_bytes: int) -> tuple[dict | None, str | None]:
    """How runs get a uid of their own here: ``({"mounts": bool}, None)``, or ``(None, why they cannot)``.

    Tries private mounts first, then the uid alone, each with a run like the real ones that reads the Python
    installation and every readable path.
    """
    problems = []
    for mounts in (True, False):
        uid, workdir = fresh_uid(), None if mounts else tempfile.mkdtemp(prefix="latentgraph-sandbox-")
        try:
            if workdir is not None:
                os.chown(workdir, uid, uid)
            user = user_config(uid, mounts, readable, tmp_bytes, workdir)
            config = {"cgroups": [], "rlimits": {}, "user": user}
            probe = subprocess.run([*launcher_command(config), sys.executable, "-I", "-S", "-c", _PROBE,
                                    *_reach(readable)], capture_output=True, text=True, timeout=30,
                                   env={"PATH": os.defpath},
                                   cwd="/", check=False, start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as err:
            problems.append(str(err))
            continue
        finally:
            reap(uid)
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
        if probe.returncode == 0:
            return {"mounts": mounts}, None
        lines = probe.stderr.strip().splitlines()
        problems.append(lines[-1] if lines else f"exit status {probe.returncode}")
    return None, f"with private mounts: {problems[0]}; without: {problems[-1]}"


def user_config(uid: int, mounts: bool, readable: Sequence[str], tmp_bytes: int,
                workdir: str | None) -> dict:
    """The launcher's settings for a run with its own uid; ``workdir`` is used without mounts only."""
    return {"uid": uid, "mounts": mounts, "reach": _reach(readable) if mounts else [], "tmp_bytes": tmp_bytes,
            "workdir": "/tmp" if mounts else workdir}
