"""The Python tool: the model writes ``<python>code</python>`` and reads back what the code printed.

Each call runs the code in a fresh interpreter inside a :class:`~latentgraph.tools.sandbox.Sandbox`, after
a prelude that makes the usual mathematical modules ready to use. As in a notebook cell, the value of a final
bare expression is printed too. Nothing carries over from one call to the next.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

from .base import Tool
from .sandbox import PROTECTIONS, Limits, Protection, Sandbox, SandboxResult

PRELUDE = '''\
import bisect, cmath, collections, decimal, fractions, functools, heapq, itertools, json, math, random, re
import statistics, string
from collections import Counter, defaultdict, deque
from decimal import Decimal
from fractions import Fraction
from functools import cache, lru_cache, reduce
from itertools import accumulate, combinations, combinations_with_replacement, count, permutations, product
from math import comb, factorial, gcd, inf, isqrt, lcm, perm, pi, sqrt


def _lazy(name):
    """The module `name`, loaded on first use (sympy alone takes a second to import), or None if missing."""
    import importlib.util, sys
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


for _name, _alias in (("sympy", "sp"), ("numpy", "np")):
    if (_module := _lazy(_name)) is not None:
        globals()[_name] = globals()[_alias] = _module
del _lazy, _name, _alias, _module
'''

# Runs inside the sandbox: reads {"prelude", "code"} from stdin, runs both in one namespace, and prints
# tracebacks that show the model's own lines only.
_RUNNER = """
import ast, json, linecache, os, sys, traceback
job = json.load(sys.stdin)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
namespace = {"__name__": "__main__", "__builtins__": __builtins__}

def run(source, filename):
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tree = ast.parse(source, filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, filename, "exec"), namespace)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
        if value is not None:
            print(repr(value))

try:
    run(job["prelude"], "<prelude>")
    run(job["code"], "<python>")
except SystemExit:
    raise
except BaseException as err:
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename not in ("<prelude>", "<python>"):
        tb = tb.tb_next
    traceback.print_exception(type(err), err, tb)
    sys.exit(1)
"""

_FENCE = re.compile(r"^\s*```[\w+-]*[ \t]*\n(.*?)\n?\s*```\s*$", re.DOTALL)


class PythonTool(Tool):
    """Runs model-written Python in a sandbox and returns its output (stdout and stderr, interleaved).

    Args:
        limits: resource limits of each call (wall time, CPU time, memory, processes, file size).
        prelude: Python source run before the model's code, in the same namespace.
        readable: files or folders the code may read besides the system and Python directories.
        require: sandbox protections without which the tool runs no code (see
            :data:`~latentgraph.tools.sandbox.PROTECTIONS`); by default all of them. Where one is missing the
            tool is still built, warns once, and answers every call with a line saying it is unavailable.
            ``require=()`` is the explicit opt-in to run code with whatever protections this machine has.
        max_chars: longest answer handed back to the model.

    Raises:
        InputError: an unknown protection in ``require``, or a readable path that does not exist.

    Example:
        >>> python = PythonTool()
        >>> python("print(Fraction(1, 3) + Fraction(1, 6))")
        '1/2'
    """

    name = "python"
    tag = "python"
    description = ("runs Python 3 code in a sandbox (limited time and memory, fresh each call) and returns "
                   "what it prints; math, itertools, collections, Fraction and sympy (sp) are ready to use, "
                   "and the value of a final bare expression is printed")

    def __init__(self, limits: Limits | None = None, *, prelude: str = PRELUDE,
                 readable: Iterable[str | Path] = (), require: Iterable[str] = PROTECTIONS,
                 max_chars: int = 4000):
        self.sandbox = Sandbox(limits, readable=readable, require=require)
        self.prelude = prelude
        self.max_chars = max_chars

    @property
    def protections(self) -> dict[str, Protection]:
        """The sandbox's protections on this machine, by name."""
        return self.sandbox.protections

    def run(self, text: str) -> str:
        """Runs the code the model wrote (a surrounding Markdown code fence is dropped).

        Args:
            text: Python source.

        Returns:
            What the code printed, followed by a line in brackets when it failed or was stopped by a limit;
            or, when the sandbox lacks a required protection, one line saying the tool is unavailable (no
            code runs).
        """
        if self.sandbox.unavailable:
            return (f"error: the python tool is unavailable here (its sandbox lacks "
                    f"{', '.join(self.sandbox.missing)}); answer without it")
        fenced = _FENCE.match(text)
        code = textwrap.dedent(fenced.group(1) if fenced else text).strip("\n")
        if not code.strip():
            return "error: no code; write Python between <python> and </python>"
        return self._render(self.execute(code))

    def execute(self, code: str) -> SandboxResult:
        """Runs Python source after the prelude, in a fresh sandboxed interpreter.

        Args:
            code: Python source.

        Returns:
            The sandbox's raw result: output, exit status, the limit that stopped the code and the wall time.

        Raises:
            SandboxUnavailable: the sandbox lacks a required protection; no code ran.
        """
        job = json.dumps({"prelude": self.prelude, "code": code}).encode()
        return self.sandbox.run([sys.executable, "-I", "-B", "-u", "-c", _RUNNER], stdin=job)

    def _render(self, result: SandboxResult) -> str:
        limits = self.sandbox.limits
        if result.limit is not None:
            bound = {"wall time": f"{limits.wall_seconds:g} s", "CPU time": f"{limits.cpu_seconds} s",
                     "memory": f"{limits.memory_mb} MiB", "output": f"{limits.max_file_mb} MiB"}[result.limit]
            status = f"[stopped: {result.limit} limit of {bound} reached]"
        elif result.returncode < 0:
            status = f"[killed by signal {-result.returncode}: {signal.strsignal(-result.returncode)}]"
        elif result.returncode > 0:
            status = f"[exit status {result.returncode}]"
        else:
            status = ""
        output = result.output.rstrip()
        if not output and not status:
            return "(no output: print() the values you need)"
        return "\n".join(part for part in (output, status) if part)
