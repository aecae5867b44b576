"""The errors latentgraph raises on bad input. Every message names the agent, edge or file at fault and
says how to fix it."""

import re


class LatentGraphError(Exception):
    """Base class of every error raised by latentgraph."""


class GraphError(LatentGraphError, ValueError):
    """The system is not a valid graph (raised while it is built or validated, before any forward)."""


class InputError(LatentGraphError, ValueError):
    """The inputs of a run cannot be processed: empty batch, prompt too long, non-finite latents."""


class RequestError(InputError):
    """An HTTP request that ``latentgraph serve`` cannot answer. The server sends it to the client in OpenAI's
    error shape: ``status`` is the HTTP status, ``param`` the request field at fault, ``code`` OpenAI's error
    code (``"model_not_found"``, say), ``headers`` extra response headers (``Retry-After``)."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers or {}


class CheckpointError(LatentGraphError):
    """A checkpoint is missing, corrupt, or does not match the system it is loaded into; or a checkpoint,
    training output or result file cannot be written (a full disk, a read-only folder), its old version kept."""


class SandboxUnavailable(LatentGraphError, RuntimeError):
    """A sandbox lacks protections it requires, so it runs no code (fail closed). The message names what is
    missing, the fix, and the explicit opt-in to run with what is available (``require=()``)."""


class WorkerError(LatentGraphError, RuntimeError):
    """A Ray worker of :func:`~latentgraph.evaluate` died and cannot be restarted (it died too often, or could not
    start). The rows finished before are kept in ``results.jsonl``: run the same evaluation again to resume.
    Also: the replicas of ``latentgraph serve --replicas`` could not start (the message says what they raised)."""


def unpickling_problem(error: Exception) -> str:
    """What is wrong with a file ``torch.load(weights_only=True)`` failed on: a refused object, naming the
    global it would have imported (torch's own message goes on to suggest turning ``weights_only`` off, which
    we never do), or corrupt bytes."""
    text = str(error)
    if found := re.search(r"GLOBAL ([\w.]+)", text):
        return (f"refused to unpickle it: it holds the global {found.group(1)}, which a weights file never "
                "needs (nothing was executed)")
    if "Weights only load failed" in text:
        return "refused to unpickle it: it holds objects other than tensors (nothing was executed)"
    first = text.strip().splitlines()[0].split(". ")[0][:120] if text.strip() else type(error).__name__
    return f"it is corrupt ({first})"


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` for an error message about a bad input, cut to about ``limit`` characters. An integer too
    long for Python to print (over ``sys.get_int_max_str_digits()`` digits) or a list nested too deeply to
    repr is described instead, so reporting a hostile value never fails itself."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        if isinstance(value, int):
            return f"an integer of {value.bit_length()} bits"
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else f"{text[:limit]}..."
