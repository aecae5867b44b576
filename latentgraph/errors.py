"""The errors latentgraph raises on bad input. Every message names the agent, edge or file at fault and
says how to fix it."""


class LatentGraphError(Exception):
    """Base class of every error raised by latentgraph."""


class GraphError(LatentGraphError, ValueError):
    """The system is not a valid graph (raised while it is built or validated, before any forward)."""


class InputError(LatentGraphError, ValueError):
    """The inputs of a run cannot be processed: empty batch, prompt too long, non-finite latents."""


class CheckpointError(LatentGraphError):
    """A checkpoint is missing, corrupt, or does not match the system it is loaded into."""


class SandboxUnavailable(LatentGraphError, RuntimeError):
    """A sandbox lacks protections it requires, so it runs no code (fail closed). The message names what is
    missing, the fix, and the explicit opt-in to run with what is available (``require=()``)."""
