"""The server's limits: how it batches and what it accepts (the flags of ``latentgraph serve``).

Light on purpose (no FastAPI, no torch): the command line reads its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

API_KEY_VARIABLE = "LATENTGRAPH_API_KEY"  # where latentgraph serve reads its API key when --api-key is not given


@dataclass(frozen=True)
class Limits:
    """What the server accepts and how it batches (the flags of ``latentgraph serve``)."""

    max_batch_size: int = 16  # rows (questions times choices) decoded together
    batch_wait_ms: float = 5.0  # how long a batch waits for more rows once it has one
    max_queue: int = 256  # rows waiting for a batch; more get 503 with Retry-After
    max_tokens_cap: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives none (at most max_tokens_cap)
    max_question_chars: int = 32_000  # the question, transcript included
    max_body_bytes: int = 1_000_000
    max_n: int = 8  # choices per request (times the prompts of a text completion)

    def __post_init__(self) -> None:
        wrong = [f"--{name.replace('_', '-')} must be {'>= 0' if name == 'batch_wait_ms' else 'an integer >= 1'}, "
                 f"got {value!r}" for name, value in vars(self).items()
                 if not (value >= 0 if name == "batch_wait_ms" else isinstance(value, int) and value >= 1)]
        if wrong:
            raise InputError("invalid server limits: " + "; ".join(wrong))
