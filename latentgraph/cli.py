"""The ``latentgraph`` command line: run a system, serve it, render it, list and convert the styles."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cli_system import (
    DEFAULT,
    DEVICE_MAP_HELP,
    LINK_DTYPE_HELP,
    MAX_MEMORY_HELP,
    OFFLOAD_HELP,
    UNSANDBOXED_HELP,
    console,
    load,
    placement,
)
from .core.limits import LATENT_STEPS, ROUNDS, Limit
from .errors import InputError, LatentGraphError
from .files.text import NotJSON, parse_json, read_json
from .serve.command import serve

app = typer.Typer(help="Multi-agent LLM systems that talk in latent space.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _commands() -> None:
    """Multi-agent LLM systems that talk in latent space."""


def check_size(flag: str, value: int | None, limit: Limit) -> None:
    """Refuse an absurd size before the system loads (a large style takes minutes to load)."""
    if value is not None and (problem := limit.problem(value)):
        raise InputError(f"{flag}: {problem}")


@app.command()
def run(
    question: str = typer.Argument(..., help="The question to answer."),
    style: str = typer.Option(DEFAULT, help="'default' (real small models, offline), a style (see `latentgraph "
                                            "styles`), or a directory written by save_pretrained."),
    rounds: int | None = typer.Option(None, help="Rounds to unroll (default: the system's)."),
    latent_steps: int | None = typer.Option(None, help="Latent steps of every agent (default: each agent's)."),
    mode: str = typer.Option("latent", help="latent (the graph as built), text (every edge carries text) or "
                                            "single (the answer node alone)."),
    max_new_tokens: int = typer.Option(256, help="Most tokens the answer (and each text message) may have."),
    greedy: bool = typer.Option(False, "--greedy/--sample", help="Greedy decoding, or sampling at the "
                                                                 "published temperature 0.6, top-p 0.95."),
    temperature: float = typer.Option(0.6, help="Sampling temperature (the published 0.6)."),
    top_p: float = typer.Option(0.95, help="Sampling top-p (the published 0.95)."),
    seed: int | None = typer.Option(None, help="Seed for sampling."),
    task: str = typer.Option("math", help="For styles: math or code links and answer format."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1, ... (default: cuda if available)."),
    device_map: str | None = typer.Option(None, help=DEVICE_MAP_HELP),
    max_memory: str | None = typer.Option(None, help=MAX_MEMORY_HELP),
    offload_folder: Path | None = typer.Option(None, help=OFFLOAD_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (see the docs' CLI page)."),
    link_dtype: str = typer.Option("float32", help=LINK_DTYPE_HELP),
    allow_unsandboxed_tools: bool = typer.Option(False, "--allow-unsandboxed-tools", help=UNSANDBOXED_HELP),
    stop_tol: float | None = typer.Option(None, help="Stop early once the answer agent's mean thought changes by "
                                                     "less than this (relative) between rounds, e.g. 0.05."),
) -> None:
    """Answer a question with a system, and show what each agent did in each round, live."""
    from .core.events import AgentFinished, AgentStarted
    from .core.stopping import ThoughtsConverged

    check_size("--rounds", rounds, ROUNDS)
    check_size("--latent-steps", latent_steps, LATENT_STEPS)
    with console.status(f"loading {style} (the first run converts and caches the models)"):
        system = load(style, task=task, **placement(device, device_map, max_memory, offload_folder),
                      link_dtype=link_dtype, allow_unsandboxed_tools=allow_unsandboxed_tools)
        for agent in system.graph().agents.values():  # a nested system's too
            agent.backbone.load()  # now, under the spinner, not during the first round
            if latent_steps is not None:
                agent.latent_steps = latent_steps
    stop = ThoughtsConverged(tol=stop_tol) if stop_tol is not None else None
    with console.status(f"running {mode} mode") as status:
        for event in system.stream([question], rounds=rounds, mode=mode, do_sample=not greedy,
                                   temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                   seed=seed, stop=stop):
            if isinstance(event, AgentStarted):
                status.update(f"round {event.round} · {event.agent} is working")
            elif isinstance(event, AgentFinished):
                console.print(step_line(event.step), highlight=False, soft_wrap=True)
        out = event.output
    if out.stopped_early:
        console.print(f"stopped early after round {out.rounds_run}: the answer agent's thoughts settled",
                      highlight=False)
    if as_json:
        print(json.dumps(run_record(question, style, out), ensure_ascii=False))
        return
    print(out.texts[0])
    console.print(trace_table(out))


def step_line(s: Any) -> str:
    """One agent's step as a live line, e.g. ``round 1 · planner thought 8 latents (norm 12.3) · 0.41 s``."""
    did = []
    if s.latent_shape:
        did.append(f"thought {s.latent_shape[1]} latents (norm {s.latent_norm:.1f})")
    if s.tokens_out is not None:
        did.append(f"spoke {sum(s.tokens_out)} tokens")
    calls = sum(map(len, s.tool_calls or []))
    if calls:
        did.append(f"{calls} tool call{'s' * (calls != 1)}")
    return f"round {s.round} · {s.agent} {' and '.join(did) or 'ran'} · {s.seconds:.2f} s"


def run_record(question: str, style: str, out: Any) -> dict:
    """The ``--json`` object: stable keys, documented in docs/cli.md."""
    return {
        "question": question,
        "answer": out.texts[0],
        "style": style,
        "mode": out.mode,
        "rounds": [{"round": r, "agents": {name: step_record(s) for name, s in steps.items()}}
                   for r, steps in enumerate(out.trace, start=1)],
        "seconds": round(out.seconds, 4),
        "tokens_out": out.tokens_out,
    }


def step_record(s: Any) -> dict:
    record = {"prompt": s.prompt, "seconds": round(s.seconds, 4), "tokens_in": s.tokens_in[0],
              "latents_in": s.latents_in, "cache_in": s.cache_in,
              "latent_steps": s.latent_shape[1] if s.latent_shape else 0,
              "tokens_out": s.tokens_out[0] if s.tokens_out else 0}
    if s.tool_calls is not None:
        record["tool_calls"] = [{"tool": c.tool, "input": c.input, "output": c.output,
                                 "seconds": round(c.seconds, 4)} for c in s.tool_calls[0]]
    return record


def _total(counts: list[int | None]) -> int:
    """A per-question count summed over the questions the agent ran for (routing may skip some: None)."""
    return sum(count for count in counts if count is not None)


def trace_table(out: Any) -> Table:
    table = Table(title=f"{out.mode} mode: {out.seconds:.1f} s, {out.tokens_out} tokens generated")
    cached = any(s.cache_in for steps in out.trace for s in steps.values())  # a column only where KV edges ran
    columns = ("round", "agent", "did", "tokens in", "latents in", *(("cache in",) if cached else ()), "tokens out",
               "seconds")
    for column in columns:
        table.add_column(column, justify="left" if column in ("agent", "did") else "right", no_wrap=True)
    for r, steps in enumerate(out.trace, start=1):
        for name, s in steps.items():
            calls = sum(map(len, s.tool_calls or []))
            did = " + ".join(filter(None, [f"thought {s.latent_shape[1]}" if s.latent_shape else "",
                                           "spoke" if s.tokens_out else "",
                                           f"{calls} tool call{'s' * (calls != 1)}" if calls else ""]))
            table.add_row(str(r), name, did, str(_total(s.tokens_in)), str(s.latents_in),
                          *((str(s.cache_in),) if cached else ()),
                          str(_total(s.tokens_out)) if s.tokens_out else "-", f"{s.seconds:.2f}")
    return table


@app.command()
def render(
    style: str = typer.Argument(..., help="'default', a style (see `latentgraph styles`), or a saved directory."),
    output: Path = typer.Option(..., "-o", "--output", help="File to write: .svg, .png, .pdf or .dot."),
    task: str = typer.Option("math", help="For styles: math or code."),
) -> None:
    """Draw a system: agents with backbone, hidden size and latent steps; links with type and size."""
    from .core.render import render as draw

    system = load(style, task=task, weights=False)
    draw(system, path=output)
    console.print(f"wrote {output}")


@app.command()
def styles() -> None:
    """List the styles, one line each: the published ones, then the training-free ones."""
    from .checkpoints.published import list_styles, style_module

    for name in list_styles():
        print(f"{name:<18} {style_module(name).__doc__.strip().splitlines()[0]}")


@app.command()
def convert(
    style: str = typer.Argument(..., help="A style (see `latentgraph styles`)."),
    out_dir: Path = typer.Argument(..., help="Where to write the system in latentgraph's format."),
    task: str = typer.Option("math", help="Which inner links to take: math or code."),
    revision: str | None = typer.Option(None, help="Hub revision of the style's repos."),
) -> None:
    """Write a style in latentgraph's format: safetensors links, backbones referenced by hub id or folder.

    For a published style only configs and link files are read (backbone weights are not downloaded), and the
    links are written in the dtype the published files hold (bf16), value for value. A training-free style
    (latent_mas) is built on its embedded backbone and written with its fitted links.
    """
    from .checkpoints.published import load_style

    system = load_style(style, task=task, revision=revision, link_dtype="auto")
    system.save_pretrained(out_dir)
    console.print(f"wrote {style} ({task}) to {out_dir}: {len(system.agents)} agents, {len(system.edges)} edges, "
                  f"{system.num_parameters():,} link parameters")


@app.command("eval")
def eval_command(
    dataset: str = typer.Option(..., help="A benchmark name (needs network), or a .jsonl/.json/.csv/.parquet "
                                          "file."),
    output: Path = typer.Option(..., help="Directory for results.jsonl, summary.json and plot.png; a rerun "
                                          "into it resumes."),
    style: str = typer.Option(DEFAULT, help="'default', a style (see `latentgraph styles`), or a saved directory."),
    compare: str = typer.Option("latent", help="Comma list of methods: single, text, latent."),
    rounds: str | None = typer.Option(None, help="Comma list of round counts, each run separately (default: "
                                                 "the system's)."),
    limit: int | None = typer.Option(None, help="Most questions to evaluate."),
    offset: int = typer.Option(0, help="Rows to skip first (e.g. 7000 for a held-out slice of GSM8K train)."),
    fmt: str | None = typer.Option(None, "--format", help="For a file: the benchmark whose columns it has "
                                                        "(gsm8k, math500, gpqa, ...)."),
    columns: str | None = typer.Option(None, help='For a file: JSON mapping of fields to columns, e.g. '
                                                  '\'{"question": "q", "gold": "a"}\'.'),
    split: str | None = typer.Option(None, help="Split of a named benchmark (default: its evaluation split)."),
    max_new_tokens: int = typer.Option(256, help="Most tokens per answer and per text message."),
    batch_size: int = typer.Option(8, help="Questions per batch."),
    samples: int = typer.Option(1, help="Answers per question; k > 1 samples k times and reports pass@k."),
    sample: bool | None = typer.Option(None, "--sample/--greedy", help="Sample, or decode greedily (default: "
                                                                      "greedy for one answer per question)."),
    temperature: float | None = typer.Option(None, help="Sampling temperature (default 0.6, the published "
                                                        "one); needs --sample or --samples > 1."),
    top_p: float | None = typer.Option(None, help="Sampling top-p (default 0.95, the published one); needs "
                                                  "--sample or --samples > 1."),
    upstream: bool = typer.Option(False, help="Also report the published lenient accuracy (separately)."),
    task: str | None = typer.Option(None, help="For styles: math or code (default: from the data)."),
    seed: int = typer.Option(0, help="Seeds sampling and the order of multiple-choice options."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1, ... (default: cuda if available)."),
    device_map: str | None = typer.Option(None, help=DEVICE_MAP_HELP),
    max_memory: str | None = typer.Option(None, help=MAX_MEMORY_HELP),
    offload_folder: Path | None = typer.Option(None, help=OFFLOAD_HELP),
    link_dtype: str = typer.Option("float32", help=LINK_DTYPE_HELP),
    allow_unsandboxed_tools: bool = typer.Option(False, "--allow-unsandboxed-tools", help=UNSANDBOXED_HELP),
    workers: int | None = typer.Option(None, help="Answer on N Ray workers, each a replica of the system (needs "
                                                  'pip install "latentgraph\\[ray]"); backbones load on each from '
                                                  "their source. Default: in this process."),
    ray_address: str | None = typer.Option(None, help="With --workers: the Ray cluster to join, as HOST:PORT "
                                                      "of its head (what `ray start --head` prints) or 'auto' "
                                                      "(the one this machine is part of). Default: a new local "
                                                      "Ray."),
    gpus_per_worker: float = typer.Option(0, help="With --workers: GPUs per worker, its backbones on its GPU "
                                                  "(fractions share one; 0: CPUs)."),
    threads_per_worker: int = typer.Option(1, help="With --workers: CPU threads (and Ray CPUs) per worker."),
) -> None:
    """Evaluate a system (and its baselines) on a dataset: accuracy, tokens and time per method and round."""
    from .ray_cluster import check_address

    if ray_address is not None:
        check_address(ray_address)  # before the slow imports below, so that a typo fails at once
    from .evaluation.datasets import load_dataset
    from .evaluation.runner import PLOT, RESULTS, SUMMARY, SandboxRunner, evaluate

    try:
        mapping = parse_json(columns) if columns is not None else None
    except NotJSON as e:
        raise InputError(f"--columns is {e}; pass e.g. "
                         '\'{"question": "q", "gold": "a"}\'') from None
    try:
        counts = [int(r) for r in rounds.split(",")] if rounds else None
    except ValueError:
        raise InputError(f"--rounds takes comma-separated integers, e.g. 1,2,3; got {rounds!r}") from None
    check_size("--rounds", max(counts) if counts else None, ROUNDS)
    placed = [flag for flag, value in [("--device", device), ("--device-map", device_map), ("--max-memory", max_memory),
                                       ("--offload-folder", offload_folder)] if value is not None]
    if workers is not None and placed:
        raise InputError(f"{', '.join(placed)} place the backbones of an in-process run; Ray workers place theirs "
                         "themselves, on their GPUs with --gpus-per-worker (spread over them when it is above 1), "
                         f"else on CPUs: drop {', '.join(placed)}")
    sampling = samples > 1 if sample is None else sample
    if not sampling and (temperature is not None or top_p is not None):
        raise InputError("--temperature and --top-p set how answers are sampled, but decoding is greedy: add "
                         "--sample (or drop them)")
    examples = load_dataset(dataset, split=split, columns=mapping, format=fmt, offset=offset, limit=limit,
                            seed=seed)
    task = task or ("code" if any(e.kind == "code" for e in examples) else "math")
    with console.status(f"loading {style} (the first run converts and caches the models)"):
        system = load(style, task=task, **placement(device, device_map, max_memory, offload_folder),
                      link_dtype=link_dtype, allow_unsandboxed_tools=allow_unsandboxed_tools)
        if workers is None:  # Ray workers load their own copies
            for agent in system.graph().agents.values():  # a nested system's too
                agent.backbone.load()  # now, not inside the first batch's timing
    code = allow_unsandboxed_tools and any(e.kind == "code" for e in examples)
    code_runner = SandboxRunner(require=()) if code else None  # None: the default, which fails closed
    report = evaluate(system, examples, methods=[m.strip() for m in compare.split(",") if m.strip()],
                      rounds=counts, output=output, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      samples=samples, do_sample=sampling, temperature=0.6 if temperature is None else temperature,
                      top_p=0.95 if top_p is None else top_p, seed=seed, upstream=upstream,
                      code_runner=code_runner, workers=workers, ray_address=ray_address,
                      gpus_per_worker=gpus_per_worker, threads_per_worker=threads_per_worker)
    stdout = Console()
    stdout.print(report.table(), width=None if stdout.is_terminal else 120)  # a file gets the whole table
    written = [output / name for name in (RESULTS, SUMMARY, PLOT) if (output / name).exists()]
    console.print("wrote " + ", ".join(map(str, written)), soft_wrap=True, highlight=False)


@app.command("train")
def train_command(
    data: Path = typer.Option(..., help="Training JSONL: our rows (question, answer, plan, targets) or GSM8K's."),
    output: Path = typer.Option(..., help="Where the trained system, checkpoints and train_log.jsonl go."),
    style: str = typer.Option(DEFAULT, help="'default', a style (see `latentgraph styles`), or a directory."),
    data_format: str | None = typer.Option(None, "--format", help="'gsm8k' for GSM8K rows."),
    offset: int = typer.Option(0, help="First data row to use."),
    limit: int | None = typer.Option(None, help="Most data rows to use."),
    config: Path | None = typer.Option(None, help="A JSON file of TrainConfig fields; the flags below override it."),
    stage: str | None = typer.Option(None, help="inner, outer or joint."),
    regime: str | None = typer.Option(None, help="teacher (published) or rollout (as at inference)."),
    steps: int | None = typer.Option(None, help="Optimizer steps."),
    lr: float | None = typer.Option(None, help="Peak learning rate."),
    batch_size: int | None = typer.Option(None, help="Examples per micro-batch (per rank under torchrun: a step "
                                                     "then trains on ranks x batch size x accumulate)."),
    save_every: int | None = typer.Option(None, help="Write a checkpoint every N steps."),
    resume: Path | None = typer.Option(None, help="A checkpoint directory to continue from."),
    task: str = typer.Option("math", help="For styles: math or code."),
) -> None:
    """Train a system's links on frozen backbones; the result loads with `latentgraph run --style OUTPUT`.

    Data-parallel on N processes: `torchrun --nproc-per-node N -m latentgraph train ...` (one GPU per rank
    where there are GPUs); it makes the updates one process makes with N times the batch size.
    """
    from .training.data import load_training_data
    from .training.distributed import local_device
    from .training.loop import TrainConfig, train

    settings = read_json(config) if config is not None else {}
    if not isinstance(settings, dict):
        raise InputError(f"{config} must hold a JSON object of TrainConfig fields, e.g. {{\"steps\": 100}}")
    flags = {"stage": stage, "regime": regime, "steps": steps, "lr": lr, "batch_size": batch_size,
             "save_every": save_every}
    settings.update({key: value for key, value in flags.items() if value is not None})
    train_config = TrainConfig(**settings)  # an InputError naming each bad field
    examples = load_training_data(data, format=data_format, offset=offset, limit=limit)
    system = load(style, task=task, device=local_device())
    log = train(system, examples, train_config, output=output, resume=resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for all
        return
    console.print(f"trained {train_config.stage} links up to step {log[-1]['step']} on {len(examples)} examples: "
                  f"loss {log[0]['loss']:.4f} -> {log[-1]['loss']:.4f}; wrote {output}")


app.command()(serve)


def main() -> None:
    """Entry point: run the app, turning latentgraph's errors into one clear line and exit code 1."""
    try:
        app()
    except LatentGraphError as e:
        line = " ".join(str(e).replace("\n  - ", "; ").split())  # one line, even for a list of problems
        console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
