"""Evaluation datasets as lists of :class:`Example`: named benchmarks from the hub, or local files.

A named benchmark (``"gsm8k"``, ``"math500"``, ``"gpqa"``, ...) is fetched through the optional
``datasets`` package and needs network. Offline, pass a local JSONL/JSON/CSV/Parquet copy instead: with
``format=`` naming the benchmark whose row layout the file has, or with ``columns=`` mapping our fields to
its columns::

    load_dataset("train.jsonl", format="gsm8k", offset=7000, limit=200)
    load_dataset("quiz.csv", columns={"question": "q", "choices": ["a", "b", "c", "d"], "gold": "right"})

Multiple-choice options are shuffled by default, seeded per question, and the gold letter follows the gold
option, so a model cannot score by always answering "A".
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import itertools
import json
import pickle
import random
import string
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..core.sampling import check_seed
from ..errors import InputError
from ..files.text import NotJSON, parse_json, read_text
from .strict import parse_gsm8k_answer

Kind = Literal["math", "choice", "code"]


@dataclass
class Example:
    """One evaluation item.

    Attributes:
        id: stable identifier (from the dataset, else ``"<source>-<row>"``).
        question: the task text, without the options of a multiple-choice item.
        gold: the reference: the answer for ``"math"``, the option letter for ``"choice"``, a reference
            solution (possibly empty) for ``"code"``.
        kind: ``"math"``, ``"choice"`` or ``"code"``; picks the scorer.
        choices: option texts of a ``"choice"`` item, lettered A, B, ... in this order.
        tests: for ``"code"``, a test script or ``(stdin, expected_stdout)`` pairs (see
            :func:`latentgraph.evaluation.strict.build_program`).
        metadata: anything else worth keeping (source row, subject, level, original option order).
    """

    id: str
    question: str
    gold: str
    kind: Kind
    choices: list[str] = field(default_factory=list)
    tests: str | list[tuple[str, str]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("math", "choice", "code"):
            raise InputError(f"example {self.id}: kind must be 'math', 'choice' or 'code', got {self.kind!r}")
        if self.kind == "choice" and (
            len(self.choices) < 2 or len(self.gold) != 1 or self.gold not in self.letters
        ):
            raise InputError(f"example {self.id}: needs 2+ choices and a gold letter among {self.letters!r}")
        if self.kind == "code" and not self.tests:
            raise InputError(f"example {self.id}: a code example needs tests")

    @property
    def letters(self) -> str:
        """The option letters, ``"ABCD"`` for four choices."""
        return string.ascii_uppercase[: len(self.choices)]

    @property
    def prompt(self) -> str:
        """The text to put in ``{question}``: the question, then the lettered options if there are any."""
        options = "\n".join(f"{letter}) {text}" for letter, text in zip(self.letters, self.choices))
        return f"{self.question}\n\n{options}" if options else self.question


def shuffle_choices(example: Example, seed: int) -> Example:
    """A copy of a ``"choice"`` example with its options in a seeded order and the gold letter moved along.

    The order depends only on ``seed`` and the question text, so it is the same in every run and for every
    subset of the dataset. The original letter is kept in ``metadata["original_gold"]``.
    """
    digest = hashlib.sha256(f"{seed}\0{example.question}".encode()).digest()
    order = list(range(len(example.choices)))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    gold_index = order.index(example.letters.index(example.gold))
    return replace(
        example,
        choices=[example.choices[i] for i in order],
        gold=example.letters[gold_index],
        metadata={**example.metadata, "original_gold": example.gold},
    )


# ------------------------------------------------------------------------------------ local files


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl``, ``.json`` (a list of objects), ``.csv`` or ``.parquet`` file, as dicts."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset file {path} does not exist: check the path")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(parse_json(line))
            except NotJSON as e:
                raise InputError(f"{path}, line {number}: {e}; fix or drop the line") from None
    elif suffix == ".json":
        try:
            rows = parse_json(read_text(path))
        except NotJSON as e:
            raise InputError(f"{path} is {e}; fix the file") from None
    elif suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError as e:
            raise InputError(f"reading {path} needs pyarrow: pip install pyarrow") from e
        rows = pyarrow.parquet.read_table(path).to_pylist()
    else:
        raise InputError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    if not (isinstance(rows, list) and all(isinstance(row, dict) for row in rows)):
        raise InputError(f"{path}: expected one object per row (a .json file must hold a list of objects)")
    return rows


def _cell(row: dict[str, Any], column: str, where: str) -> Any:
    if column not in row:
        raise InputError(
            f"{where}: no column {column!r}; the columns are {sorted(row)}. Fix the columns= mapping."
        )
    return row[column]


def _gold_index(gold: Any, choices: list[str], where: str) -> int:
    """Where the gold option is: an int is an index, one letter names an option, other text must equal one.

    A digit string is read as option text, not an index, since CSV cells are strings and options are often
    numbers.
    """
    letters = string.ascii_uppercase[: len(choices)]
    if isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices):
        return gold
    text = str(gold).strip()
    if len(text) == 1 and text.upper() in letters:
        return letters.index(text.upper())
    if text in choices:
        return choices.index(text)
    raise InputError(f"{where}: gold {gold!r} is not an option letter ({letters}), an index, or an option")


def from_columns(columns: dict[str, str | list[str]], source: str) -> Callable[[dict, int], Example]:
    """A row converter for a ``columns=`` mapping from our fields to a file's columns.

    Keys: ``question`` and ``gold`` (required, except ``gold`` for code), ``id``, ``choices`` (one column
    holding a list, or a list of columns, one per option) and ``tests`` (a script, or a list of asserts). The
    kind follows: ``"choice"`` with ``choices``, ``"code"`` with ``tests``, else ``"math"``.
    """
    unknown = set(columns) - {"id", "question", "gold", "choices", "tests"}
    kind: Kind = "choice" if "choices" in columns else "code" if "tests" in columns else "math"
    missing = {"question"} | ({"gold"} if kind != "code" else set())
    if unknown or missing - set(columns):
        raise InputError(
            f"columns= for {source}: unknown keys {sorted(unknown)}, missing {sorted(missing - set(columns))}"
            "; the keys are question, gold, id, choices, tests"
        )

    def convert(row: dict, index: int) -> Example:
        where = f"{source}, row {index}"
        fields = {key: _cell(row, col, where) for key, col in columns.items() if isinstance(col, str)}
        example_id = str(fields.get("id", f"{source}-{index}"))
        gold = fields.get("gold", "")
        choices, tests = [], None
        if kind == "choice":
            spec = columns["choices"]
            cell = [_cell(row, col, where) for col in spec] if isinstance(spec, list) else fields["choices"]
            if isinstance(cell, str):  # e.g. a CSV cell: lists need one column per option there
                raise InputError(
                    f"{where}: choices column {spec!r} holds text; map choices to a list of columns"
                )
            choices = [str(c).strip() for c in (cell.values() if isinstance(cell, dict) else cell)]
            gold = string.ascii_uppercase[_gold_index(gold, choices, where)]
        if kind == "code":
            tests = fields["tests"] if isinstance(fields["tests"], str) else "\n".join(fields["tests"])
        question = str(fields["question"])
        return Example(example_id, question, str(gold).strip(), kind, choices, tests, metadata={"row": index})

    return convert


# ------------------------------------------------------------------------------------ hub registry


@dataclass(frozen=True)
class HubDataset:
    """Where a named benchmark lives on the hub, and how one of its rows becomes an :class:`Example`."""

    hub_id: str
    split: str
    convert: Callable[[dict, int], Example]
    config: str | None = None
    data_files: tuple[str, ...] | None = None


def _math(question: str, gold: str, id_column: str) -> Callable[[dict, int], Example]:
    def convert(row: dict, index: int) -> Example:
        extra = {k: row[k] for k in ("subject", "level") if k in row}
        return Example(str(row[id_column]), row[question], str(row[gold]).strip(), "math", metadata=extra)

    return convert


def _gsm8k(row: dict, index: int) -> Example:
    gold = parse_gsm8k_answer(row["answer"])
    if gold is None:
        raise InputError(f"gsm8k row {index}: the answer has no final '#### <number>' line")
    return Example(f"gsm8k-{index}", row["question"], gold, "math", metadata={"solution": row["answer"]})


def _gpqa(row: dict, index: int) -> Example:
    options = ["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
    choices = [str(row[column]).strip() for column in options]
    example_id = str(row.get("Record ID", f"gpqa-{index}"))
    return Example(example_id, row["Question"].strip(), "A", "choice", choices)


def _medqa(row: dict, index: int) -> Example:
    letters = sorted(row["options"])
    choices = [str(row["options"][letter]).strip() for letter in letters]
    gold = string.ascii_uppercase[letters.index(row["answer_idx"])]
    return Example(f"medqa-{index}", row["question"].strip(), gold, "choice", choices)


def _mbppplus(row: dict, index: int) -> Example:
    shown = "\n".join(row["test_list"][:3])  # as in the published prompts; the asserts name the function
    question = f"{row['prompt'].strip()}\nYour code should pass these tests:\n{shown}"
    tests = "\n".join(row.get("test_imports") or []) + "\n\n" + row["test"]
    return Example(f"mbppplus-{row['task_id']}", question, row.get("code", ""), "code", tests=tests)


class _PlainUnpickler(pickle.Unpickler):
    """Loads plain data only: every class or function reference is refused, so no code can run."""

    def find_class(self, module: str, name: str) -> Any:
        raise InputError(f"refusing to unpickle {module}.{name} from LiveCodeBench test data")


def _lcb_cases(value: str | list) -> list[dict]:
    """LiveCodeBench test cases: a JSON list, or (private tests) base64 of a zlib-compressed pickled JSON
    string."""
    if isinstance(value, list):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        packed = zlib.decompress(base64.b64decode(value.encode()))
        return json.loads(_PlainUnpickler(io.BytesIO(packed)).load())


def _livecodebench(row: dict, index: int) -> Example:
    cases = _lcb_cases(row["public_test_cases"]) + _lcb_cases(row.get("private_test_cases") or "[]")
    starter = (row.get("starter_code") or "").strip()
    if cases and cases[0].get("testtype") == "functional":
        func = json.loads(row.get("metadata") or "{}")["func_name"]
        pairs = [(case["input"], case["output"]) for case in cases]
        tests: str | list[tuple[str, str]] = (
            "import json\n"
            f"for _input, _expected in {pairs!r}:\n"
            "    _args = [json.loads(line) for line in _input.strip().split('\\n')]\n"
            f"    assert Solution().{func}(*_args) == json.loads(_expected), _input\n"
        )
        question = f"{row['question_content'].strip()}\n\nComplete this code:\n```python\n{starter}\n```"
    else:
        tests = [(case["input"], case["output"]) for case in cases]
        question = f"{row['question_content'].strip()}\n\nRead the input from stdin and print the answer."
    example_id = str(row.get("question_id", f"livecodebench-{index}"))
    return Example(example_id, question, "", "code", tests=tests, metadata={"platform": row.get("platform")})


HUB_DATASETS: dict[str, HubDataset] = {
    "gsm8k": HubDataset("openai/gsm8k", "test", _gsm8k, config="main"),
    "math500": HubDataset("HuggingFaceH4/MATH-500", "test", _math("problem", "answer", "unique_id")),
    "aime25": HubDataset("math-ai/aime25", "test", _math("problem", "answer", "id")),
    "aime26": HubDataset("MathArena/aime_2026", "train", _math("problem", "answer", "problem_idx")),
    "gpqa": HubDataset("Idavidrein/gpqa", "train", _gpqa, config="gpqa_diamond"),
    "medqa": HubDataset("GBaker/MedQA-USMLE-4-options", "test", _medqa),
    "mbppplus": HubDataset("evalplus/mbppplus", "test", _mbppplus),
    "livecodebench": HubDataset(  # release v6: the files are downloaded whole (several GB)
        "livecodebench/code_generation_lite",
        "train",
        _livecodebench,
        data_files=("test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl"),
    ),
}
"""Named benchmarks. ``gpqa`` is GPQA-Diamond (its only split is called train); ``medqa`` is the 4-option
USMLE set."""


def _hub_rows(name: str, spec: HubDataset, split: str | None) -> Iterable[dict]:
    hint = (
        f"dataset {name!r} ({spec.hub_id}) needs network or a local copy: pass a path to a "
        f"JSONL/CSV/Parquet file with format={name!r} (same columns as the hub) or columns=..."
    )
    try:
        import datasets
    except ImportError as e:
        raise InputError(
            f"{hint}. Downloading also needs the datasets package (pip install datasets)."
        ) from e
    try:
        split = split or spec.split
        return datasets.load_dataset(spec.hub_id, spec.config, split=split, data_files=spec.data_files)
    except Exception as e:  # the datasets library raises many types for offline, gated or missing data
        raise InputError(f"{hint}. Loading from the hub failed: {type(e).__name__}: {e}") from e


def load_dataset(
    name_or_path: str | Path,
    *,
    split: str | None = None,
    columns: dict[str, str | list[str]] | None = None,
    format: str | None = None,
    offset: int = 0,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
) -> list[Example]:
    """Load evaluation examples from a named benchmark or a local file.

    Args:
        name_or_path: a key of :data:`HUB_DATASETS`, or a ``.jsonl``/``.json``/``.csv``/``.parquet`` file.
        split: hub split; defaults to the benchmark's evaluation split. Ignored for files.
        columns: for a file, our fields mapped to its columns (see :func:`from_columns`).
        format: for a file, the name of the benchmark whose columns it has (``"gsm8k"`` reads
            ``question`` + a worked ``answer`` ending in ``#### N``).
        offset: rows to skip first (for a held-out slice of a training file).
        limit: the most rows to load after ``offset``.
        seed: seeds the option order of multiple-choice items (an integer from 0 to ``2**64 - 1``).
        shuffle: shuffle multiple-choice options (on by default: GPQA lists the correct option first).

    Raises:
        InputError: unknown name, missing file or column, unreadable rows, or a benchmark that cannot be
            downloaded (the message says how to pass a local copy instead).
    """
    check_seed(seed)
    name, path = str(name_or_path), Path(name_or_path)
    if name in HUB_DATASETS and not path.exists():
        spec = HUB_DATASETS[name]
        rows, convert = _hub_rows(name, spec, split), spec.convert
    elif path.suffix or path.exists():
        if (columns is None) == (format is None):
            raise InputError(
                f"{path}: pass exactly one of columns={{...}} or format=<{'|'.join(HUB_DATASETS)}>"
            )
        if format is not None and format not in HUB_DATASETS:
            raise InputError(f"format={format!r} is not a known benchmark; use one of {sorted(HUB_DATASETS)}")
        rows: Iterable[dict] = read_rows(path)
        convert = HUB_DATASETS[format].convert if format else from_columns(columns, path.name)
    else:
        raise InputError(
            f"{name!r} is neither a .jsonl/.json/.csv/.parquet file nor a known benchmark "
            f"({', '.join(sorted(HUB_DATASETS))})"
        )
    if offset < 0 or (limit is not None and limit < 0):
        raise InputError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
    stop = None if limit is None else offset + limit
    examples = []
    for index, row in itertools.islice(enumerate(rows), offset, stop):
        try:
            example = convert(row, index)
        except KeyError as e:
            raise InputError(f"{name}, row {index}: missing column {e}; the columns are {sorted(row)}") from e
        except (TypeError, AttributeError) as e:  # a cell of another type than the format's, e.g. a number as text
            raise InputError(f"{name}, row {index}: a cell holds a value of the wrong type ({e}); fix the "
                             "row") from None
        examples.append(shuffle_choices(example, seed) if shuffle and example.kind == "choice" else example)
    return examples
