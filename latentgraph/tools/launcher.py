"""The launcher: the first program of every sandbox run, which sets the run up from outside the sandbox.

It runs in the child process: it joins the run's cgroups before anything else exists, sets the rlimits (soft
and hard, so the program cannot raise them), and, for a run with a uid of its own, makes its private mounts and
drops root's privileges; then it becomes bwrap or the program. Doing this in a child rather than in
``Popen(preexec_fn=...)`` keeps it safe in a multi-threaded parent. Kept apart from
:mod:`latentgraph.tools.sandbox` because it is a program of its own, shared by runs and by the uid probe.
"""

from __future__ import annotations

import json
import sys

LAUNCHER = r"""
import json, os, resource, sys
config = json.loads(sys.argv[1])
for procs in config["cgroups"]:
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
for name, (soft, hard) in config["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
user = config["user"]
if user is not None:
    import ctypes, stat
    libc = ctypes.CDLL(None, use_errno=True)
    uid = user["uid"]

    def check(result, what):
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(source, target, fstype, flags, data):
        check(libc.mount(source, target.encode(), fstype, ctypes.c_ulong(flags), data), f"mount {target}")

    def searchable(path):
        st = os.stat(path)
        return stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_IXOTH or st.st_uid == uid
                                                 and st.st_mode & stat.S_IXUSR)

    def reachable(path):
        parts = path.split("/")[1:-1]
        try:
            return all(searchable("/" + "/".join(parts[:i + 1])) for i in range(len(parts))) and \
                os.path.lexists(path)
        except OSError:
            return False

    if user["mounts"]:
        RDONLY, NOSUID, NODEV, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
        check(libc.unshare(0x20000), "unshare(CLONE_NEWNS)")
        mount(None, "/", None, REC | PRIVATE, None)  # nothing mounted below reaches the host
        fds = {path: os.open(path, os.O_PATH) for path in user["reach"]}  # before anything is covered
        for path in ("/tmp", "/var/tmp", "/dev/shm"):
            if os.path.isdir(path) and not os.path.islink(path):
                mount(b"tmpfs", path, b"tmpfs", NOSUID | NODEV,
                      f"mode=0700,uid={uid},gid={uid},size={user['tmp_bytes']}".encode())
        for path, fd in sorted(fds.items()):  # make what the program needs reachable, read-only
            if reachable(path):
                continue
            current = ""
            for part in path.split("/")[1:-1]:
                current += "/" + part
                if not os.path.lexists(current):
                    os.mkdir(current, 0o755)
                elif not searchable(current):  # cover a folder the program cannot search with an empty one
                    mount(b"tmpfs", current, b"tmpfs", NOSUID | NODEV, b"mode=0755,size=1m")
            if not os.path.lexists(path):
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    os.mkdir(path, 0o755)
                else:
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(f"/proc/self/fd/{fd}".encode(), path, None, BIND | REC, None)
            mount(None, path, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV, None)
            os.close(fd)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")  # setuid programs cannot raise it
    os.chdir(user["workdir"])
os.execv(sys.argv[2], sys.argv[2:])
"""


def launcher_command(config: dict) -> list[str]:
    """The launcher's command line for one run; the command it becomes follows it.

    ``config`` holds ``cgroups`` (the ``cgroup.procs`` files to join), ``rlimits`` (name: (soft, hard)) and
    ``user`` (:func:`~latentgraph.tools.uid_per_run.user_config`, or None to keep this process's uid).
    """
    return [sys.executable, "-I", "-S", "-B", "-c", LAUNCHER, json.dumps(config)]
