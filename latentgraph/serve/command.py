"""``latentgraph serve``: the command, with the system choice and placement flags of ``run`` and the server's
limits. Light to import (FastAPI and uvicorn load when it runs)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..cli_system import (
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
from ..errors import InputError
from .limits import API_KEY_VARIABLE, Limits


def serve(
    style: str = typer.Option(DEFAULT, help="'default' (real small models, offline), a style, a "
                                            "directory written by save_pretrained, or a .json/.yaml system file."),
    task: str = typer.Option("math", help="For styles: math or code links and answer format."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. One that other machines can reach needs "
                                               "--api-key (or --allow-no-key)."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free one)."),
    api_key: str | None = typer.Option(None, envvar=API_KEY_VARIABLE, show_envvar=True,
                                       help="Require 'Authorization: Bearer KEY' on /v1/... and /metrics."),
    allow_no_key: bool = typer.Option(False, "--allow-no-key", help="Serve on an address other machines can "
                                                                    "reach without an API key."),
    cors_origin: list[str] = typer.Option([], help="An origin browsers may call the API from (repeat for more); "
                                                   "none by default (no CORS headers)."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1, ... (default: cuda if available)."),
    device_map: str | None = typer.Option(None, help=DEVICE_MAP_HELP),
    max_memory: str | None = typer.Option(None, help=MAX_MEMORY_HELP),
    offload_folder: Path | None = typer.Option(None, help=OFFLOAD_HELP),
    link_dtype: str = typer.Option("float32", help=LINK_DTYPE_HELP),
    allow_unsandboxed_tools: bool = typer.Option(False, "--allow-unsandboxed-tools", help=UNSANDBOXED_HELP),
    max_batch_size: int = typer.Option(Limits.max_batch_size, help="Most rows (questions times choices) decoded "
                                                                   "together."),
    batch_wait_ms: float = typer.Option(Limits.batch_wait_ms, help="How long a batch waits for more requests "
                                                                   "once it has one."),
    max_queue: int = typer.Option(Limits.max_queue, help="Most rows waiting for a batch; more get 503 with "
                                                         "Retry-After."),
    max_tokens_cap: int = typer.Option(Limits.max_tokens_cap, help="The largest max_tokens a request may ask for."),
    default_max_tokens: int = typer.Option(Limits.default_max_tokens, help="max_tokens of a request that gives "
                                                                           "none (at most --max-tokens-cap)."),
    max_question_chars: int = typer.Option(Limits.max_question_chars, help="The longest question, a chat's "
                                                                           "transcript included."),
    max_body_bytes: int = typer.Option(Limits.max_body_bytes, help="The largest request body; larger get 413."),
    max_n: int = typer.Option(Limits.max_n, help="Most choices (n) per request."),
    replicas: int | None = typer.Option(None, help="Serve from N replicas on Ray Serve, each loading its own copy of "
                                                   "the system and batching the requests it gets (needs pip install "
                                                   '"latentgraph\\[replicas]"). Default: one process.'),
    ray_address: str | None = typer.Option(None, help="With --replicas: the Ray cluster to join, as HOST:PORT of its "
                                                      "head (what `ray start --head` prints) or 'auto' (the one this "
                                                      "machine is part of). Default: a new local Ray."),
    gpus_per_replica: float = typer.Option(0, help="With --replicas: GPUs per replica, its backbones on its GPU "
                                                   "(fractions share one; above 1, spread over them; 0: CPUs)."),
    threads_per_replica: int = typer.Option(1, help="With --replicas: CPU threads (and Ray CPUs) per replica."),
) -> None:
    """Serve a system with an OpenAI-compatible HTTP API (chat and text completions, streamed or not) until
    Ctrl-C. Needs the serve extra: pip install "latentgraph\\[serve]"."""
    if replicas is None and (ray_address is not None or gpus_per_replica != 0 or threads_per_replica != 1):
        raise InputError("--ray-address, --gpus-per-replica and --threads-per-replica set up replicas on Ray Serve: "
                         "add --replicas N, or drop them to serve from this process")
    try:
        from .replicas import ReplicaOptions, serve_replicas
        from .server import model_id, serve_system
    except ImportError as e:
        raise InputError(f'serving needs the serve extra ({e.name} is missing): pip install "latentgraph[serve]"'
                         ) from None
    limits = Limits(max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, max_queue=max_queue,
                    max_tokens_cap=max_tokens_cap, default_max_tokens=default_max_tokens,
                    max_question_chars=max_question_chars, max_body_bytes=max_body_bytes, max_n=max_n)
    from ..checkpoints.link_dtype import check_link_dtype

    check_link_dtype(link_dtype)  # now, not in the background load after the server has started
    choice = {"task": task, "link_dtype": link_dtype, "allow_unsandboxed_tools": allow_unsandboxed_tools}
    server = {"name": model_id(style), "host": host, "port": port, "limits": limits, "api_key": api_key,
              "allow_no_key": allow_no_key, "cors_origins": cors_origin,
              "say": lambda line: console.print(line, highlight=False, soft_wrap=True, markup=False)}
    if replicas is not None:
        placed = [flag for flag, value in [("--device", device), ("--device-map", device_map),
                                           ("--max-memory", max_memory), ("--offload-folder", offload_folder)]
                  if value is not None]
        if placed:
            raise InputError(f"{', '.join(placed)} place the backbones of this process; replicas place theirs "
                             "themselves, on their GPUs with --gpus-per-replica (spread over them when it is above "
                             f"1), else on CPUs: drop {', '.join(placed)}")
        options = ReplicaOptions(replicas, ray_address, gpus_per_replica, threads_per_replica)
        serve_replicas(style, choice, options, **server)
        return
    where = placement(device, device_map, max_memory, offload_folder)
    serve_system(lambda: load(style, **choice, **where), **server)
