"""Evaluate a system on a dataset, with its baselines side by side, and resume an interrupted run.

:func:`evaluate` answers every question with each method (``"single"``: the answer node alone; ``"text"``:
the graph with text edges; ``"latent"``: the graph as built) at each round count, scores the answers
strictly (:mod:`latentgraph.evaluation.strict`; code runs in a :class:`~latentgraph.tools.Sandbox`), and reports per
(method, rounds) the accuracy with a Wilson 95% interval, generated tokens and wall time
(:mod:`latentgraph.evaluation.report`).

With ``output=DIR`` every finished batch is appended to ``DIR/results.jsonl`` at once, so a killed run loses
at most the batch in flight; run the same call again and it skips the rows already there (a line a kill cut
short is dropped). At the end it writes ``DIR/summary.json`` and, when matplotlib is installed,
``DIR/plot.png``. ``settings.json``, ``summary.json`` and ``plot.png`` are each replaced in one atomic step
(:mod:`latentgraph.files.atomic`): a kill or a full disk leaves the old or the new file, never a torn one.

With ``workers=N`` the batches are answered by N replicas of the system on Ray
(:mod:`latentgraph.evaluation.workers`); this process still writes every row, so the results file, its resume
and its summary are the same either way.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from ..core.events import RUN_MODES
from ..core.limits import ROUNDS
from ..core.sampling import MAX_SEED, Sampling, check_seed
from ..errors import GraphError, InputError, SandboxUnavailable, shown
from ..files.atomic import atomic_write_text
from ..files.text import NotJSON, parse_json, read_json
from ..tools.sandbox import PROTECTIONS, Limits, Sandbox
from . import strict
from .answering import Batch, answer_batch, row_key, row_problem
from .datasets import Example, load_dataset
from .report import EvalReport, plot, summarize

if TYPE_CHECKING:
    from ..core.system import System
    from .workers import RayWorkers

RESULTS, SETTINGS, SUMMARY, PLOT = "results.jsonl", "settings.json", "summary.json", "plot.png"


def evaluate(system: System, dataset: str | Path | Sequence[Example], *, methods: Sequence[str] = ("latent",),
             rounds: int | Sequence[int] | None = None, output: str | Path | None = None, batch_size: int = 8,
             max_new_tokens: int = 256, samples: int = 1, do_sample: bool | None = None,
             temperature: float = 0.6, top_p: float = 0.95, seed: int = 0, upstream: bool = False,
             code_runner: strict.CodeRunner | None = None, code_timeout: float = 10.0,
             progress: bool = True, workers: int | None = None, ray_address: str | None = None,
             gpus_per_worker: float = 0, threads_per_worker: int = 1) -> EvalReport:
    """Answer every question with every method and score the answers strictly.

    Args:
        system: the system to evaluate.
        dataset: examples from :func:`~latentgraph.evaluation.datasets.load_dataset`, or a name it accepts (local files
            need ``format=`` or ``columns=``: load those first).
        methods: any of ``"single"`` (the answer node alone), ``"text"`` (every edge a text edge) and
            ``"latent"`` (the graph as built), run on the same questions.
        rounds: the round counts to run, each separately (the answer node only answers in the last round);
            default ``system.rounds``. ``"single"`` runs once whatever they are.
        output: a directory for ``results.jsonl``, ``settings.json``, ``summary.json`` and ``plot.png``; a
            run into a directory that holds results resumes from them.
        batch_size: questions per :meth:`~latentgraph.System.run` call; a row's ``seconds`` is its batch's
            wall time divided evenly among the batch.
        max_new_tokens: bound on each answer and each text message.
        samples: answers per question; ``k > 1`` samples ``k`` times (seeds ``seed``, ``seed + 1``, ...) and
            reports pass@k.
        do_sample: sample (at ``temperature`` and ``top_p``) instead of decoding greedily; default: greedy
            for one sample, sampling for several.
        temperature, top_p: the sampling settings (the published ones by default); unused when greedy.
        seed: seeds the sampling (sample ``k`` with ``seed + k``, at most ``2**64 - 1``); unused when greedy.
        upstream: also report the published lenient accuracy, in its own field (never mixed with strict).
        code_runner: runs code answers, ``run(program, timeout) -> (passed, output)``; default a
            :class:`SandboxRunner` with every protection required.
        code_timeout: seconds each code answer's tests may run.
        progress: show progress bars on stderr (rows done, across workers).
        workers: answer on this many Ray workers, each a replica of the system (a Ray actor; ``workers=1`` is
            one actor too), instead of in this process (None). The replicas load their backbones from the
            sources in the system's config (folders every Ray node sees, or hub ids) and get the link weights
            from this process, which writes every row; a dead worker is restarted and its batches answered
            again, each row written once. Greedy rows equal an in-process run's on the same kind of device, but
            ``results.jsonl`` holds them in the order batches finish. A run resumes with or without workers,
            whichever started it.
        ray_address: the Ray cluster for the workers: ``"host:port"`` of its head's GCS (what ``ray start
            --head`` prints) or ``"auto"`` (the one this machine is part of); default a Ray instance already
            initialised in this process, else a new local one. Checked before Ray connects: a malformed address,
            or one where no Ray cluster answers within seconds, is an :class:`InputError`.
        gpus_per_worker: GPUs each worker asks Ray for, its backbones placed on its GPU (fractions share one;
            above 1, each backbone is spread over the worker's GPUs); 0 runs them on CPUs.
        threads_per_worker: CPU threads of each worker, and the CPUs it asks Ray for.

    Returns:
        An :class:`EvalReport` over exactly the requested questions, methods, round counts and samples.

    Raises:
        InputError: an unknown method, bad rounds or sizes, duplicate example ids, or an ``output`` directory
            whose results were made by another system, other settings or other questions. With workers: Ray
            not installed, bad worker options, a Ray address that is malformed or where no cluster answers, more
            CPUs or GPUs than the cluster has, or a backbone given as a model in memory (workers load backbones
            from their source).
        WorkerError: a Ray worker died and cannot be restarted; the finished rows are kept.
        CheckpointError: ``settings.json``, ``summary.json`` or ``plot.png`` cannot be written (a full disk,
            a read-only folder); the file keeps its old version.
        SandboxUnavailable: code questions, the default :class:`SandboxRunner`, and a sandbox that lacks a
            required protection: nothing is generated (opt in with ``code_runner=SandboxRunner(require=())``).
    """
    examples = load_dataset(dataset) if isinstance(dataset, (str, Path)) else list(dataset)
    configs = _configs(system, methods, rounds)
    if not examples:
        raise InputError("evaluate() got no examples; check the dataset, offset and limit")
    if batch_size < 1 or samples < 1 or max_new_tokens < 1:
        raise InputError(f"batch_size, samples and max_new_tokens must be >= 1, got {batch_size}, {samples}, "
                         f"{max_new_tokens}")
    duplicates = sorted(i for i, count in Counter(e.id for e in examples).items() if count > 1)
    if duplicates:
        raise InputError(f"example ids must be unique (results are keyed by id); repeated: {duplicates[:5]}")
    sampling = samples > 1 if do_sample is None else do_sample
    if samples > 1 and not sampling:
        raise InputError(f"samples={samples} with greedy decoding would give the same answer {samples} times; "
                         "sample (do_sample=True, or --sample) or take one sample")
    Sampling(do_sample=sampling, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)  # checks
    check_seed(seed)
    if sampling and seed + samples - 1 > MAX_SEED:
        raise InputError(f"sample k is seeded with seed + k, and seed {seed} + {samples - 1} is above 2**64 - 1; "
                         "pass a smaller seed")
    if code_runner is None and any(e.kind == "code" for e in examples):
        code_runner = SandboxRunner()
    if isinstance(code_runner, SandboxRunner) and any(e.kind == "code" for e in examples):
        code_runner.check()  # fail closed before any answer is generated, not at the first code answer
    pool = _ray_workers(system, workers, ray_address, gpus_per_worker, threads_per_worker, code_runner,
                        code_timeout)
    settings = {"system": fingerprint(system), "max_new_tokens": max_new_tokens, "samples": samples,
                **({"temperature": temperature, "top_p": top_p, "seed": seed} if sampling else {})}
    directory = Path(output) if output is not None else None
    rows = _resume(directory, settings, examples) if directory else {}
    batches = [Batch(chunk, method, r, sample, {"do_sample": sampling, "temperature": temperature, "top_p": top_p,
                                                "seed": seed + sample if sampling else None,
                                                "max_new_tokens": max_new_tokens})
               for method, r in configs for sample in range(samples)
               for chunk in _chunks([e for e in examples if (e.id, method, r, sample) not in rows], batch_size)]
    pool = pool if batches else None  # a resumed run with nothing left starts no Ray workers
    bars = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not progress)
    with pool or nullcontext(), bars:  # the workers start (or their errors show) before the bars
        answered = (((batch, answer_batch(system, batch, code_runner, code_timeout)) for batch in batches)
                    if pool is None else pool.answer(batches))
        tasks = {(method, r): bars.add_task(method if r is None else f"{method} r={r}",
                                            total=len(examples) * samples,
                                            completed=sum((e.id, method, r, s) in rows
                                                          for s in range(samples) for e in examples))
                 for method, r in configs}
        for batch, new in answered:
            new = [row for row in new if row_key(row) not in rows]  # a batch answered twice is written once
            if directory and new:  # one write per batch: a kill loses at most the batches in flight
                with (directory / RESULTS).open("a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in new))
            rows.update({row_key(row): row for row in new})
            bars.advance(tasks[batch.method, batch.rounds], len(new))
    wanted = [rows[(e.id, m, r, s)] for m, r in configs for s in range(samples) for e in examples]
    report = EvalReport([summarize(wanted, m, r, samples, upstream) for m, r in configs], wanted, samples,
                        upstream)
    if directory:
        summary = {"settings": settings, **report.to_dict()}
        atomic_write_text(directory / SUMMARY, json.dumps(summary, indent=2) + "\n")
        plot(report.scores, directory / PLOT)
    return report


def _configs(system: System, methods: Sequence[str], rounds: int | Sequence[int] | None) -> list[tuple]:
    """The (method, rounds) pairs to run, in the order given; ``"single"`` has rounds None."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in RUN_MODES]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise InputError(f"methods must be distinct names among {RUN_MODES}, got {methods}")
    counts = [system.rounds] if rounds is None else [rounds] if isinstance(rounds, int) else list(rounds)
    if not counts or not all(isinstance(r, int) and r >= 1 for r in counts):
        raise InputError(f"rounds must be integers >= 1, got {rounds!r}")
    if problem := ROUNDS.problem(max(counts)):
        raise InputError(f"rounds: {problem}")
    counts = sorted(set(counts))
    return [pair for m in methods for pair in ([(m, None)] if m == "single" else [(m, r) for r in counts])]


def _ray_workers(system: System, workers: int | None, address: str | None, gpus: float, threads: int,
                 code_runner: strict.CodeRunner | None, code_timeout: float) -> RayWorkers | None:
    """The Ray workers to answer on (None: this process), checked before anything is written or run."""
    if workers is None:
        if address is not None or gpus != 0 or threads != 1:
            raise InputError("ray_address, gpus_per_worker and threads_per_worker set up Ray workers: pass "
                             "workers=N (--workers N) too, or leave them out to evaluate in this process")
        return None
    from .workers import RayWorkers, WorkerOptions

    return RayWorkers(system, WorkerOptions(workers, address, gpus, threads), code_runner, code_timeout)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def fingerprint(system: System) -> str:
    """A digest of what decides a system's answers: its config (:meth:`~latentgraph.System.to_config`: agents
    with backbone source, prompts and latent steps; edges with their link configs; answer node) and its link
    weights, each with its dtype, and the dtype each backbone computes in (a bf16 link or backbone answers
    otherwise than an fp32 one). Backbone weights are identified by their source only. The latentgraph version
    and the default rounds are left out (evaluation records the rounds of every row)."""
    from ..checkpoints.native import link_state_dict

    try:
        described: Any = system.to_config().model_dump(mode="json", exclude={"latentgraph_version", "rounds"})
    except GraphError:  # a plain nn.Module link has no config: the module tree and the prompts stand in for it
        described = [nn.Module.__repr__(system), repr(system),
                     [[a.prompt, a.feedback_prompt, a.system_prompt, a.backbone.revision]
                      for a in system.graph().agents.values()]]
    dtypes = {name: str(agent.backbone.dtype) for name, agent in system.graph().agents.items()}  # nested ones too
    digest = hashlib.sha256(json.dumps([described, dtypes], sort_keys=True).encode())
    for name, tensor in sorted(link_state_dict(system.link_modules()).items()):
        digest.update(f"{name}:{tensor.dtype}".encode() + tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _resume(directory: Path, settings: dict, examples: list[Example]) -> dict[tuple, dict]:
    """The rows already in ``directory``, after checking they were made the same way; starts a new run there
    when it holds none."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"--output {directory} is a file; pass a directory (new, or one from an earlier run to "
                         "resume it)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output directory {directory}: {e.strerror or e}") from None
    path, settings_path = directory / RESULTS, directory / SETTINGS
    has_results = path.exists() and path.stat().st_size > 0
    if has_results and not settings_path.exists():
        raise InputError(f"{directory} holds results but no {SETTINGS}, so nothing shows how they were made; "
                         "pass another output directory (or delete its results to start over)")
    if settings_path.exists():
        before = read_json(settings_path)
        if not isinstance(before, dict):
            raise InputError(f"{settings_path} is not a settings object; delete the directory's results and "
                             f"{SETTINGS} to start over, or pass another output directory")
        changed = [f"{k}={shown(before.get(k))} (now {shown(settings.get(k))})" for k in sorted({*before, *settings})
                   if before.get(k) != settings.get(k)]
        if changed and has_results:
            raise InputError(f"{directory} holds results made with other settings: {', '.join(changed)}; "
                             "rerun with the same system and settings to resume, or pass another output "
                             "directory")
    atomic_write_text(settings_path, json.dumps(settings, indent=2) + "\n")
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):  # a line cut short by a kill: drop it so the next append starts a fresh line
        with path.open("r+b") as f:
            f.truncate(complete)
    rows, prompts = {}, {e.id: e.prompt for e in examples}
    fix = "delete the line to recompute it, or pass another output directory"
    # Lines end at b"\n" only: a model's text may hold U+2028 or other characters str.splitlines() breaks at.
    for number, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        try:
            row = parse_json(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"{path}, line {number}: not UTF-8 text (byte {line[e.start:e.start + 1]!r}); "
                             f"{fix}") from None
        except NotJSON as e:
            raise InputError(f"{path}, line {number}: {e}; {fix}") from None
        if problem := row_problem(row):
            raise InputError(f"{path}, line {number}: {problem}; {fix}")
        if row["id"] in prompts and row["question"] != prompts[row["id"]]:
            raise InputError(f"{path}, line {number}: id {row['id']!r} holds another question than the "
                             "dataset's, so the results come from another dataset: pass another output "
                             "directory")
        rows[row_key(row)] = row
    return rows


class SandboxRunner:
    """Runs programs for :func:`~latentgraph.evaluation.strict.score_code` in a :class:`~latentgraph.tools.Sandbox`.

    Args:
        limits: resource limits; the wall time of each run is the ``timeout`` it is called with.
        require: sandbox protections without which no program runs (default: all of
            :data:`~latentgraph.tools.PROTECTIONS`); ``require=()`` opts in to run with whatever this machine
            provides.

    Raises:
        InputError: an unknown protection in ``require``.
    """

    def __init__(self, limits: Limits | None = None, *, require: Iterable[str] = PROTECTIONS):
        self.limits = limits or Limits()
        self.require = tuple(require)
        self._sandboxes: dict[float, Sandbox] = {}
        self._sandbox(self.limits.wall_seconds)  # checks require= and warns now, not at the first answer

    def _sandbox(self, timeout: float) -> Sandbox:
        if timeout not in self._sandboxes:
            self._sandboxes[timeout] = Sandbox(replace(self.limits, wall_seconds=timeout,
                                                       cpu_seconds=max(1, math.ceil(timeout))),
                                               require=self.require)
        return self._sandboxes[timeout]

    def check(self) -> None:
        """Raises :class:`~latentgraph.errors.SandboxUnavailable` when no program would run."""
        if self._sandbox(self.limits.wall_seconds).unavailable:
            raise SandboxUnavailable(self._sandbox(self.limits.wall_seconds).unavailable)

    def __call__(self, program: str, timeout: float) -> tuple[bool, str]:
        """Runs ``program`` with ``timeout`` seconds of wall time: ``(passed, output)``.

        Raises:
            SandboxUnavailable: the sandbox lacks a required protection; nothing ran.
        """
        result = self._sandbox(timeout).run([sys.executable, "-I", "-B", "-"], stdin=program.encode())
        return result.returncode == 0 and result.limit is None, result.output
