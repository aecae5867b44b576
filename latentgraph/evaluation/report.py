"""What an evaluation reports: per (method, rounds) accuracy with a Wilson 95% interval, tokens, time, and
pass@k; as a rich table, a JSON summary and a plot."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from ..files.atomic import atomic_write_bytes
from .strict import pass_at_k

Z95 = 1.959964  # two-sided 95% normal quantile


@dataclass
class MethodScore:
    """The scores of one (method, rounds) pair.

    Attributes:
        method: ``"single"``, ``"text"`` or ``"latent"``.
        rounds: the round count, or None for ``"single"`` (the answer node answers once).
        n: questions scored.
        accuracy: strict accuracy, the mean over questions and samples (pass@1).
        ci95: Wilson 95% interval of ``accuracy`` over the ``n`` questions.
        tokens: mean tokens generated per answer, by every agent in every round.
        seconds: wall time of all its runs.
        pass_at_k: with ``samples = k > 1``, the mean unbiased pass@k over questions; else None.
        upstream_accuracy: the published lenient accuracy (math and multiple choice only), when asked for.
    """

    method: str
    rounds: int | None
    n: int
    accuracy: float
    ci95: tuple[float, float]
    tokens: float
    seconds: float
    pass_at_k: float | None = None
    upstream_accuracy: float | None = None


@dataclass
class EvalReport:
    """What :func:`~latentgraph.evaluate` returns.

    Attributes:
        scores: one :class:`MethodScore` per (method, rounds), in the order they ran.
        rows: the result rows behind them, one per (question, method, rounds, sample); the keys are those of
            ``results.jsonl``.
        samples: answers per question.
        upstream: whether the upstream-lenient accuracy was asked for (the table shows it only then).
    """

    scores: list[MethodScore]
    rows: list[dict[str, Any]] = field(repr=False)
    samples: int = 1
    upstream: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The ``summary.json`` content."""
        return {"samples": self.samples, "scores": [asdict(s) for s in self.scores]}

    def table(self) -> Table:
        """The scores as a rich table."""
        table = Table(title="strict accuracy with Wilson 95% interval; tokens per answer; total wall time")
        columns = ["method", "rounds", "n", "accuracy", "95% interval"]
        columns += [f"pass@{self.samples}"] if self.samples > 1 else []
        columns += ["upstream-lenient"] if self.upstream else []
        for column in [*columns, "tokens", "seconds"]:
            table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
        for s in self.scores:
            cells = [s.method, "-" if s.rounds is None else str(s.rounds), str(s.n), f"{s.accuracy:.1%}",
                     f"{s.ci95[0]:.1%} - {s.ci95[1]:.1%}"]
            cells += [f"{s.pass_at_k:.1%}"] if self.samples > 1 else []
            cells += [_percent(s.upstream_accuracy)] if self.upstream else []
            table.add_row(*cells, f"{s.tokens:.1f}", f"{s.seconds:.1f}")
        return table


def wilson(successes: float, n: int) -> tuple[float, float]:
    """Wilson score 95% interval for a proportion; ``successes`` may be fractional (a mean over samples)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, Z95 ** 2
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half), min(1.0, center + half)


def summarize(rows: list[dict], method: str, rounds: int | None, samples: int, upstream: bool) -> MethodScore:
    """The :class:`MethodScore` of one (method, rounds) pair from its result rows."""
    mine = [row for row in rows if row["method"] == method and row["rounds"] == rounds]
    by_question: dict[str, list[bool]] = {}
    for row in mine:
        by_question.setdefault(row["id"], []).append(row["correct"])
    n = len(by_question)
    accuracy = sum(row["correct"] for row in mine) / len(mine)
    lenient = [row["upstream_correct"] for row in mine if row["upstream_correct"] is not None]
    return MethodScore(
        method, rounds, n, accuracy, wilson(accuracy * n, n),
        tokens=sum(row["tokens"] for row in mine) / len(mine), seconds=sum(row["seconds"] for row in mine),
        pass_at_k=(sum(pass_at_k(samples, sum(c), samples) for c in by_question.values()) / n
                   if samples > 1 else None),
        upstream_accuracy=sum(lenient) / len(lenient) if upstream and lenient else None)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def plot(scores: list[MethodScore], path: str | Path) -> Path | None:
    """Draw accuracy (with its interval), tokens per answer and wall time against rounds, one line per method.

    ``"single"`` is a dashed horizontal line. The image format follows the file's extension (png when
    matplotlib does not know it); the file is replaced in one atomic step. Returns the path, or None (with
    a warning) when matplotlib is missing: ``pip install "latentgraph[eval]"``.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn('the plot needs matplotlib: pip install "latentgraph[eval]"', RuntimeWarning,
                      stacklevel=2)
        return None
    figure = Figure(figsize=(11, 3.4), layout="constrained")
    panels = figure.subplots(1, 3)
    titles = ("strict accuracy (95% interval)", "tokens generated per answer", "wall seconds (all questions)")
    for axes, title in zip(panels, titles):
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("rounds")
        axes.grid(alpha=0.3)
    methods = list(dict.fromkeys(s.method for s in scores))
    for i, method in enumerate(methods):
        mine, color = [s for s in scores if s.method == method], f"C{i}"
        if mine[0].rounds is None:
            s = mine[0]
            for axes, value in zip(panels, (s.accuracy, s.tokens, s.seconds)):
                axes.axhline(value, color=color, linestyle="--", label=method)
            panels[0].axhspan(*s.ci95, color=color, alpha=0.1)
            continue
        x = [s.rounds for s in mine]
        dodge = 0.06 * (i - (len(methods) - 1) / 2)  # equal accuracies would hide each other's intervals
        below, above = [s.accuracy - s.ci95[0] for s in mine], [s.ci95[1] - s.accuracy for s in mine]
        panels[0].errorbar([r + dodge for r in x], [s.accuracy for s in mine], yerr=[below, above],
                           color=color, marker="o", capsize=3, label=method)
        panels[1].plot(x, [s.tokens for s in mine], color=color, marker="o", label=method)
        panels[2].plot(x, [s.seconds for s in mine], color=color, marker="o", label=method)
    ticks = sorted({s.rounds for s in scores if s.rounds is not None})
    for axes in panels if ticks else ():
        axes.set_xticks(ticks)
    panels[0].set_ylim(-0.02, 1.02)
    panels[0].legend(fontsize=9)
    image = io.BytesIO()
    extension = Path(path).suffix.lstrip(".").lower()
    figure.savefig(image, dpi=120, format=extension if extension in figure.canvas.get_supported_filetypes()
                   else "png")
    atomic_write_bytes(path, image.getvalue())
    return Path(path)
