"""One unit of evaluation work: answer a batch of questions with one method, score the answers, return rows.

:func:`~latentgraph.evaluation.runner.evaluate` cuts a run into :class:`Batch` es and answers each with
:func:`answer_batch`, in its own process or on a Ray worker (:mod:`latentgraph.evaluation.workers`): the
same function either way, so a row does not depend on where it was computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.events import RunOutput
from ..errors import InputError, shown
from . import published_lenient, strict
from .datasets import Example

if TYPE_CHECKING:
    from ..core.system import System


@dataclass(frozen=True)
class Batch:
    """Questions answered together by one :meth:`~latentgraph.System.run` call."""

    examples: list[Example]
    method: str
    rounds: int | None  # None for "single"
    sample: int
    decoding: dict[str, Any]  # System.run's sampling arguments: do_sample, temperature, top_p, seed, max_new_tokens


ROW_FIELDS: dict[str, tuple[str, tuple[type, ...]]] = {  # a result row's keys: what each holds, as JSON types
    "id": ("a string", (str,)),
    "method": ("a string", (str,)),
    "rounds": ("an integer or null", (int, type(None))),
    "sample": ("an integer", (int,)),
    "question": ("a string", (str,)),
    "prediction": ("a string", (str,)),
    "answer": ("a string or null", (str, type(None))),
    "gold": ("a string", (str,)),
    "correct": ("true or false", (bool,)),
    "upstream_correct": ("true, false or null", (bool, type(None))),
    "tokens": ("an integer", (int,)),
    "seconds": ("a number", (int, float)),
}


def row_problem(row: Any) -> str | None:
    """What makes ``row`` (read back from ``results.jsonl``) not a result row :func:`answer_batch` writes, or
    None. Types are compared exactly, as JSON gives them: ``true`` is no token count, ``1`` no verdict."""
    if not isinstance(row, dict):
        return f"a result row is a JSON object, not {shown(row)}"
    if missing := [key for key in ROW_FIELDS if key not in row]:
        return f"a result row lacks {missing}"
    wrong = [f"{key!r} is {shown(row[key])}, not {what}" for key, (what, types) in ROW_FIELDS.items()
             if type(row[key]) not in types]
    return f"a result row's {'; its '.join(wrong)}" if wrong else None


def row_key(row: dict) -> tuple:
    """What identifies a result row: ``(id, method, rounds, sample)``."""
    return row["id"], row["method"], row["rounds"], row["sample"]


def answer_batch(system: System, batch: Batch, code_runner: strict.CodeRunner | None,
                 code_timeout: float) -> list[dict[str, Any]]:
    """Answer one batch, score it, and return its result rows."""
    start = time.perf_counter()
    out = system.run([e.prompt for e in batch.examples], rounds=batch.rounds, mode=batch.method, **batch.decoding)
    seconds = (time.perf_counter() - start) / len(batch.examples)  # the batch ran as one: share its time evenly
    rows = []
    for i, (example, text) in enumerate(zip(batch.examples, out.texts)):
        answer, correct, lenient = score(example, text, code_runner, code_timeout)
        rows.append({"id": example.id, "method": batch.method, "rounds": batch.rounds, "sample": batch.sample,
                     "question": example.prompt, "prediction": text, "answer": answer, "gold": example.gold,
                     "correct": correct, "upstream_correct": lenient, "tokens": _tokens(out, i),
                     "seconds": round(seconds, 4)})
    return rows


def _tokens(out: RunOutput, row: int) -> int:
    """Tokens generated for one question, by every agent in every round."""
    return sum(step.tokens_out[row] for steps in out.trace for step in steps.values() if step.tokens_out)


def score(example: Example, text: str, code_runner: strict.CodeRunner | None = None,
          code_timeout: float = 10.0) -> tuple[str | None, bool, bool | None]:
    """Score one answer: ``(what was extracted, strict verdict, upstream-lenient verdict)``.

    Math uses :func:`~latentgraph.evaluation.strict.score_math`, multiple choice the option letter (none stated is
    wrong), code the example's tests run by ``code_runner``. The lenient verdict is None for code, which the
    published evaluation scores the same way.
    """
    if example.kind == "math":
        return (strict.extract_answer(text), strict.score_math(text, example.gold),
                published_lenient.score_math(text, example.gold))
    if example.kind == "choice":
        return (strict.parse_choice(text, example.letters),
                strict.score_choice(text, example.gold, example.letters),
                published_lenient.score_choice(text, example.gold))
    if code_runner is None:
        raise InputError(f"example {example.id} is code: pass code_runner= (e.g. SandboxRunner())")
    result = strict.score_code(text, example.tests, code_runner, timeout=code_timeout)
    return result.code, result.passed, None
