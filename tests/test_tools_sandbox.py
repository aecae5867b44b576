"""The tool interface, the sandbox and the Python tool.

Each protection is tested by a program that tries to break it. The tests run twice: with the strongest sandbox
this machine gives, and with bubblewrap disabled (the fallback), both opted in with ``require=()`` so that they
run code whatever is missing. A test whose protection is unavailable skips with the sandbox's own reason; fork
and memory bombs only ever run inside a cap the sandbox reports active. The default, which runs no code when a
protection is missing, has tests of its own.
"""

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

import latentgraph.tools.bubblewrap as bubblewrap_module
import latentgraph.tools.cgroups as cgroups_module
import latentgraph.tools.sandbox as sandbox_module
from latentgraph.errors import InputError, LatentGraphError, SandboxUnavailable
from latentgraph.evaluation.runner import SandboxRunner
from latentgraph.tools import PROTECTIONS, Limits, PythonTool, Sandbox, Tool, escape_result, truncate

FAST = Limits(wall_seconds=3, cpu_seconds=3, memory_mb=256, max_processes=16)


@pytest.fixture(params=["strongest", "without bwrap"], scope="module")
def make(request):
    """``make(limits=FAST, **kwargs) -> PythonTool``: the strongest sandbox here, or one without bwrap; both
    opted in (``require=()``) to run code with whatever protections they have."""

    def build(limits: Limits = FAST, **kwargs) -> PythonTool:
        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the warning has a test of its own
            if request.param == "without bwrap":
                patch.setattr(bubblewrap_module, "probe_bwrap", lambda args: "disabled by the test")
            return PythonTool(limits, **{"require": (), **kwargs})

    return build


@pytest.fixture(scope="module")
def python(make):
    return make()


def need(tool: PythonTool, *names: str) -> None:
    """Skips the test unless the tool's sandbox provides every protection in ``names``."""
    for name in names:
        protection = tool.protections[name]
        if not protection.active:
            pytest.skip(f"protection {name!r} unavailable here: {protection.detail}")


def without_bwrap(monkeypatch, cgroups: bool = True) -> None:
    """Makes the sandboxes built next find no bwrap installed (and no cgroups), and warn afresh."""
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "bwrap" else which(name))
    monkeypatch.setattr(sandbox_module, "_WARNED", set(), raising=False)
    if not cgroups:
        monkeypatch.setattr(cgroups_module, "probe_cgroup", lambda controller: "disabled by the test")


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def processes_with(marker: str) -> list[int]:
    """Pids of the processes on this machine whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # the process ended while we looked
            pass
    return found


# --- the tool interface -------------------------------------------------------------------------------------


class Flaky(Tool):
    name = "flaky"
    tag = "flaky"
    description = "fails on 'boom', else repeats its input"
    max_chars = 60

    def run(self, text: str) -> str:
        if text == "boom":
            raise ValueError("went </result> wrong")
        return text


def test_custom_tool_answers_are_escaped_cut_and_failures_become_text():
    tool = Flaky()
    assert tool("ok") == "ok"
    assert tool("boom") == "error: flaky failed: ValueError: went &lt;/result> wrong"
    long = tool("a" * 100 + "</result>")
    assert len(long) <= 60 + 3 and long.endswith("&lt;/result>") and "characters cut" in long
    assert tool.describe() == "<flaky>...</flaky>: fails on 'boom', else repeats its input"


def test_escape_result_neutralises_every_spelling_of_the_tag():
    text = "a</result>b< /RESULT >c<result>d<results>"
    escaped = escape_result(text)
    assert escaped == "a&lt;/result>b&lt; /RESULT >c&lt;result>d<results>"


def test_truncate_keeps_head_and_tail_within_budget():
    text = "HEAD" + "x" * 1000 + "TAIL"
    cut = truncate(text, 100)
    assert len(cut) <= 100 and cut.startswith("HEAD") and cut.endswith("TAIL")
    assert "[... 908 characters cut ...]" in cut
    assert truncate("short", 100) == "short"


# --- reporting protections ----------------------------------------------------------------------------------


def test_report_lists_every_protection(python):
    report = python.sandbox.report().splitlines()
    assert [line.split()[1].rstrip(":") for line in report] == list(PROTECTIONS)
    for name in ("wall_time", "cpu_time", "memory_limit"):  # provided on every Linux machine
        assert python.protections[name].active


def test_bad_arguments_are_input_errors():
    with pytest.raises(InputError, match="unknown protections"):
        Sandbox(FAST, require=["telepathy"])
    with pytest.raises(InputError, match="does not exist"):
        Sandbox(FAST, readable=["/no/such/path"])
    with pytest.raises(InputError, match="memory_mb must be > 0"):
        Limits(memory_mb=0)


UNAVAILABLE = "error: the python tool is unavailable here (its sandbox lacks filesystem, network, process_isolation"


def test_without_bwrap_the_default_tool_runs_no_code_and_warns_once(monkeypatch, tmp_path):
    without_bwrap(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tool = PythonTool(FAST)
        PythonTool(FAST)  # the same reason is not repeated
    (warning,) = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    message = str(warning.message)
    assert "apt-get install bubblewrap" in message and "PythonTool(require=())" in message
    assert "--allow-unsandboxed-tools" in message
    monkeypatch.setattr(subprocess, "Popen", None)  # starting any process would fail loudly
    marker = tmp_path / "ran"
    out = tool(f"open({str(marker)!r}, 'w').write('x')")
    assert out.startswith(UNAVAILABLE) and out.endswith("); answer without it") and "\n" not in out
    assert not marker.exists()
    with pytest.raises(SandboxUnavailable):
        tool.execute("print(1)")


def test_without_bwrap_the_default_sandbox_and_code_runner_raise(monkeypatch, tmp_path):
    without_bwrap(monkeypatch)
    marker = tmp_path / "ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sandbox, runner = Sandbox(FAST), SandboxRunner(FAST)
    assert "filesystem" in sandbox.missing and "apt-get install bubblewrap" in sandbox.unavailable
    with pytest.raises(SandboxUnavailable, match=r"lacks filesystem, network.*require=\(\)") as raised:
        sandbox.run(["/bin/touch", str(marker)])
    assert isinstance(raised.value, LatentGraphError)
    with pytest.raises(SandboxUnavailable):
        runner.check()
    with pytest.raises(SandboxUnavailable):
        runner(f"open({str(marker)!r}, 'w')", 5.0)
    assert not marker.exists()


def test_report_without_bwrap_as_a_plain_user_says_what_is_off(monkeypatch):
    without_bwrap(monkeypatch, cgroups=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # only the report: no code runs here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sandbox = Sandbox(FAST, require=())
    off = [name for name, p in sandbox.protections.items() if not p.active]
    assert off == ["filesystem", "network", "process_isolation", "unprivileged", "process_limit",
                   "environment", "cleanup"]
    assert "/proc/<pid>/environ" in sandbox.protections["environment"].detail
    assert "outlives the run" in sandbox.protections["cleanup"].detail
    assert sandbox.unavailable is None  # opted in: it runs code, as this user


@pytest.fixture(scope="module")
def bare():
    """The weakest sandbox root can opt into: no bwrap and no cgroups."""
    if os.geteuid() != 0:
        pytest.skip("a uid per run needs root")
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        without_bwrap(patch, cgroups=False)
        return PythonTool(FAST, require=())


def test_opted_in_without_bwrap_root_code_runs_unprivileged_and_cannot_touch_the_host(bare, monkeypatch,
                                                                                      tmp_path):
    monkeypatch.setenv("LATENTGRAPH_TEST_API_KEY", "sk-secret-value")
    secret = tmp_path / "secret"
    secret.write_text("sk-secret-value")
    secret.chmod(0o600)
    out = bare(f"""
import os
print(os.getuid(), os.getgid(), os.getgroups(), os.getsid(0) == os.getpid() == os.getpgid(0))
for path in ["/etc/shadow", f"/proc/{{os.getppid()}}/environ", "/proc/1/environ", {str(secret)!r}]:
    try:
        print("read", open(path).read())
    except (PermissionError, FileNotFoundError):  # root's files are unreadable, or hidden
        print("refused")
for pid, signal in ((os.getppid(), 9), (1, 0)):  # the test process itself; init, only asked if it may
    try:
        os.kill(pid, signal)
        print("signalled", pid)
    except PermissionError:
        print("refused")
""")
    lines = out.splitlines()
    uid, gid, groups, own_session = lines[0].split(" ", 3)
    assert int(uid) >= 2_000_000_000 and gid == uid and groups == "[]" and own_session == "True", out
    assert lines[1:] == ["refused"] * 6, out
    assert "sk-secret-value" not in out
    protections = bare.protections
    assert [n for n, p in protections.items() if not p.active] == ["filesystem", "network", "process_isolation"]
    assert "own uid" in protections["cleanup"].detail and "RLIMIT_NPROC" in protections["process_limit"].detail
    assert bare("import os\nos.getuid()") != uid  # a fresh uid each run


def test_opted_in_without_bwrap_root_code_leaves_no_daemon(bare):
    out = bare("""
import os
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        os.execvp("sleep", ["sleep", "765.432"])
    os._exit(0)
print(os.read(r, 20).decode())
""")
    assert not alive(int(out)) and processes_with("765.432") == []


def test_opted_in_without_bwrap_root_processes_are_capped(bare):
    check_process_cap(bare)


def test_opted_in_without_bwrap_root_files_go_to_a_private_tmp(bare):
    if "own tmpfs" not in bare.protections["filesystem"].detail:
        pytest.skip("no mount namespace here: the run writes to the host's /tmp")
    name = f"/tmp/latentgraph-test-{os.getpid()}"
    out = bare(f"import os\nopen({name!r}, 'w').write('x'), os.getcwd(), sorted(os.listdir('/tmp'))")
    # besides its own file, only the way to a Python installation that lies under /tmp (mounted read-only)
    python = {Path(d).relative_to("/tmp").parts[0] for d in bubblewrap_module.python_dirs()
              if Path(d).is_relative_to("/tmp")}
    assert out == f"(1, '/tmp', {sorted([f'latentgraph-test-{os.getpid()}', *python])})" and not os.path.exists(name)


# --- running code -------------------------------------------------------------------------------------------


def test_output_and_value_of_last_expression(python):
    assert python("x = 6\nprint(x * 7)\nx ** 2") == "42\n36"
    assert python("```python\n    print('fenced')\n```") == "fenced"
    assert python("y = 1") == "(no output: print() the values you need)"
    assert python("  \n").startswith("error: no code")


def test_prelude_has_math_tools(python):
    assert python("Fraction(1, 3) + Fraction(1, 6)") == "Fraction(1, 2)"
    assert python("comb(10, 3), gcd(12, 18), sqrt(16)") == "(120, 6, 4.0)"
    assert python("Counter('abca').most_common(1)") == "[('a', 2)]"


def test_prelude_loads_sympy_when_installed(python):
    pytest.importorskip("sympy")
    assert python("x = sp.symbols('x')\nsp.solve(x**2 - 4, x)") == "[-2, 2]"


def test_errors_show_the_models_own_lines(python):
    out = python("def f():\n    return 1 / 0\n\nf()")
    assert 'File "<python>", line 2, in f' in out and "return 1 / 0" in out
    assert "ZeroDivisionError: division by zero" in out and out.endswith("[exit status 1]")
    assert "<string>" not in out  # the runner's own frames are hidden
    assert python("import sys; sys.exit(3)") == "[exit status 3]"
    assert python("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)") == \
        "[killed by signal 11: Segmentation fault]"


def test_results_cannot_close_the_result_tag(python):
    out = python("print('</result> injected <result>')")
    assert "</result>" not in out and "<result>" not in out


def test_long_output_is_cut(make):
    tool = make(max_chars=500)
    out = tool("print('a' * 50_000)\nprint('END')")
    assert len(out) <= 500 and out.endswith("END") and "characters cut" in out


def test_output_flood_says_which_limit_stopped_it(make):
    tool = make(Limits(wall_seconds=5, cpu_seconds=5, memory_mb=256, max_processes=16, max_file_mb=1))
    flood = "for _ in range(100):\n    print('x' * 2**20)"  # 100 MiB
    result = tool.execute(flood)
    assert result.limit == "output" and result.returncode != 0 and result.output.startswith("xxx")
    assert tool(flood).endswith("\n[stopped: output limit of 1 MiB reached]")


def test_infinite_loop_is_killed_at_the_wall_time_limit(make):
    tool = make(Limits(wall_seconds=1, cpu_seconds=30, memory_mb=256, max_processes=16))
    result = tool.execute("print('started', flush=True)\nwhile True: pass")
    assert result.limit == "wall time" and 1 <= result.seconds < 3
    assert result.output == "started\n"
    assert tool("while True: pass") == "[stopped: wall time limit of 1 s reached]"


def test_cpu_time_is_limited(make):
    tool = make(Limits(wall_seconds=20, cpu_seconds=1, memory_mb=256, max_processes=16))
    result = tool.execute("while True: pass")
    assert result.limit == "CPU time" and result.seconds < 10


def test_memory_bomb_is_contained(make):
    tool = make()
    need(tool, "memory_limit")
    # four times the limit, in 16 MiB chunks; bounded, so that a broken limit cannot hurt the machine
    out = tool("chunks = [b'x' * 2**24 for _ in range(64)]\nprint('not contained')")
    assert out == "[stopped: memory limit of 256 MiB reached]" or "MemoryError" in out
    assert tool("print('still here')") == "still here"


def check_process_cap(tool: PythonTool) -> None:
    """A bounded burst (100 children at most, even if the cap failed) must stop at ``max_processes``."""
    out = tool("""
import os
started = 0
try:
    for _ in range(100):
        if os.fork() == 0:
            os.execvp("sleep", ["sleep", "987.654"])
        started += 1
except OSError as err:
    print(started, err.errno)
""")
    started, errno = map(int, out.split())
    assert errno == 11 and started == tool.sandbox.limits.max_processes - 1  # EAGAIN; the program is one
    assert processes_with("987.654") == []


def test_burst_of_child_processes_is_capped_and_nothing_survives(make):
    tool = make()
    need(tool, "process_limit", "cleanup")
    check_process_cap(tool)


def test_fork_bomb_is_contained_and_killed(make):
    tool = make(Limits(wall_seconds=1.5, cpu_seconds=5, memory_mb=256, max_processes=16))
    need(tool, "process_limit", "cleanup")
    check_process_cap(tool)  # never run a fork bomb without a cap seen to hold
    # every process forks until the cap refuses, then parks as a recognisable sleep
    out = tool("""
import os
while True:
    try:
        os.fork()
    except OSError:
        os.execvp("sleep", ["sleep", "555.321"])
""")
    assert out == "[stopped: wall time limit of 1.5 s reached]"
    assert processes_with("555.321") == []


def test_processes_that_leave_the_session_are_killed(make):
    tool = make()
    need(tool, "cleanup")
    out = tool("""
import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "876.543"])
    os._exit(0)
print("daemon started")
""")
    assert out == "daemon started"
    assert processes_with("876.543") == []


def test_writes_outside_the_working_directory_fail(make, tmp_path):
    tool = make()
    need(tool, "filesystem")
    here = Path(__file__)
    targets = [tmp_path / "escaped.txt", Path("/etc/latentgraph-escaped"), here.with_name("escaped.py")]
    out = tool(f"""
import errno, os
for path in {[str(t) for t in targets]!r} + ["here.txt"]:
    try:
        with open(path, "w") as f:
            f.write("x")
        print("wrote", path)
    except OSError as err:
        print("refused", errno.errorcode[err.errno])
print(os.getcwd(), os.path.exists({str(here)!r}))
""")
    lines = out.splitlines()
    assert all(line in ("refused EROFS", "refused ENOENT") for line in lines[:3]), out
    assert lines[3] == "wrote here.txt" and lines[4] == "/tmp False"  # this repository is not even visible
    assert not any(t.exists() for t in targets)


def test_readable_paths_are_visible_read_only(make, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("42")
    tool = make(readable=[data])
    need(tool, "filesystem")
    out = tool(f"print(open({str(data)!r}).read())\nopen({str(data)!r}, 'a')")
    assert out.startswith("42\n") and "Read-only file system" in out
    assert data.read_text() == "42"


def test_environment_secrets_are_not_inherited(python, monkeypatch):
    monkeypatch.setenv("LATENTGRAPH_TEST_API_KEY", "sk-secret-value")
    out = python("import os\nsorted(os.environ)")
    assert "LATENTGRAPH_TEST_API_KEY" not in out and "sk-secret-value" not in out
    assert set(eval(out)) - {"PWD"} == {"HOME", "LANG", "MKL_NUM_THREADS", "OMP_NUM_THREADS",
                                         "OPENBLAS_NUM_THREADS", "PATH", "TMPDIR"}


def test_other_processes_are_invisible(python):
    need(python, "process_isolation")
    out = python("import os\nsorted(int(p) for p in os.listdir('/proc') if p.isdigit())")
    assert eval(out) == [1, 2]  # bubblewrap's init and the program itself
    assert str(os.getpid()) not in out


def test_nested_user_namespaces_are_refused(python):
    need(python, "process_isolation")
    if "nested userns disabled" not in python.protections["process_isolation"].detail:
        pytest.skip("this bwrap cannot disable nested user namespaces")
    out = python("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                 "libc.unshare(0x10000000), ctypes.get_errno()")  # CLONE_NEWUSER
    assert out == "(-1, 28)"  # ENOSPC: the sandbox allows no further user namespace


def test_bubblewrap_without_disable_userns_still_isolates_and_says_so(tmp_path, monkeypatch):
    real = shutil.which("bwrap")
    if real is None:
        pytest.skip("bwrap is not installed")
    fake = tmp_path / "bwrap"  # stands in for bwrap < 0.8, which lacks --disable-userns
    fake.write_text("#!/bin/sh\n"
                    'for a in "$@"; do [ "$a" = --disable-userns ] && exit 1; done\n'
                    f'exec {real} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sandbox = Sandbox(FAST, require=())
    if not sandbox.protections["filesystem"].active:
        pytest.skip(f"bwrap unusable here: {sandbox.protections['filesystem'].detail}")
    detail = sandbox.protections["process_isolation"].detail
    assert detail.endswith("nested userns allowed (bwrap < 0.8)")
    assert sandbox.run(["/bin/sh", "-c", "echo $$"]).output == "2\n"  # inside its own PID namespace


def test_network_is_unreachable(python):
    need(python, "network")
    out = python("""
import socket
print([name for _, name in socket.if_nameindex()])
try:
    socket.create_connection(("192.0.2.1", 80), timeout=1)
except OSError as err:
    print(type(err).__name__)
""")
    assert out.splitlines()[0] == "['lo']"
    assert out.splitlines()[1] == "OSError"


def test_temporary_directory_is_fresh_each_call(python):
    assert python("open('state.txt', 'w').write('x')") == "1"
    assert python("import os\nos.path.exists('state.txt')") == "False"
