"""Train a system's links on frozen backbones.

``train(system, examples, TrainConfig(...))`` optimises only link parameters (kept in fp32 whatever the
backbone dtype); backbones stay in eval mode and receive no gradients. Stages:

- ``"inner"``: each agent's inner link, by the cosine objective of :func:`~latentgraph.training.objectives.inner_loss`;
- ``"outer"``: the outer links, by the answer node's cross-entropy through the unrolled rounds
  (:func:`~latentgraph.training.objectives.unrolled_loss`), inner links frozen but in the graph;
- ``"joint"``: all links by that same unrolled objective.

AdamW with linear warmup and cosine decay, gradient clipping, gradient accumulation. Every step logs the
loss, the learning rate, each link's gradient norm and, for unrolled stages, the norm of the gradient
reaching each link's message in each round (public reproductions found early rounds starving). Checkpoints
are written in latentgraph's format plus the optimizer state; resuming one gives the same links as an
uninterrupted run, because the data order is a function of the seed and the step.

A batch's loss is the mean over its examples of each example's loss (a mean over its target tokens; see
:func:`~latentgraph.training.objectives.example_mean`), so ``accumulate`` micro-batches and data-parallel ranks
add up exactly to one batch. Run in each process of a torchrun job, training is data-parallel
(:mod:`latentgraph.training.distributed`): N ranks of ``batch_size`` examples make the update one process makes
with ``N * batch_size``, and only rank 0 writes.

Every ``checkpoint-N/`` folder and the final output are written crash-safely (:mod:`latentgraph.files.atomic`):
each is committed whole, so a kill or a full disk leaves a checkpoint complete or absent and the output
folder complete in its old or its new version, with every ``checkpoint-N/`` already in it.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..checkpoints import native
from ..checkpoints.native import WEIGHTS_NAME, assign, read_weights, unpickle_safely
from ..core.config import describe_errors, within
from ..core.limits import ROUNDS
from ..core.sampling import MAX_SEED
from ..core.system import System
from ..errors import CheckpointError, InputError, shown
from ..files.atomic import recover, write_directory
from ..files.text import NotJSON, parse_json, read_text
from .closed_form import initialize
from .data import TrainExample
from .distributed import Ranks, join
from .objectives import inner_loss, unrolled_loss

STATE_NAME = "trainer_state.pt"
LOG_NAME = "train_log.jsonl"


class TrainConfig(BaseModel):
    """Everything that decides a training run (also readable from a JSON file by ``latentgraph train``).

    A step trains on ``batch_size * accumulate`` examples, times the number of ranks under torchrun: the same
    examples, and the same update, as one process with ``batch_size`` times the number of ranks.

    A field of the wrong type or out of range is an :class:`~latentgraph.InputError` naming it.
    """

    model_config = ConfigDict(extra="forbid")

    stage: Literal["inner", "outer", "joint"] = "outer"
    regime: Literal["teacher", "rollout"] = "rollout"  # where unrolled training's messages come from
    steps: int = Field(100, ge=1)  # optimizer steps
    batch_size: int = Field(2, ge=1)  # examples per micro-batch, on each rank under torchrun
    accumulate: int = Field(1, ge=1)  # micro-batches per optimizer step
    lr: float = Field(1e-4, gt=0)
    warmup: int = Field(10, ge=0)  # linear warmup steps, then cosine decay to zero
    weight_decay: float = Field(0.0, ge=0)
    clip: float = Field(1.0, gt=0)  # max gradient norm
    rounds: Annotated[int | None, within(ROUNDS)] = Field(None, ge=1)  # rounds to unroll (default: the system's)
    intermediate_weight: float = Field(0.0, ge=0)  # weight of earlier rounds' answer loss
    grad_steps: int | None = Field(None, ge=1)  # rollout forwards kept in the graph (rollout regime)
    init: Literal["none", "closed_form"] = "none"  # start from latentgraph.training.closed_form's closed-form links
    save_every: int | None = Field(None, ge=1)  # checkpoint every N steps (needs an output directory)
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True)  # the data order; "3" or True is no seed

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise InputError(f"invalid TrainConfig: {describe_errors(e)}") from None


def train(system: System, examples: list[TrainExample], config: TrainConfig | None = None, *,
          output: str | Path | None = None, resume: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Train ``system``'s links in place; returns the per-step log (also written to ``output``).

    Called in each process of a torchrun job (``WORLD_SIZE`` set, or a process group already started), it trains
    data-parallel: every rank passes the same system, examples and config, takes its shard of each step's
    global batch, and the gradients are averaged over the ranks. It starts the process group if none is (NCCL
    when the system is on a GPU, gloo otherwise; load each rank's system on ``cuda:LOCAL_RANK``), which then
    serves later calls too and ends when the process exits. Only rank 0 shows progress and writes; every rank
    returns the same log, of the global batches.

    Args:
        system: the system; only its link parameters change.
        examples: training data (see :mod:`latentgraph.training.data`).
        config: the run's settings (default ``TrainConfig()``).
        output: where checkpoints (``checkpoint-<step>/``), the final system and ``train_log.jsonl`` go.
        resume: a checkpoint directory to continue from (same config and data, and as many ranks).
        progress: show a progress bar with the loss.
    """
    config = config or TrainConfig()
    output = Path(output) if output is not None else None
    if config.save_every and output is None:
        raise CheckpointError("save_every needs an output directory to write checkpoints to")
    system.validate()
    system.place_links()
    params = _trainable(system, config.stage)
    trained = {id(p) for p in params}
    for p in system.parameters():
        p.data = p.data.float()  # fp32 links: bf16 gradients would drop early rounds' small contributions
        p.requires_grad_(id(p) in trained)
    ranks = join(system.agents[system.answer].backbone.device)
    if config.init == "closed_form" and resume is None:
        initialize(system, [f"{ex.question}\n{ex.plan or ex.answer}" for ex in examples])
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    start, log = 0, []
    if resume is not None:
        resume = ranks.on_first(lambda: recover(Path(resume)))  # a save killed midway may have left it aside
        state = _trainer_state(resume)
        start = state["step"]
        if start > config.steps:
            raise InputError(f"{resume} is at step {start}, past the {config.steps} steps this training runs: "
                             "nothing to train; raise steps (--steps) to train further")
        log = _load_checkpoint(resume, state, system, optimizer, schedule)
    ranks.share(list(system.parameters()))
    bar = Progress(TextColumn("training {task.fields[stage]} links"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=Console(stderr=True),
                   disable=not (progress and ranks.first))
    with bar:
        task = bar.add_task("train", total=config.steps, completed=start, stage=config.stage, loss="-")
        for step in range(start, config.steps):
            record = _step(system, examples, config, step, optimizer, params, ranks)
            schedule.step()
            log.append(record)
            bar.update(task, advance=1, loss=f"{record['loss']:.4f}")
            if config.save_every and (step + 1) % config.save_every == 0:
                ranks.on_first(partial(_save_checkpoint, output / f"checkpoint-{step + 1}", system, optimizer,
                                       schedule, step + 1, log))
    if output is not None:  # the system and the log in one commit, beside the checkpoint-N folders there
        ranks.on_first(lambda: write_directory(output, {**_system_files(system), LOG_NAME: _log_bytes(log)}))
    for p in system.parameters():
        p.requires_grad_(True)
    return log


def _trainable(system: System, stage: str) -> list[torch.nn.Parameter]:
    graph = system.graph()  # a nested system's links too; a module under two names (a shared agent) once
    inner = list({id(p): p for agent in graph.agents.values() for p in agent.inner_link.parameters()}.values())
    outer = list({id(p): p for link in graph.links.values() for p in link.parameters()}.values())
    return {"inner": inner, "outer": outer, "joint": inner + outer}[stage]


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def batches_for(step: int, config: TrainConfig, n: int, rank: int = 0, ranks: int = 1) -> list[list[int]]:
    """The example indices of each micro-batch of optimizer step ``step`` on rank ``rank`` of ``ranks``: a
    seeded shuffle per epoch, so any step's data is known without replaying the run.

    A step's global micro-batches hold ``ranks * batch_size`` examples each, and each rank takes its slice of
    each: together, in rank order, they are exactly what one process with ``batch_size * ranks`` trains on."""
    size = config.batch_size * ranks
    per_step = size * config.accumulate
    indices = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, n)
        order = list(range(n))
        random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
        indices.append(order[offset])
    mine = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
    return [indices[start:start + size][mine] for start in range(0, per_step, size)]


def _step(system: System, examples: list[TrainExample], config: TrainConfig, step: int,
          optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], ranks: Ranks) -> dict:
    optimizer.zero_grad(set_to_none=True)
    total, output_norms = 0.0, {}  # (round, link) -> squared norm of the gradient reaching the link's output
    for micro in batches_for(step, config, len(examples), ranks.rank, ranks.size):
        batch = [examples[i] for i in micro]
        if config.stage == "inner":
            names = list(system.graph().agents)
            loss = sum(inner_loss(system, name, batch) for name in names) / len(names)
        else:
            unrolled = unrolled_loss(system, batch, regime=config.regime, rounds=config.rounds,
                                     intermediate_weight=config.intermediate_weight, grad_steps=config.grad_steps)
            loss = unrolled.loss
            for key, output in unrolled.outputs.items():
                output_norms.setdefault(key, 0.0)  # stays 0 where no gradient flows (nothing upstream trains)
                if output.requires_grad:
                    output.register_hook(lambda g, key=key: output_norms.__setitem__(
                        key, output_norms[key] + g.float().pow(2).sum().item()))
        (loss / config.accumulate).backward()
        total += loss.item() / config.accumulate
    ranks.average_gradients(params)  # the global batch's gradient from here on: the norms and the clipping see it
    link_norms = {name: _norm(module.parameters()) for name, module in system.link_modules().items()}
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip).item()
    optimizer.step()
    # A rank's loss and message gradients are its shard's: the global batch's loss is the ranks' mean, and a
    # message gradient of a shard's mean is ranks times that of the global mean, so squared norms add up / ranks².
    summed = ranks.sum([total, *output_norms.values()])
    total = summed[0] / ranks.size
    output_norms = dict(zip(output_norms, (v / ranks.size ** 2 for v in summed[1:])))
    record = {"step": step + 1, "loss": total, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
              "links": link_norms}
    if output_norms:
        rounds = sorted({r for r, _ in output_norms})
        record["rounds"] = {str(r): {link: math.sqrt(v) for (rr, link), v in output_norms.items() if rr == r}
                            for r in rounds}
    return record


def _norm(parameters) -> float:
    grads = [p.grad.float().pow(2).sum() for p in parameters if p.grad is not None]
    return math.sqrt(sum(g.item() for g in grads)) if grads else 0.0


def _save_checkpoint(directory: Path, system: System, optimizer, schedule, step: int, log: list[dict]) -> None:
    """Write ``checkpoint-N/``: the system, the optimizer and schedule state, and the log, in one commit."""
    state = io.BytesIO()
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, state)
    write_directory(directory, {**_system_files(system), STATE_NAME: state.getvalue(), LOG_NAME: _log_bytes(log)})


def _system_files(system: System) -> dict[str, bytes]:
    return native.files(system.validate().to_config(), system.link_modules())


def _log_bytes(log: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in log).encode()


RESUME_FIX = "resume from another checkpoint-N folder, or start again without --resume"


def _trainer_state(directory: Path) -> dict:
    """The optimizer, schedule and step saved in a training checkpoint."""
    path = directory / STATE_NAME
    if not path.exists():
        raise CheckpointError(f"{directory} is not a training checkpoint: it has no {STATE_NAME}")
    try:
        state = unpickle_safely(path, "a latentgraph trainer state")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {RESUME_FIX}") from None
    if not (isinstance(state, dict) and {"step", "optimizer", "schedule"} <= set(state)
            and isinstance(state["step"], int)):
        raise CheckpointError(f"{path} is not a latentgraph trainer state; {RESUME_FIX}")
    return state


def _load_checkpoint(directory: Path, state: dict, system: System, optimizer, schedule) -> list[dict]:
    """Restore the links, optimizer and schedule of a checkpoint; returns its log."""
    log = _read_log(directory / LOG_NAME, state["step"])  # first: a bad log leaves the system's links untouched
    assign(system.link_modules(), read_weights(directory / WEIGHTS_NAME), source=str(directory / WEIGHTS_NAME))
    try:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory / STATE_NAME} does not match this training's links ({e}); "
                              f"{RESUME_FIX}") from None
    return log


def _read_log(path: Path, steps: int) -> list[dict]:
    """The log of a checkpoint at step ``steps``: the records :func:`_step` wrote for steps 1 to ``steps``.

    Anything else is refused, not dropped: a checkpoint's log is committed with its weights and optimizer state
    in one step, so a line latentgraph did not write means the folder was edited or damaged. Resuming must
    neither carry that line into the new log nor silently leave a hole in the run's history; the user decides
    (another checkpoint, or the line fixed)."""
    records = []
    for number, line in enumerate(read_text(path, error=CheckpointError).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = parse_json(line)
        except NotJSON as e:
            raise CheckpointError(f"{path}, line {number}: {e}; fix the line, or {RESUME_FIX}") from None
        if problem := _record_problem(record, len(records) + 1):
            raise CheckpointError(f"{path}, line {number}: {problem}; fix the line, or {RESUME_FIX}")
        records.append(record)
    if len(records) != steps:
        raise CheckpointError(f"{path} holds {len(records)} steps, but its checkpoint is at step {steps}; "
                              f"{RESUME_FIX}")
    return records


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)  # not a bool: true is no loss


def _numbers(value: Any) -> bool:
    return isinstance(value, dict) and all(_is_number(v) for v in value.values())


LOG_FIELDS: dict[str, Callable[[Any], bool]] = {  # the keys of a log record (see _step), and what each holds
    "step": lambda value: type(value) is int,
    "loss": _is_number,
    "lr": _is_number,
    "grad_norm": _is_number,
    "links": _numbers,  # link -> gradient norm
    "rounds": lambda value: isinstance(value, dict) and all(map(_numbers, value.values())),  # round -> link -> norm
}


def _record_problem(record: Any, step: int) -> str | None:
    """What makes ``record`` other than a log record of ``step``, or None."""
    if not isinstance(record, dict):
        return f"a log record is a JSON object, not {shown(record)}"
    if missing := [key for key in ("step", "loss") if key not in record]:
        return f"a log record lacks {missing}"
    if unknown := sorted(set(record) - set(LOG_FIELDS)):
        return f"a log record has no key {', '.join(unknown)} (its keys are {', '.join(LOG_FIELDS)})"
    if wrong := [f"{key} is {shown(record[key])}" for key, valid in LOG_FIELDS.items()
                 if key in record and not valid(record[key])]:
        return f"a log record holds numbers (an integer step), but its {'; its '.join(wrong)}"
    if record["step"] != step:
        return f"the record of step {step} belongs here, not one of step {record['step']}"
    return None
