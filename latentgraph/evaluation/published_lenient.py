"""The lenient scoring of the published RecursiveMAS evaluation, kept only to compare with its numbers.

Do not use it to judge a system: it gives credit that strict scoring (:mod:`latentgraph.evaluation.strict`) does
not. A math answer counts as correct when *any* of four normalisations of prediction and gold agree, one
of which keeps only the integer part of the first number (so ``3\\sqrt{2}`` matches ``3`` and ``1/2``
matches ``1/3``) and another only the digits (``(2,3)`` matches ``23``). A multiple-choice reply with no
letter is read as "A". Report these scores apart from strict ones, labelled as upstream-lenient.

This is our own re-implementation of the published behaviour, from its description.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .strict import extract_boxed


def extract_answer(text: str) -> str:
    """The published math extraction: the last brace-free ``\\boxed{}``, else a greedy ``\\boxed{.*}``,
    else the whole output. (The published "Final Answer:" fallback never matched, so it is left out.)"""
    flat = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if flat:
        return flat[-1].strip()
    greedy = re.search(r"\\boxed\{(.*)\}", text, flags=re.DOTALL)
    return (greedy[1] if greedy else text).strip()


def _intpart(s: str) -> str:
    """Integer part of the first number, after unwrapping ``\\text{}``, evaluating simple fractions and
    dropping commas and degree marks."""
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\d?frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", _fraction_value, s)
    s = re.sub(r",|\^\s*\{?\\circ\}?|°", "", s)
    first = re.search(r"-?\d+(?:\.\d+)?", s)
    return str(int(float(first[0]))) if first else ""


def _fraction_value(match: re.Match) -> str:
    numerator, denominator = float(match[1]), float(match[2])
    return str(numerator / denominator) if denominator else match[0]


def _latex_text(s: str) -> str:
    """Drop sizing and spacing macros, dollars, braces, quotes and whitespace."""
    s = re.sub(r"\\left|\\right|\\[,;:! ]|\\q?quad|\$|[{}\"']", "", s)
    return re.sub(r"\s+", "", s)


def _nospace(s: str) -> str:
    return re.sub(r"\s+", "", s)


def _digits(s: str) -> str:
    """The digits before the first ".", without leading zeros."""
    return re.sub(r"\D", "", s.split(".")[0]).lstrip("0")


STRATEGIES: dict[str, Callable[[str], str]] = {
    "intpart": _intpart,
    "latex_text": _latex_text,
    "nospace": _nospace,
    "digits": _digits,
}
"""The published normalisations, in the order they are tried; one agreeing is enough."""


def matching_strategies(prediction: str, gold: str) -> list[str]:
    """Names of the strategies under which the answer in ``prediction`` equals ``gold``.

    Two empty normal forms do not count as agreeing.
    """
    answer = extract_answer(prediction)
    return [name for name, norm in STRATEGIES.items() if norm(answer) and norm(answer) == norm(gold)]


def score_math(prediction: str, gold: str) -> bool:
    """The published, lenient math verdict: correct when any strategy agrees."""
    return bool(matching_strategies(prediction, gold))


_KEYWORD = re.compile(
    r"(?:final choice|correct option|answer|choice|option)\s*(?:is)?\s*[:(]?\s*([A-D])\b", re.IGNORECASE
)


def parse_choice(text: str) -> str:
    """The published multiple-choice reading: boxed content, then the last "Final Answer/Choice:" line, then
    the whole text; in each a keyword before a letter A-D, else a leading letter. Defaults to ``"A"``."""
    final_lines = re.findall(r"final (?:answer|choice)\s*:(.*)", text, flags=re.IGNORECASE)
    candidates = [extract_boxed(text), final_lines[-1] if final_lines else None, text]
    for candidate in filter(None, candidates):
        match = _KEYWORD.search(candidate) or re.match(r"\s*\(?([A-D])\b", candidate, flags=re.IGNORECASE)
        if match:
            return match[1].upper()
    return "A"


def score_choice(prediction: str, gold: str) -> bool:
    """The published multiple-choice verdict, with its default "A" for unparsed replies."""
    return parse_choice(prediction) == gold.strip().upper()
