"""Training data for links: a question, the answer node's target text, and per-role targets.

A JSONL row holds ``question`` and ``answer``, optionally ``plan`` (the default target of every agent that is
not the answer node) and ``targets`` (``{agent: text}``, overriding ``plan`` for that agent). The GSM8K
adapter reads the training split's format: the worked solution becomes the plan and the final number the
answer, written as ``answer_template`` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, shown
from ..evaluation.strict import parse_gsm8k_answer
from ..files.text import parse_json, read_text

ANSWER_TEMPLATE = "The answer is {answer}."


@dataclass(frozen=True)
class TrainExample:
    """One training item: the task, the answer node's target, and what the other agents are taught."""

    question: str
    answer: str  # the answer node's target text
    plan: str | None = None  # default target of the other agents
    targets: dict[str, str] = field(default_factory=dict)  # per-agent targets, overriding plan

    def __post_init__(self) -> None:
        texts = {"question": self.question, "answer": self.answer, "plan": "" if self.plan is None else self.plan}
        targets = self.targets if isinstance(self.targets, dict) else {}
        texts.update({f"targets[{agent!r}]": text for agent, text in targets.items()})
        wrong = [f"{name} is {shown(text)}" for name, text in texts.items() if not isinstance(text, str)]
        wrong += [] if isinstance(self.targets, dict) else [f"targets is {shown(self.targets)}, not {{agent: text}}"]
        if wrong:
            raise InputError(f"a training example holds text, but its {'; its '.join(wrong)}")

    def target_for(self, agent: str) -> str:
        return self.targets.get(agent) or self.plan or self.answer


def clean_gsm8k_solution(solution: str) -> str:
    """A GSM8K worked solution as plain text: calculator annotations and the ``#### N`` line removed."""
    lines = []
    for line in solution.splitlines():
        if line.strip().startswith("####"):
            continue
        while "<<" in line and ">>" in line[line.index("<<"):]:  # "48/2 = <<48/2=24>>24" -> "48/2 = 24"
            start = line.index("<<")
            line = line[:start] + line[line.index(">>", start) + 2:]
        lines.append(line)
    return "\n".join(lines).strip()


def load_training_data(path: str | Path, *, format: str | None = None, offset: int = 0, limit: int | None = None,
                       answer_template: str = ANSWER_TEMPLATE) -> list[TrainExample]:
    """Read training examples from a JSONL file.

    Args:
        path: the file.
        format: ``None`` for our rows (``question``, ``answer``, optional ``plan`` and ``targets``), or
            ``"gsm8k"`` for GSM8K rows (``question`` and a worked ``answer`` ending in ``#### N``).
        offset: rows to skip first; limit: the most rows to read after them.
        answer_template: how a GSM8K final number becomes the answer node's target.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"training data {path} does not exist")
    if format not in (None, "gsm8k"):
        raise InputError(f"format must be None or 'gsm8k', got {format!r}")
    examples = []
    lines = read_text(path).splitlines()[offset: None if limit is None else offset + limit]
    for number, line in enumerate(lines, start=offset + 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
            if format == "gsm8k":
                final = parse_gsm8k_answer(row["answer"])
                if final is None:
                    raise KeyError("a '#### <number>' line in answer")
                examples.append(TrainExample(row["question"], answer_template.format(answer=final),
                                             plan=clean_gsm8k_solution(row["answer"])))
            else:
                examples.append(TrainExample(row["question"], row["answer"], row.get("plan"),
                                             row.get("targets") or {}))
        except (KeyError, TypeError, ValueError) as e:  # NotJSON and InputError are ValueErrors
            raise InputError(f"{path}, line {number}: cannot read a training example ({type(e).__name__}: {e}); "
                             "rows need 'question' and 'answer'") from None
    if not examples:
        raise InputError(f"{path} holds no training examples in rows {offset}..{offset + (limit or 0)}")
    return examples
