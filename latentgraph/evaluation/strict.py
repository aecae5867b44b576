"""Answer extraction and strict scoring for math, multiple-choice and code tasks.

Strict means a prediction earns credit only for the answer it commits to:

- **math**: the last ``\\boxed{}`` (else a GSM8K ``#### N`` line, else the words after a final "answer is"
  or "answer:") is parsed whole and compared with the gold answer by ``math-verify``, which accepts
  equivalent forms (``\\frac{1}{2}`` = ``0.5`` = ``1/2``, ``1,000`` = ``1000``) and nothing partial: gold
  ``3`` against ``3\\sqrt{2}`` is wrong.
- **multiple choice**: a letter the model states (boxed, after "answer is", or alone); no letter found
  means wrong, never a default.
- **code**: the code passes the tests when run by a runner the caller supplies.

The lenient published scoring lives apart in :mod:`latentgraph.evaluation.published_lenient`, so the two cannot mix.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from ..errors import InputError

# ---------------------------------------------------------------------------------------------- math


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``, braces balanced.

    Returns None when there is no complete box (an unclosed box counts as none).
    """
    for start in reversed([m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def parse_gsm8k_answer(text: str) -> str | None:
    """The number on the last ``#### N`` line of a GSM8K-style answer, in plain form.

    Dollar signs, thousands commas and a final period are dropped and trailing zeros removed:
    ``"#### $1,234.50"`` gives ``"1234.5"``, ``"#### -7"`` gives ``"-7"``. Returns None when there is no
    such line or what follows ``####`` is not a number.
    """
    lines = re.findall(r"^\s*####\s*(.+?)\s*$", text, flags=re.MULTILINE)
    if not lines:
        return None
    raw = re.sub(r"[\s$,]", "", lines[-1]).rstrip(".").replace("\u2212", "-")
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", raw):
        return None
    number = Decimal(raw).normalize()
    return f"{number:f}" if number != 0 else "0"  # "f" avoids exponents such as 1E+3


def extract_answer(text: str) -> str | None:
    """The final math answer a model committed to, or None.

    Looks, in order, for the last ``\\boxed{}``, a GSM8K ``#### N`` line, and the rest of the line after the
    last "answer is" / "answer:". Inline-math dollars and a final period are removed.
    """
    answer = extract_boxed(text)
    if answer is None:
        answer = parse_gsm8k_answer(text)
    if answer is None:
        phrases = re.findall(r"(?i:answer\s*(?:is|:))\s*:?\s*(.+)", text)
        answer = phrases[-1] if phrases else None
    if answer is None:
        return None
    answer = re.sub(r"(?<!\\)\$|\\[()\[\]]|\*\*", "", answer).strip().rstrip(".").strip()
    return answer or None


def _timeout_seconds(requested: float) -> int | None:
    """math-verify times out with ``signal.alarm``, which takes whole seconds and only works in the main
    thread: elsewhere, run without a timeout and warn (Python's default filter shows the warning once)."""
    if threading.current_thread() is threading.main_thread():
        return max(1, math.ceil(requested))
    warnings.warn(
        "score_math runs outside the main thread, where math-verify cannot time out (it uses signal.alarm); "
        "comparisons run without a time limit. Score in the main thread, or in worker processes, to keep it.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise InputError('scoring math answers needs the math-verify package: pip install "latentgraph[eval]"') from e
    return math_verify


def _parse_math(answer: str, timeout: int | None) -> list:
    mv = _math_verify()
    # math-verify reads "1\,000" (thin-space digit groups) as 1*0; join the groups first.
    answer = re.sub(r"(?<=\d)\\[,;! ](?=\d{3}(?!\d))", "", answer)
    # Parse only as LaTeX inside a box: the plain-expression extractor would take "3" out of "3\sqrt{2}".
    return mv.parse(
        f"\\boxed{{{answer}}}", extraction_config=[mv.LatexExtractionConfig()], parsing_timeout=timeout
    )


def score_math(prediction: str, gold: str, *, timeout: float = 5) -> bool:
    """Whether the model output ``prediction`` states an answer equal to ``gold``.

    Args:
        prediction: the model's full output; its answer is found by :func:`extract_answer`.
        gold: the reference answer itself (``"72"``, ``"\\frac{1}{2}"``), not a worked solution.
        timeout: seconds (rounded up) math-verify may spend on each parse and comparison; a time-out
            scores wrong. Honoured in the main thread only: math-verify times out with ``signal.alarm``,
            so elsewhere the comparison runs without a limit (with a warning).

    Returns:
        True when the answers are mathematically equal; False when they differ, when no answer is found,
        or when parsing fails.

    Raises:
        InputError: ``gold`` is empty.
        ImportError: ``math-verify`` is not installed.
    """
    if not gold.strip():
        raise InputError("score_math got an empty gold answer: check the dataset's gold column")
    answer = extract_answer(prediction)
    if answer is None:
        return False
    seconds = _timeout_seconds(timeout)
    gold_parsed = _parse_math(re.sub(r"(?<!\\)\$", "", gold).strip(), seconds)
    pred_parsed = _parse_math(answer, seconds)
    return bool(
        gold_parsed
        and pred_parsed
        and _math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=seconds)
    )


# ----------------------------------------------------------------------------------- multiple choice

# A stated letter: "(c)" or "[c]" in brackets, or a capital standing alone ("B", "B.", "B)").
_LETTER = r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])(?![\w']))"
_STATED = re.compile(
    r"(?:(?i:answer|choice|option)\s*(?i:is|would be|should be|:|=)\s*:?"
    r"|(?i:choose|pick|select|go with))\s*(?:(?i:option|choice)\s+)?" + _LETTER
)
_LEADING = re.compile(r"\(([A-Z])\)|([A-Z])(?:[.:)](?:\s|$)|$)")


def parse_choice(text: str, letters: str = "ABCD") -> str | None:
    """The option letter a model chose, or None when it states none.

    Accepted, in order of precedence: a boxed letter (``\\boxed{B}``, ``\\boxed{\\text{(b)}}``); the last
    letter after "answer is", "answer:", "correct option is", "choice:", "I choose" and the like (capital,
    or lower case in brackets); a reply that starts with a letter (``"B"``, ``"(B) 42"``, ``"B. 42"``).
    Letters outside ``letters`` are ignored. There is no default.
    """
    text = text.replace("*", "")
    boxed = extract_boxed(text)
    if boxed is not None:
        inner = re.sub(r"\\text\w*\{([^{}]*)\}", r"\1", boxed).strip()
        match = re.match(r"\(?([A-Za-z])\)?(?:[\s.:)]|$)", inner)
        if match and match[1].upper() in letters:
            return match[1].upper()
    stated = [next(g for g in m.groups() if g).upper() for m in _STATED.finditer(text)]
    stated = [letter for letter in stated if letter in letters]
    if stated:
        return stated[-1]
    match = _LEADING.match(text.strip())
    letter = match and next(g for g in match.groups() if g)
    return letter if letter and letter in letters else None


def score_choice(prediction: str, gold: str, letters: str = "ABCD") -> bool:
    """Whether ``prediction`` chooses the gold letter; an unparsed prediction is wrong.

    Raises:
        InputError: ``gold`` is not one of ``letters``.
    """
    gold = gold.strip().upper()
    if len(gold) != 1 or gold not in letters:
        raise InputError(f"gold choice {gold!r} is not one of the letters {letters!r}: check the gold column")
    return parse_choice(prediction, letters) == gold


# ---------------------------------------------------------------------------------------------- code

CodeRunner = Callable[[str, float], tuple[bool, str]]
"""``run(program, timeout) -> (passed, output)``: runs a Python program, ideally in a sandbox; ``passed``
is whether it exited cleanly within ``timeout`` seconds."""


@dataclass(frozen=True)
class CodeScore:
    """The result of :func:`score_code`: whether the tests passed, the code that ran, the runner's output."""

    passed: bool
    code: str | None
    output: str


def extract_code(text: str) -> str | None:
    """The program in a model's reply, or None when the reply is empty.

    Reasoning in ``<think>...</think>`` is dropped. Of the fenced code blocks, the last one that defines a
    function or class is taken (a later block is often a usage example, an earlier one a draft), else the
    last block; a reply without fences is taken as code as it is.
    """
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    text = text.split("</think>")[-1]  # the template may have opened the think block itself
    blocks = re.findall(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", text, flags=re.DOTALL | re.IGNORECASE)
    defining = [b for b in blocks if re.search(r"^\s*(?:async\s+)?(?:def|class)\s", b, flags=re.MULTILINE)]
    code = (defining or blocks or [text])[-1].strip()
    return code or None


def build_program(code: str, tests: str | list[tuple[str, str]]) -> str:
    """The program a runner executes: the candidate ``code`` followed by its tests.

    Args:
        code: the candidate program.
        tests: a Python test script run after the code (asserts, or a ``check()`` call), or
            ``(stdin, expected_stdout)`` pairs for a program that reads its input; outputs are compared
            token by token (whitespace-insensitive).

    The candidate runs through ``exec`` with ``SystemExit`` caught, so a solution that calls ``exit()``
    cannot end the program before its tests run and pass by exiting cleanly.
    """
    if isinstance(tests, str):
        return (
            f"_CANDIDATE = {code!r}\n"
            "try:\n"
            "    exec(compile(_CANDIDATE, '<candidate>', 'exec'), globals())\n"
            "except SystemExit:\n"
            "    pass\n\n" + tests + "\n"
        )
    return (
        "import contextlib, io, sys\n"
        f"_CANDIDATE = compile({code!r}, '<candidate>', 'exec')\n"
        f"for _i, (_stdin, _expected) in enumerate({list(tests)!r}):\n"
        "    sys.stdin, _out = io.StringIO(_stdin), io.StringIO()\n"
        "    with contextlib.redirect_stdout(_out):\n"
        "        try:\n"
        "            exec(_CANDIDATE, {'__name__': '__main__'})\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    if _out.getvalue().split() != _expected.split():\n"
        "        sys.exit(f'test {_i}: expected {_expected!r}, got {_out.getvalue()!r}')\n"
    )


def score_code(
    prediction: str, tests: str | list[tuple[str, str]], run: CodeRunner, *, timeout: float = 10.0
) -> CodeScore:
    """Whether the code in ``prediction`` passes ``tests`` when ``run`` executes it.

    Args:
        prediction: the model's full reply; the code is found by :func:`extract_code`.
        tests: a test script or stdin/stdout pairs (see :func:`build_program`).
        run: executes a program, ``run(program, timeout) -> (passed, output)``. Use a sandbox: the code is
            model-written.
        timeout: seconds the whole program may run.
    """
    code = extract_code(prediction)
    if code is None:
        return CodeScore(passed=False, code=None, output="no code in the prediction")
    passed, output = run(build_program(code, tests), timeout)
    return CodeScore(passed=bool(passed), code=code, output=output)


# -------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct.

    The probability that at least one of ``k`` samples drawn without replacement from the ``n`` is
    correct: ``1 - C(n - c, k) / C(n, k)``. With ``k == n`` it is 1 when any sample is correct.

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise InputError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
