"""A process sandbox for programs a model wrote.

Every run starts a fresh process tree in a fresh temporary directory, with an environment built from scratch
(nothing is inherited, so no API keys or tokens), limits on wall time, CPU time, memory and the number of
processes, and its output captured in a file of bounded size. Two OS mechanisms make it a real sandbox; each
is used where the machine allows it:

* bubblewrap (``bwrap``): new user, PID, network, IPC, UTS, cgroup and mount namespaces. The mount namespace
  shows only the system directories (``/usr``, ``/lib*``, a few files of ``/etc``), the Python installation
  and the paths given as ``readable``, all read-only; the only writable places are ``/tmp`` (the working
  directory) and ``/dev/shm``, private tmpfs that vanish with the run. All capabilities are dropped and nested
  user namespaces are disabled. When the program ends or is killed, the kernel kills all that is left in its
  PID namespace.
* cgroup v1 ``pids`` and ``memory`` controllers: one cgroup per run caps the processes (and threads) and the
  memory of the whole process tree, tmpfs files included. Unlike rlimits these hold for root too. Every
  process of the run is killed through its cgroup before the cgroup is removed.

Without bubblewrap, a program started by root runs as a user of its own: a fresh unprivileged uid per run,
with no groups and ``no_new_privs``, so it cannot read root's files, signal or inspect other processes, or
raise its limits; ``RLIMIT_NPROC`` caps its processes and, when the run ends, every process of that uid is
killed, daemons included. Where root may create a mount namespace, ``/tmp``, ``/var/tmp`` and ``/dev/shm``
are private tmpfs too, and folders others cannot search (such as a Python installed under ``/root``) are
made reachable read-only, the rest of them hidden.

The sandbox fails closed. ``require=`` names the protections without which it runs no code; by default all
of :data:`PROTECTIONS`. A sandbox that lacks one is still built (so that styles load) but is *unavailable*:
:meth:`Sandbox.run` raises :class:`~latentgraph.errors.SandboxUnavailable`, and one warning says what is
missing, the fix, and the opt-in, ``require=()``, which runs code with whatever this machine provides. As
root, ``unprivileged`` is always required: model-written code never runs as root outside bubblewrap.
:attr:`Sandbox.protections` and :meth:`Sandbox.report` say exactly which protections are on and how.

Not isolated even with both mechanisms: the kernel is shared (there is no seccomp filter, so a kernel bug is
an escape); the system directories and the Python installation are readable; CPU time is limited per process,
so a program with many processes may keep several CPUs busy until the wall-time limit ends it. cgroup v2 is
not used: on a pure cgroup v2 machine there is no process-count limit and memory is limited per process.

This module decides which mechanisms a sandbox uses, says so, and runs programs; each mechanism lives in a
module of its own: :mod:`~latentgraph.tools.bubblewrap`, :mod:`~latentgraph.tools.cgroups`,
:mod:`~latentgraph.tools.uid_per_run` (a uid of its own per run), :mod:`~latentgraph.tools.launcher` (the first
program of every run) and :mod:`~latentgraph.tools.processes` (waiting on a run and reading its output).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import InputError, SandboxUnavailable
from . import bubblewrap, cgroups, processes, uid_per_run
from .launcher import launcher_command

logger = logging.getLogger(__name__)

PROTECTIONS = (
    "filesystem",  # only system, Python and `readable` paths are visible, read-only; writes go to a tmpfs
    "network",  # no network interface but loopback
    "process_isolation",  # other processes (and their environments in /proc) are invisible and out of reach
    "unprivileged",  # the program is not root and holds no capability; it cannot signal or inspect the host
    "process_limit",  # processes and threads of the run are capped, root included
    "memory_limit",  # memory of the run is capped
    "cpu_time",  # CPU seconds per process are capped
    "wall_time",  # the run is killed after a number of seconds
    "environment",  # the environment is built from scratch, and no other process's environment is readable
    "cleanup",  # no process of the run is alive when run() returns
)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run.

    Attributes:
        wall_seconds: the run is killed after this many seconds.
        cpu_seconds: CPU seconds each process may use (SIGXCPU, then SIGKILL one second later).
        memory_mb: memory of the whole run with a cgroup, else address space of each process.
        max_processes: processes and threads the program may have at once, itself included.
        max_file_mb: largest file the program may write (its output included).
        max_output_bytes: how much of the output is read back (head and tail).
    """

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 512
    max_processes: int = 32
    max_file_mb: int = 16
    max_output_bytes: int = 200_000

    def __post_init__(self) -> None:
        for field, value in vars(self).items():
            if not value > 0:
                raise InputError(f"sandbox Limits.{field} must be > 0, got {value!r}")


@dataclass(frozen=True)
class Protection:
    """Whether one protection is active, and how (or why not, and how to get it)."""

    name: str
    active: bool
    detail: str


@dataclass(frozen=True)
class SandboxResult:
    """What a run produced.

    Attributes:
        output: stdout and stderr interleaved, with the middle cut out past ``Limits.max_output_bytes``.
        returncode: the exit status, or ``-N`` when signal N ended the program.
        limit: the limit that ended the run, if one did; ``"output"`` when the output reached
            ``Limits.max_file_mb``.
        seconds: wall time of the run.
    """

    output: str
    returncode: int
    limit: Literal["wall time", "CPU time", "memory", "output"] | None
    seconds: float


_WARNED: set[str] = set()  # each warning once per process


class Sandbox:
    """Runs commands with the strongest isolation this machine allows, says which that is, and fails closed.

    Args:
        limits: resource limits of each run.
        readable: extra files or folders the program may read (read-only), e.g. a data set.
        require: protections (names from :data:`PROTECTIONS`) without which the sandbox runs no code; by
            default all of them. ``require=()`` is the explicit opt-in to run code with whatever this machine
            provides. As root, ``unprivileged`` is always required.

    Building never fails for want of a protection: the sandbox is then unavailable (:attr:`unavailable` says
    why), warns once, and :meth:`run` raises :class:`~latentgraph.errors.SandboxUnavailable`.

    Raises:
        InputError: an unknown protection in ``require``, or a readable path that does not exist.
    """

    def __init__(self, limits: Limits | None = None, *, readable: Iterable[str | Path] = (),
                 require: Iterable[str] = PROTECTIONS):
        self.limits = limits or Limits()
        self.readable = [str(Path(path).resolve()) for path in readable]
        self.require = tuple(require)
        unknown = sorted(set(self.require) - set(PROTECTIONS))
        if unknown:
            raise InputError(f"sandbox: unknown protections {unknown} in require=; "
                             f"choose from {list(PROTECTIONS)}")
        for path in self.readable:
            if not os.path.exists(path):
                raise InputError(f"sandbox: readable path {path} does not exist; pass existing paths only")
        bwrap = shutil.which("bwrap")
        self._bwrap_args, bwrap_problem = None, "bwrap is not installed (Debian: apt-get install bubblewrap)"
        for nested_userns in (False, True) if bwrap else ():  # bwrap before 0.8 has no --disable-userns
            args = bubblewrap.bwrap_args(bwrap, self.readable, nested_userns)
            bwrap_problem = bubblewrap.probe_bwrap(tuple(args))
            if bwrap_problem is None:
                self._bwrap_args = args
                break
        self._bwrap_problem = bwrap_problem
        self._cgroups = {c: p for c in cgroups.CONTROLLERS if isinstance(p := cgroups.probe_cgroup(c), Path)}
        self._root = os.geteuid() == 0
        self._user, user_problem = None, None  # how runs get a uid of their own (root without bwrap)
        if self._root and self._bwrap_args is None:
            self._user, user_problem = uid_per_run.probe_user(tuple(self.readable),
                                                              self.limits.memory_mb * 2**20)
        self.protections = self._assess(bwrap_problem, user_problem)
        required = set(self.require) | ({"unprivileged"} if self._root else set())
        self.missing = [n for n in PROTECTIONS if n in required and not self.protections[n].active]
        self._announce()

    @property
    def unavailable(self) -> str | None:
        """Why this sandbox runs no code (one line with the fix and the opt-in), or None when it runs code."""
        if not self.missing:
            return None
        fixes = []
        if self._bwrap_args is None:
            fixes.append("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap)"
                         if "not installed" in self._bwrap_problem
                         else f"make bubblewrap work: {self._bwrap_problem}")
        if "process_limit" in self.missing:
            fixes.append("run as root on a cgroup v1 machine (a pids cgroup caps the processes)")
        if self._root and "unprivileged" in self.missing:
            opt_in = (f"running as root, code never runs outside bubblewrap without a uid of its own, so "
                      f"require=() does not help: {self.protections['unprivileged'].detail}")
        else:
            opt_in = ("or opt in to run code with only the protections available here: "
                      "PythonTool(require=()), SandboxRunner(require=()), Sandbox(require=()), or "
                      "--allow-unsandboxed-tools on the command line")
        return (f"the sandbox lacks {', '.join(self.missing)}, so it runs no model-written code. "
                f"Fix: {'; '.join(fixes)}; {opt_in}")

    def _assess(self, bwrap_problem: str | None, user_problem: str | None) -> dict[str, Protection]:
        """Each protection: on or off, and how, for this machine's mix of bwrap, root, cgroups and mounts."""
        limits, bwrap, own_uid = self.limits, self._bwrap_args is not None, self._user is not None
        pids, memory = "pids" in self._cgroups, "memory" in self._cgroups
        mounts = own_uid and self._user["mounts"]
        uid = os.geteuid()
        # a root program outside bubblewrap, had it no uid of its own, could raise its own rlimits
        raisable = "; a root program can raise it" if self._root and not bwrap and not own_uid else ""
        nested = "nested userns " + ("disabled" if bwrap and "--disable-userns" in self._bwrap_args
                                     else "allowed (bwrap < 0.8)")
        environment = "built from scratch: PATH, HOME, TMPDIR, LANG and thread counts only"
        if bwrap:
            found = {
                "filesystem": (True, ("mount namespace: system dirs, Python and readable paths read-only; "
                                     "/tmp (working dir) and /dev/shm private tmpfs")),
                "network": (True, "network namespace with loopback only"),
                "process_isolation": (True, (f"PID, IPC, UTS and user namespaces; capabilities dropped; "
                                            f"{nested}")),
                "unprivileged": (True, "user namespace with every capability dropped; " + (
                    "its uid is root's outside the namespace, where it sees only read-only system files and "
                    "its own processes" if self._root else f"runs as uid {uid}")),
                "environment": (True, f"{environment}; other processes' environments are out of sight"),
                "cleanup": (True, "the PID namespace ends with the run"
                                  + (" and its cgroup is emptied" if pids else "")),
            }
        elif own_uid:
            tmp = ("/tmp, /var/tmp and /dev/shm are its own tmpfs" if mounts else
                   "files it writes outside its working directory (in the host's /tmp, say) stay")
            found = {
                "filesystem": (False, (f"{bwrap_problem}: the program runs as a uid of its own, reads what "
                                       f"any user may read and writes where any user may; {tmp}")),
                "process_isolation": (False, (f"{bwrap_problem}: the program sees other processes and their "
                                             "command lines (not their environments or memory)")),
                "unprivileged": (True, (f"a uid of its own ({uid_per_run.RUN_UIDS[0]} + n, fresh each run), "
                                        "no groups, no capabilities, no_new_privs: it cannot read root's files, "
                                        "signal or inspect other processes, or raise its limits")),
                "environment": (True, (f"{environment}; its uid cannot read other processes' "
                                      "/proc/<pid>/environ")),
                "cleanup": (True, "every process of the run's own uid is killed, daemons included"
                                  + (", and its cgroup is emptied" if pids else "")),
            }
        else:
            user = "root" if self._root else f"this user (uid {uid})"
            found = {
                "filesystem": (False, f"{bwrap_problem}: the program reads and writes whatever {user} can"),
                "process_isolation": (False, (f"{bwrap_problem}: the program sees other processes and can "
                                              f"signal and inspect those of {user}, the host included")),
                "unprivileged": (False, f"no uid of its own for the program ({user_problem})" if self._root
                                 else f"runs as {user}, who can signal and inspect the host; run as root "
                                      "for a uid per run, or install bubblewrap"),
                "environment": (False, (f"{environment}, but the program can read the environments of the "
                                       f"processes of {user} in /proc/<pid>/environ, the host's included")),
                "cleanup": (pids, "every process in the run's cgroup is killed" if pids else
                            "process group only: a process that starts its own session outlives the run"),
            }
        found.setdefault("network", (False, f"{bwrap_problem}: the program has this machine's network"))
        if pids:
            process_limit = f"cgroup pids.max: {limits.max_processes} processes and threads"
        elif own_uid and not bwrap:
            process_limit = f"RLIMIT_NPROC of the run's own uid: {limits.max_processes} processes and threads"
        else:
            process_limit = str(cgroups.probe_cgroup("pids"))
        found |= {
            "process_limit": (pids or (own_uid and not bwrap), process_limit),
            "memory_limit": (True, f"cgroup: {limits.memory_mb} MiB for the whole run" if memory
                             else f"RLIMIT_AS: {limits.memory_mb} MiB per process, not for the whole run "
                                  f"({cgroups.probe_cgroup('memory')}){raisable}"),
            "cpu_time": (True, f"RLIMIT_CPU: {limits.cpu_seconds} s per process{raisable}"),
            "wall_time": (True, f"killed after {limits.wall_seconds:g} s"),
        }
        return {name: Protection(name, *found[name]) for name in PROTECTIONS}

    def _announce(self) -> None:
        logger.info("sandbox protections:\n%s", self.report())
        off = [p for p in self.protections.values() if not p.active]
        if self.unavailable:
            message = self.unavailable + "\n" + "\n".join(f"{p.name}: {p.detail}" for p in off
                                                          if p.name in self.missing)
        elif off:
            message = (f"sandbox runs model-written code without {', '.join(p.name for p in off)} (opted in "
                       f"with require={self.require!r}):\n" + "\n".join(f"{p.name}: {p.detail}" for p in off))
        else:
            return
        if message not in _WARNED:
            _WARNED.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def report(self) -> str:
        """One line per protection: ``on`` or ``OFF``, and how it is provided or why it is missing."""
        return "\n".join(f"{'on ' if p.active else 'OFF'} {p.name}: {p.detail}"
                         for p in self.protections.values())

    def run(self, argv: Sequence[str], stdin: bytes = b"") -> SandboxResult:
        """Runs one command in the sandbox and waits for it, or kills it at the wall-time limit.

        Args:
            argv: the command; its program must lie in a directory the sandbox shows (system or Python dirs).
            stdin: bytes the program reads on its standard input.

        Returns:
            The output, exit status and the limit that stopped it, if any. No process of the run is left
            where ``cleanup`` is on.

        Raises:
            SandboxUnavailable: the sandbox lacks a required protection (:attr:`unavailable`); nothing ran.
            OSError: the run's cgroups or files could not be created.
        """
        if self.unavailable:
            raise SandboxUnavailable(self.unavailable)
        start = time.monotonic()
        bwrap = self._bwrap_args is not None
        uid = uid_per_run.fresh_uid() if self._user is not None else None
        private = bwrap or (uid is not None and self._user["mounts"])  # working dir: a private /tmp
        workdir = "/tmp" if private else tempfile.mkdtemp(prefix="latentgraph-sandbox-")
        user = None
        if uid is not None:
            if not private:
                os.chown(workdir, uid, uid)
            user = uid_per_run.user_config(uid, self._user["mounts"], self.readable,
                                           self.limits.memory_mb * 2**20, workdir)
        max_processes = self.limits.max_processes + (2 if bwrap else 0)  # + bwrap's monitor and init
        run_cgroups = {c: cgroups.make_cgroup(parent, c, max_processes, self.limits.memory_mb)
                       for c, parent in self._cgroups.items()}
        status_r, status_w = os.pipe() if bwrap else (-1, -1)  # bwrap writes the pid of its init here
        try:
            with tempfile.TemporaryFile() as job, tempfile.TemporaryFile() as out:
                job.write(stdin)
                job.seek(0)
                proc = subprocess.Popen(
                    self._command(argv, run_cgroups, status_w, user), stdin=job, stdout=out,
                    stderr=subprocess.STDOUT, env=self._environment(workdir), cwd="/" if private else workdir,
                    start_new_session=True, pass_fds=(status_w,) if bwrap else ())
                if bwrap:
                    os.close(status_w)
                    status_w = -1
                timed_out = processes.wait_for_run(proc, status_r if bwrap else None,
                                                   start + self.limits.wall_seconds)
                oom = "memory" in run_cgroups and cgroups.oom_kills(run_cgroups["memory"]) > 0
                flooded = out.seek(0, os.SEEK_END) >= self.limits.max_file_mb * 2**20
                output = processes.read_head_and_tail(out, self.limits.max_output_bytes)
        finally:
            for fd in (status_r, status_w):
                if fd >= 0:
                    os.close(fd)
            for path in run_cgroups.values():
                if not cgroups.kill_cgroup(path, time.monotonic() + 5):
                    logger.error("sandbox: processes of cgroup %s survived SIGKILL for 5 s", path)
            if uid is not None and not uid_per_run.reap(uid):
                logger.error("sandbox: processes of uid %d survived SIGKILL for 5 s", uid)
            if not private:
                shutil.rmtree(workdir, ignore_errors=True)
        returncode = proc.returncode
        if bwrap and returncode > 128:  # bwrap reports a program killed by signal N as exit status 128 + N
            returncode = 128 - returncode
        limit = ("wall time" if timed_out else "memory" if oom else
                 "CPU time" if returncode == -signal.SIGXCPU else
                 "output" if flooded or returncode == -signal.SIGXFSZ else None)
        return SandboxResult(output, returncode, limit, time.monotonic() - start)

    def _command(self, argv: Sequence[str], run_cgroups: dict[str, Path], status_fd: int,
                 user: dict | None) -> list[str]:
        limits = self.limits
        rlimits = {"RLIMIT_CPU": (limits.cpu_seconds, limits.cpu_seconds + 1),
                   "RLIMIT_FSIZE": (limits.max_file_mb * 2**20,) * 2, "RLIMIT_CORE": (0, 0)}
        if "memory" not in run_cgroups:
            rlimits["RLIMIT_AS"] = (limits.memory_mb * 2**20,) * 2
        if user is not None:  # counts the processes and threads of the run's own uid: exactly the run's
            rlimits["RLIMIT_NPROC"] = (limits.max_processes,) * 2
        config = {"cgroups": [str(path / "cgroup.procs") for path in run_cgroups.values()],
                  "rlimits": rlimits, "user": user}
        launcher = launcher_command(config)
        if self._bwrap_args is None:
            return [*launcher, *argv]
        return [*launcher, *self._bwrap_args, "--json-status-fd", str(status_fd), "--", *argv]

    @staticmethod
    def _environment(workdir: str) -> dict[str, str]:
        path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"])
        # one thread per numeric library: threads count against max_processes
        threads = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        return {"PATH": path, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", **threads}

