"""Dataset loading: local files with column mappings, benchmark row layouts, seeded option shuffling, and
the clear failure of named benchmarks offline."""

import base64
import json
import pickle
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest

from latentgraph.errors import InputError
from latentgraph.evaluation.datasets import HUB_DATASETS, Example, load_dataset, read_rows, shuffle_choices
from latentgraph.evaluation.strict import build_program

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def runs_cleanly(program: str) -> bool:
    done = subprocess.run([sys.executable, "-I", "-c", program], check=False, capture_output=True, timeout=20)
    return done.returncode == 0


@pytest.fixture
def fake_hub(monkeypatch):
    """Installs a stand-in ``datasets`` module serving ``rows`` and recording its calls."""
    calls = []

    def install(rows=None, error=None):
        def fake_load(path, name=None, *, split, data_files=None):
            calls.append({"path": path, "name": name, "split": split, "data_files": data_files})
            if error:
                raise error
            return list(rows)

        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
        return calls

    return install


# ------------------------------------------------------------------------------------------ Example


def test_example_prompt_letters_the_options():
    example = Example("q1", "Which is a prime?", "B", "choice", ["4", "5", "6"])
    assert example.letters == "ABC"
    assert example.prompt == "Which is a prime?\n\nA) 4\nB) 5\nC) 6"
    assert Example("q2", "1+1?", "2", "math").prompt == "1+1?"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "essay", "gold": "x"}, "kind must be"),
        ({"kind": "choice", "gold": "E", "choices": ["a", "b"]}, "gold letter"),
        ({"kind": "choice", "gold": "", "choices": ["a", "b"]}, "gold letter"),
        ({"kind": "code", "gold": ""}, "needs tests"),
    ],
)
def test_example_rejects_inconsistent_fields(kwargs, message):
    with pytest.raises(InputError, match=message):
        Example(id="bad", question="?", **kwargs)


# ------------------------------------------------------------------------------------------ shuffling


def test_shuffle_is_seeded_and_the_gold_letter_follows_the_gold_option():
    example = Example("q", "Pick the noble gas.", "C", "choice", ["oxygen", "iron", "neon", "carbon", "tin"])
    first, again = shuffle_choices(example, seed=0), shuffle_choices(example, seed=0)
    assert first == again
    assert sorted(first.choices) == sorted(example.choices)
    assert first.choices[first.letters.index(first.gold)] == "neon"
    assert first.metadata["original_gold"] == "C"
    orders = {tuple(shuffle_choices(example, seed=s).choices) for s in range(6)}
    assert len(orders) > 1  # different seeds give different orders
    for seed in range(6):
        shuffled = shuffle_choices(example, seed)
        assert shuffled.choices[shuffled.letters.index(shuffled.gold)] == "neon"


def test_shuffle_spreads_the_gold_letter():
    golds = {
        shuffle_choices(Example(f"q{i}", f"question {i}", "A", "choice", ["w", "x", "y", "z"]), seed=0).gold
        for i in range(40)
    }
    assert golds == {"A", "B", "C", "D"}


# ---------------------------------------------------------------------------------------- local files


def test_gsm8k_format_from_a_local_jsonl(tmp_path):
    rows = [
        {"question": "Q0", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
        {"question": "Q1", "answer": "She pays $<<1000+234=1234>>1,234.\n#### 1,234"},
        {"question": "Q2", "answer": "It drops by 3.\n#### -3"},
        {"question": "Q3", "answer": "Each is half.\n#### 0.5"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    examples = load_dataset(path, format="gsm8k")
    assert [e.gold for e in examples] == ["5", "1234", "-3", "0.5"]
    assert [e.id for e in examples] == ["gsm8k-0", "gsm8k-1", "gsm8k-2", "gsm8k-3"]
    assert examples[1].kind == "math" and examples[1].metadata["solution"].endswith("#### 1,234")
    assert [e.question for e in load_dataset(path, format="gsm8k", offset=1, limit=2)] == ["Q1", "Q2"]


@pytest.mark.skipif(not SHARED_GSM8K.exists(), reason="shared GSM8K file not present")
def test_shared_gsm8k_file_loads_a_held_out_slice():
    examples = load_dataset(SHARED_GSM8K, format="gsm8k", offset=7000, limit=3)
    assert [e.id for e in examples] == ["gsm8k-7000", "gsm8k-7001", "gsm8k-7002"]
    assert all(e.gold.lstrip("-").replace(".", "").isdigit() for e in examples)
    assert load_dataset(SHARED_GSM8K, format="gsm8k", limit=1)[0].gold == "72"


def test_gsm8k_row_without_final_line_is_an_input_error(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q", "answer": "no final line"}])
    with pytest.raises(InputError, match="row 0.*####"):
        load_dataset(path, format="gsm8k")


def test_math_columns_from_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"uid": "a7", "problem": "2^3?", "answer": 8}])
    (example,) = load_dataset(path, columns={"id": "uid", "question": "problem", "gold": "answer"})
    assert (example.id, example.question, example.gold, example.kind) == ("a7", "2^3?", "8", "math")


def test_choice_columns_from_csv_with_gold_text(tmp_path):
    path = tmp_path / "quiz.csv"
    path.write_text("q,right,w1,w2,w3\nCapital of France?,Paris,Rome,Berlin,Madrid\n")
    columns = {"question": "q", "gold": "right", "choices": ["right", "w1", "w2", "w3"]}
    (unshuffled,) = load_dataset(path, columns=columns, shuffle=False)
    assert (unshuffled.choices, unshuffled.gold, unshuffled.id) == (
        ["Paris", "Rome", "Berlin", "Madrid"],
        "A",
        "quiz.csv-0",
    )
    (shuffled,) = load_dataset(path, columns=columns, seed=3)
    assert shuffled.choices[shuffled.letters.index(shuffled.gold)] == "Paris"
    assert shuffled == load_dataset(path, columns=columns, seed=3)[0]


@pytest.mark.parametrize("gold, letter", [(2, "C"), ("c", "C"), ("D", "D"), ("17", "B")])
def test_choice_gold_as_index_letter_or_text(tmp_path, gold, letter):
    row = {"q": "?", "opts": ["3", "17", "19", "23"], "g": gold}
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    (example,) = load_dataset(path, columns={"question": "q", "choices": "opts", "gold": "g"}, shuffle=False)
    assert example.gold == letter


def test_choice_list_in_one_csv_cell_asks_for_columns(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('q,opts,g\nPick,"x, y",y\n')
    with pytest.raises(
        InputError, match="c.csv, row 0: choices column 'opts' holds text; map choices to a list"
    ):
        load_dataset(path, columns={"question": "q", "choices": "opts", "gold": "g"})


def test_unmatched_choice_gold_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"q": "?", "opts": ["x", "y"], "g": "z"}])
    with pytest.raises(InputError, match=r"c.jsonl, row 0: gold 'z'"):
        load_dataset(path, columns={"question": "q", "choices": "opts", "gold": "g"})


def test_code_columns_join_assert_lists(tmp_path):
    row = {"text": "Write add(a, b).", "asserts": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}
    path = write_jsonl(tmp_path / "code.jsonl", [row])
    (example,) = load_dataset(path, columns={"question": "text", "tests": "asserts"})
    assert example.kind == "code" and example.tests == "assert add(1, 2) == 3\nassert add(0, 0) == 0"
    assert runs_cleanly(build_program("def add(a, b):\n    return a + b", example.tests))
    assert not runs_cleanly(build_program("def add(a, b):\n    return a", example.tests))


def test_parquet_and_json_files(tmp_path):
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": "4"}]
    pyarrow_parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    columns = {"question": "problem", "gold": "answer"}
    for name in ("d.parquet", "d.json"):
        assert [e.gold for e in load_dataset(tmp_path / name, columns=columns)] == ["2", "4"]


def test_read_rows_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(InputError, match="missing.jsonl does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported file type '.txt'"):
        read_rows(tmp_path / "d.txt")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(InputError, match="bad.jsonl, line 3: not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "scalar.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="one object per row"):
        read_rows(tmp_path / "scalar.json")


@pytest.mark.parametrize("name, text, message", [
    ("deep.jsonl", "[" * 5000 + "]" * 5000, "deep.jsonl, line 1: not JSON Python can read: its lists or mappings "
                                            "are nested too deeply; fix or drop the line"),
    ("deep.json", "[" * 5000 + "]" * 5000, "deep.json is not JSON Python can read: its lists or mappings are "
                                           "nested too deeply; fix the file"),
    ("big.jsonl", '{"question": "q", "answer": ' + "9" * 5000 + "}", "big.jsonl, line 1: not JSON Python can read: "
                                                                     "it holds a value that cannot be converted"),
    ("big.json", '[{"answer": ' + "9" * 5000 + "}]", "big.json is not JSON Python can read: it holds a value"),
])
def test_json_python_cannot_hold_is_an_input_error(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=message):
        read_rows(tmp_path / name)


@pytest.mark.parametrize("answer", [4, ["#### 4"], None])
def test_a_cell_of_another_type_names_the_row(tmp_path, answer):
    path = tmp_path / "typed.jsonl"
    path.write_text(json.dumps({"question": "2 + 2?", "answer": "#### 4"}) + "\n"
                    + json.dumps({"question": "3 + 3?", "answer": answer}) + "\n")
    with pytest.raises(InputError, match="typed.jsonl, row 1: a cell holds a value of the wrong type"):
        load_dataset(path, format="gsm8k")


@pytest.mark.parametrize("seed", ["x", True, -1, 2**64])
def test_a_seed_that_is_no_seed_is_an_input_error(tmp_path, seed):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"question": "2 + 2?", "answer": "#### 4"}) + "\n")
    with pytest.raises(InputError, match="seed must be an integer from 0 to 2\\*\\*64 - 1"):
        load_dataset(path, format="gsm8k", seed=seed)


def test_column_mapping_errors(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "1+1", "answer": "2"}])
    with pytest.raises(InputError, match=r"no column 'question'; the columns are \['answer', 'problem'\]"):
        load_dataset(path, columns={"question": "question", "gold": "answer"})
    with pytest.raises(InputError, match=r"unknown keys \['answr'\], missing \['gold'\]"):
        load_dataset(path, columns={"question": "problem", "answr": "answer"})
    with pytest.raises(InputError, match="exactly one of columns"):
        load_dataset(path)
    with pytest.raises(InputError, match="format='gsm9k' is not a known benchmark"):
        load_dataset(path, format="gsm9k")
    other = write_jsonl(tmp_path / "o.jsonl", [{"prompt": "1+1", "answer": "#### 2"}])
    with pytest.raises(InputError, match=r"o.jsonl, row 0: missing column 'question'; the columns are"):
        load_dataset(other, format="gsm8k")


def test_negative_slice_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "1+1", "answer": "2"}])
    with pytest.raises(InputError, match="offset and limit must be >= 0"):
        load_dataset(path, columns={"question": "problem", "gold": "answer"}, offset=-1)


def test_unknown_name_lists_the_benchmarks():
    with pytest.raises(InputError, match="neither a .jsonl.*nor a known benchmark.*gsm8k.*math500"):
        load_dataset("gsm9k")


# -------------------------------------------------------------------------------------------- the hub


def test_named_benchmark_without_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(
        InputError, match=r"'gsm8k' \(openai/gsm8k\) needs network or a local copy.*format='gsm8k'"
    ):
        load_dataset("gsm8k")


def test_named_benchmark_offline(fake_hub):
    calls = fake_hub(error=ConnectionError("no route to host"))
    with pytest.raises(InputError, match="needs network or a local copy.*ConnectionError: no route to host"):
        load_dataset("math500")
    assert calls == [{"path": "HuggingFaceH4/MATH-500", "name": None, "split": "test", "data_files": None}]


def test_hub_math_rows_and_split_override(fake_hub):
    calls = fake_hub([{"problem": "P", "answer": 12, "problem_idx": 1}])
    (example,) = load_dataset("aime26", split="train")
    assert (example.id, example.question, example.gold) == ("1", "P", "12")
    assert calls[0]["path"] == "MathArena/aime_2026" and calls[0]["split"] == "train"


def test_hub_gpqa_rows_are_shuffled_with_the_gold_tracked(fake_hub):
    rows = [
        {
            "Record ID": f"r{i}",
            "Question": f" Q{i} ",
            "Correct Answer": "right",
            "Incorrect Answer 1": "w1",
            "Incorrect Answer 2": "w2",
            "Incorrect Answer 3": "w3",
        }
        for i in range(12)
    ]
    calls = fake_hub(rows)
    examples = load_dataset("gpqa", seed=1)
    assert calls[0]["name"] == "gpqa_diamond" and calls[0]["split"] == "train"
    assert all(e.choices[e.letters.index(e.gold)] == "right" for e in examples)
    assert {e.gold for e in examples} != {"A"}
    assert examples[0].id == "r0" and examples[0].question == "Q0"
    assert {e.gold for e in load_dataset("gpqa", shuffle=False)} == {"A"}


def test_hub_medqa_keeps_letter_order_without_shuffle(fake_hub):
    fake_hub([{"question": "Q", "options": {"B": "b", "A": "a", "C": "c", "D": "d"}, "answer_idx": "C"}])
    (example,) = load_dataset("medqa", shuffle=False)
    assert (example.choices, example.gold) == (["a", "b", "c", "d"], "C")


def test_hub_mbppplus_reference_passes_its_tests(fake_hub):
    fake_hub(
        [
            {
                "task_id": 2,
                "prompt": "Write a function to add two numbers.",
                "code": "def add(a, b):\n    return a + b",
                "test_imports": ["import math"],
                "test_list": ["assert add(1, 2) == 3"],
                "test": "for a, b in [(1, 2), (5, 5)]:\n    assert add(a, b) == math.fsum([a, b])\n",
            }
        ]
    )
    (example,) = load_dataset("mbppplus")
    assert example.id == "mbppplus-2" and example.question.endswith("assert add(1, 2) == 3")
    assert runs_cleanly(build_program(example.gold, example.tests))
    assert not runs_cleanly(build_program("def add(a, b):\n    return a - b", example.tests))


def _lcb_private(cases: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def test_hub_livecodebench_stdin_and_private_tests(fake_hub):
    public = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]
    private = [{"input": "10 5\n", "output": "15\n", "testtype": "stdin"}]
    fake_hub(
        [
            {
                "question_id": "abc1",
                "question_content": "Add two numbers.",
                "starter_code": "",
                "platform": "atcoder",
                "public_test_cases": json.dumps(public),
                "private_test_cases": _lcb_private(private),
                "metadata": "{}",
            }
        ]
    )
    (example,) = load_dataset("livecodebench")
    assert example.tests == [("1 2\n", "3\n"), ("10 5\n", "15\n")]
    assert HUB_DATASETS["livecodebench"].data_files[-1] == "test6.jsonl"
    assert runs_cleanly(build_program("a, b = map(int, input().split())\nprint(a + b)", example.tests))


def test_hub_livecodebench_functional_tests(fake_hub):
    cases = [{"input": "[1, 2, 3]\n2", "output": "12", "testtype": "functional"}]
    starter = "class Solution:\n    def scale(self, nums: list, k: int) -> int:\n        "
    fake_hub(
        [
            {
                "question_id": "lc9",
                "question_content": "Sum times k.",
                "starter_code": starter,
                "public_test_cases": json.dumps(cases),
                "private_test_cases": "[]",
                "metadata": json.dumps({"func_name": "scale"}),
            }
        ]
    )
    (example,) = load_dataset("livecodebench")
    assert "class Solution" in example.question
    solution = "class Solution:\n    def scale(self, nums, k):\n        return sum(nums) * k"
    assert runs_cleanly(build_program(solution, example.tests))
    assert not runs_cleanly(build_program(solution.replace("* k", "+ k"), example.tests))


def test_livecodebench_private_tests_refuse_code_in_pickles(fake_hub):
    crafted = base64.b64encode(zlib.compress(pickle.dumps(print))).decode()  # references builtins.print
    fake_hub([{"question_content": "Q", "public_test_cases": "[]", "private_test_cases": crafted}])
    with pytest.raises(InputError, match="refusing to unpickle builtins.print"):
        load_dataset("livecodebench")
