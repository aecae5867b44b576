"""Strict answer scoring, the separate upstream-lenient mode, code scoring through a runner, and pass@k."""

import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from latentgraph.errors import InputError
from latentgraph.evaluation import published_lenient as upstream
from latentgraph.evaluation.strict import (
    build_program,
    extract_answer,
    extract_boxed,
    extract_code,
    parse_choice,
    parse_gsm8k_answer,
    pass_at_k,
    score_choice,
    score_code,
    score_math,
)


def run_unsandboxed(program: str, timeout: float) -> tuple[bool, str]:
    """A plain subprocess runner for these tests only: no isolation, do not use on model output."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(program)
        try:
            done = subprocess.run(
                [sys.executable, "-I", str(script)],
                check=False,
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout} s"
    return done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    "prediction, gold",
    [
        (r"So the result is \boxed{0.5}.", r"\frac{1}{2}"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{1,000}", "1000"),
        (r"\boxed{1000}", "1,000"),
        (r"\boxed{1\,000}", "1000"),
        (r"Thus $\boxed{\dfrac{3}{4}}$", "0.75"),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{\left(3, \frac{\pi}{2}\right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"first \boxed{4}, on reflection \boxed{5}", "5"),
        ("Half of 144 is 72.\n#### 72", "72"),
        ("The answer is $\\frac{1}{2}$.", "0.5"),
        ("**Answer:** 42", "42"),
        (r"\boxed{-7}", "-7"),
        (r"\boxed{x = 5}", "5"),
    ],
)
def test_math_accepts_equivalent_forms(prediction, gold):
    assert score_math(prediction, gold)


@pytest.mark.parametrize(
    "prediction, gold",
    [
        (r"\boxed{3\sqrt{2}}", "3"),  # no credit from the first number
        (r"The answer is 3\sqrt{2}.", "3"),
        (r"\boxed{1/2}", "1/3"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{3}"),
        (r"\boxed{(2,3)}", "23"),
        (r"\boxed{7}", "-7"),
        (r"\boxed{1001}", "1000"),
        (r"\boxed{72.5}", "72"),
        ("I computed 5 and then 72", "72"),  # no committed answer: wrong, not "last number"
        (r"\boxed{}", "0"),
        ("", "1"),
    ],
)
def test_math_rejects_wrong_or_missing_answers(prediction, gold):
    assert not score_math(prediction, gold)


def test_extract_boxed_takes_the_last_balanced_box():
    assert extract_boxed(r"\boxed{1} then \boxed{\frac{a}{b^{2}}} done") == r"\frac{a}{b^{2}}"
    assert extract_boxed(r"\fbox{7}") == "7"
    assert extract_boxed(r"\boxed{unclosed") is None
    assert extract_boxed("no box") is None


def test_extract_answer_order_and_cleanup():
    assert extract_answer("The answer is 9.\n\\boxed{10}") == "10"
    assert extract_answer("work\n#### 1,234") == "1234"
    assert extract_answer("So the final answer is: $\\frac{2}{3}$.") == r"\frac{2}{3}"
    assert extract_answer("nothing committed here 5") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 24 clips.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### $1,234.50", "1234.5"),
        ("#### -3", "-3"),
        ("#### 0.50", "0.5"),
        ("#### 1000000", "1000000"),
        ("#### 18.", "18"),
        ("#### 5\nmore text\n#### 6", "6"),
        ("#### twelve", None),
        ("The answer is 12", None),
    ],
)
def test_parse_gsm8k_answer(text, expected):
    assert parse_gsm8k_answer(text) == expected


def test_gsm8k_gold_and_prediction_round_trip():
    gold = parse_gsm8k_answer("He pays 2 * $600 = $<<2*600=1200>>1200.\n#### 1,200")
    assert gold == "1200"
    assert score_math("so he pays \\boxed{\\$1,200}", gold)
    assert not score_math("so he pays \\boxed{120}", gold)


def test_score_math_rejects_empty_gold():
    with pytest.raises(InputError, match="empty gold"):
        score_math(r"\boxed{1}", "  ")


def test_score_math_without_math_verify_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(InputError, match='needs the math-verify package: pip install "latentgraph\\[eval\\]"'):
        score_math(r"\boxed{1}", "1")


def test_score_math_outside_the_main_thread_warns_and_still_scores():
    results = []

    def work():
        with pytest.warns(RuntimeWarning, match="main thread"):
            results.append(score_math(r"\boxed{0.5}", r"\frac12"))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert results == [True]


# ----------------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    "text, letter",
    [
        (r"Reasoning... so \boxed{C}", "C"),
        (r"$\boxed{\text{(b)}}$", "B"),
        ("The answer is (C).", "C"),
        ("Answer: B", "B"),
        ("Final answer: **D**", "D"),
        ("The correct option is D, since...", "D"),
        ("I choose option B.", "B"),
        ("the answer is (c)", "C"),
        ("Option A is wrong. The answer is C.", "C"),
        ("B", "B"),
        ("(A) 42", "A"),
        ("C. Because the enzyme...", "C"),
    ],
)
def test_parse_choice_phrasings(text, letter):
    assert parse_choice(text) == letter


@pytest.mark.parametrize(
    "text",
    [
        "I am not sure.",
        "A cat sat on the mat.",  # an article, not a choice
        "The answer is Avogadro's number",
        "The answer is E",  # not an option of a 4-way question
        "answer: b",  # a bare lower-case letter is too ambiguous
        "",
    ],
)
def test_parse_choice_without_a_letter_is_none_and_wrong(text):
    assert parse_choice(text) is None
    assert not score_choice(text, "A")  # no free credit when the gold is A


def test_parse_choice_respects_the_letters():
    assert parse_choice("The answer is E", letters="ABCDE") == "E"
    assert score_choice("Answer: E", "E", letters="ABCDE")
    with pytest.raises(InputError, match="not one of the letters"):
        score_choice("Answer: E", "E")


# ---------------------------------------------------------------------------------------------- code

ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_extract_code_prefers_the_last_defining_block():
    reply = (
        "<think>maybe ```python\ndef add(a, b): return 0\n```</think>"
        "Draft:\n```python\ndef add(a, b):\n    return a - b\n```\n"
        "Fixed:\n```python\ndef add(a, b):\n    return a + b\n```\n"
        "Usage:\n```python\nprint(add(1, 2))\n```"
    )
    assert extract_code(reply) == "def add(a, b):\n    return a + b"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("  ") is None


def test_score_code_passes_and_fails_through_the_runner():
    good = score_code("```python\ndef add(a, b):\n    return a + b\n```", ADD_TESTS, run_unsandboxed)
    assert good.passed and good.code.startswith("def add")
    bad = score_code("```python\ndef add(a, b):\n    return a * b\n```", ADD_TESTS, run_unsandboxed)
    assert not bad.passed and "AssertionError" in bad.output
    assert not score_code("", ADD_TESTS, run_unsandboxed).passed


def test_score_code_an_early_exit_does_not_skip_the_tests():
    cheat = "```python\nimport sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n```"
    assert not score_code(cheat, ADD_TESTS, run_unsandboxed).passed


def test_score_code_stdin_cases():
    cases = [("1 2\n", "3\n"), ("5 7\n", "12")]
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert score_code(good, cases, run_unsandboxed).passed
    wrong = score_code("```python\nprint(3)\n```", cases, run_unsandboxed)
    assert not wrong.passed and "test 1" in wrong.output


def test_score_code_hands_program_and_timeout_to_the_runner():
    seen = []

    def runner(program, timeout):
        seen.append((program, timeout))
        return True, "ok"

    result = score_code("```python\ndef f(): pass\n```", "assert f() is None", runner, timeout=3.0)
    assert result.passed and result.output == "ok"
    assert seen == [(build_program("def f(): pass", "assert f() is None"), 3.0)]


def test_score_code_timeout_is_a_failure():
    slow = "```python\nwhile True:\n    pass\n```"
    assert not score_code(slow, "assert True", run_unsandboxed, timeout=1.0).passed


# -------------------------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (10, 1, 1, 0.1),  # pass@1 is the fraction correct
        (10, 3, 1, 0.3),
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (10, 0, 5, 0.0),
        (4, 1, 4, 1.0),  # k == n: any correct sample passes
        (10, 8, 3, 1.0),  # fewer than k wrong samples: always passes
    ],
)
def test_pass_at_k_against_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, 1, 0), (5, 1, 6), (5, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(InputError, match="pass_at_k needs"):
        pass_at_k(n, c, k)


# ----------------------------------------------------------------------------------- upstream lenient


@pytest.mark.parametrize(
    "prediction, gold, strategies",
    [
        (r"\boxed{3\sqrt{2}}", "3", ["intpart"]),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{3}", ["intpart"]),
        (r"\boxed{1/2}", "1/3", ["intpart"]),
        (r"\boxed{(2,3)}", "23", ["intpart", "digits"]),
        (r"\boxed{7}", "-7", ["digits"]),
        ("I computed 5 and then 72", "5", ["intpart"]),  # the whole output, first number
    ],
)
def test_upstream_accepts_what_strict_rejects(prediction, gold, strategies):
    assert upstream.matching_strategies(prediction, gold) == strategies
    assert upstream.score_math(prediction, gold)
    assert not score_math(prediction, gold)


def test_upstream_still_rejects_clearly_different_numbers():
    assert not upstream.score_math(r"\boxed{8}", "7")
    assert upstream.matching_strategies(r"\boxed{-7}", "-7") == ["intpart", "latex_text", "nospace", "digits"]


def test_upstream_choice_defaults_to_a():
    assert upstream.parse_choice("I am not sure.") == "A"
    assert upstream.score_choice("I am not sure.", "A")
    assert not score_choice("I am not sure.", "A")
    assert upstream.parse_choice("The answer is (C).") == "C"


def test_score_math_times_out_as_wrong_and_accepts_fractional_timeouts():
    assert not score_math(r"\boxed{9^{9^{9^{9}}}}", "1", timeout=0.5)  # rounded up to the 1 s alarm
