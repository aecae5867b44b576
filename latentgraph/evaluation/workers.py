"""Evaluation on Ray: replicas of a system as Ray actors, answering the batches the driver hands out.

:func:`~latentgraph.evaluation.runner.evaluate` with ``workers=N`` starts N :class:`Replica` actors, on a local
Ray instance or on a cluster, and keeps each busy with batches (:class:`~latentgraph.evaluation.answering.Batch`).

What moves between machines: the system's config and link weights, as the bytes of a latentgraph checkpoint
(:func:`latentgraph.checkpoints.native.files`) put once in Ray's object store; the agents' tools and the code
runner, pickled; batches of questions to the workers and result rows back. What does not: backbone weights.
Each worker loads them from the source the config names, a folder every node sees or a hub id, as
:meth:`~latentgraph.System.from_pretrained` would; so a backbone given as a model in memory cannot be used.
Nor does code: every node needs latentgraph installed (and any link type or tool class the system uses).

Each worker answers and scores its batches with the same function as an in-process run, on its own
device: the driver's dtype when it runs on the driver's kind of device (CPU or GPU), so greedy rows equal
the single-process run's; that device's default dtype otherwise. Links keep the dtype the driver's are in.
The driver writes rows as batches finish.

A worker that dies (its process killed, its node lost) is restarted by Ray wherever there is room, up to
``MAX_RESTARTS`` times, rebuilding its replica from the object store, and Ray runs the batches it held again
(``max_task_retries``). A batch is a deterministic function of its questions and decoding settings (greedy,
or sampling from a fixed seed), so a rerun gives the rows it would have given; the driver writes each row
key once all the same. An error the system raises (a :class:`~latentgraph.LatentGraphError`) is not retried:
it reaches the driver as it was raised.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors

from ..checkpoints import native
from ..checkpoints.link_dtype import AUTO
from ..core.backbone import Backbone, get_backbone
from ..core.system import System
from ..errors import CheckpointError, GraphError, InputError, LatentGraphError, WorkerError
from ..ray_cluster import check_address, import_ray, join_ray
from .answering import Batch, answer_batch

if TYPE_CHECKING:
    from . import strict

MAX_RESTARTS = 3  # per worker, and reruns per batch: a batch that kills every worker it meets ends the run
IN_FLIGHT = 2  # batches queued on each worker: one running, the next waiting, so no worker idles on the driver


@dataclass(frozen=True)
class WorkerOptions:
    """How many Ray workers answer, where, and with what each.

    Args:
        workers: replicas of the system, one Ray actor each.
        address: a Ray cluster to join, as ``host:port`` of its GCS or ``"auto"`` (the one this machine belongs
            to); None: a Ray instance already initialised in this process, else a new local one sized for the
            workers. See :func:`~latentgraph.ray_cluster.join_ray`.
        gpus_per_worker: GPUs each worker asks Ray for (fractions share a GPU; above 1, each backbone is spread
            over the worker's GPUs by ``device_map="auto"``); 0 runs on CPUs.
        threads_per_worker: CPU threads of each worker, and the CPUs it asks Ray for.
    """

    workers: int
    address: str | None = None
    gpus_per_worker: float = 0
    threads_per_worker: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise InputError(f"workers must be an integer >= 1 (Ray workers, each a replica of the system), got "
                             f"{self.workers!r}; leave it unset to evaluate in this process")
        if not (isinstance(self.threads_per_worker, int) and self.threads_per_worker >= 1):
            raise InputError(f"threads_per_worker must be an integer >= 1, got {self.threads_per_worker!r}")
        if not (isinstance(self.gpus_per_worker, (int, float)) and self.gpus_per_worker >= 0):
            raise InputError(f"gpus_per_worker must be a number >= 0 (0: run on CPUs), got {self.gpus_per_worker!r}")
        if self.address is not None:
            check_address(self.address)  # its form now; whether a cluster answers there when workers start


class Replica:
    """One copy of the system on a Ray worker (the class of the Ray actors)."""

    def __init__(self, checkpoint: dict[str, bytes], dtypes: dict[str, torch.dtype | None], extras: bytes,
                 threads: int, placement: dict[str, str]):
        from ray import cloudpickle
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()  # Ray forwards a worker's stderr: N loading bars would clutter the driver's
        torch.set_num_threads(threads)
        extras = cloudpickle.loads(extras)
        self.code_runner, self.code_timeout = extras["code_runner"], extras["code_timeout"]
        self.problem: LatentGraphError | None = None
        try:
            self.system = rebuild(checkpoint, dtypes, extras["tools"], placement)
        except LatentGraphError as e:  # kept for answer(): the driver then gets it as raised, not a dead actor
            self.problem = e

    def answer(self, batch: Batch) -> list[dict[str, Any]]:
        """The batch's result rows, as :func:`~latentgraph.evaluation.answering.answer_batch` gives them."""
        if self.problem is not None:
            raise self.problem
        return answer_batch(self.system, batch, self.code_runner, self.code_timeout)


def rebuild(checkpoint: dict[str, bytes], dtypes: dict[str, torch.dtype | None], tools: dict[str, list],
            placement: dict[str, str]) -> System:
    """The system a checkpoint's bytes describe, its backbones loaded from their sources and placed as
    ``placement`` says (``device=`` one device, or ``device_map="auto"`` over the worker's GPUs)."""
    config = json.loads(checkpoint[native.CONFIG_NAME])
    backbones = {}
    for name, agent in _agent_configs(config):
        source = agent["backbone"]
        try:
            backbones[name] = get_backbone(source["name_or_path"], revision=source["revision"], dtype=dtypes[name],
                                           **placement).load()
        except CheckpointError as e:
            raise CheckpointError(f"agent '{name}' on a Ray worker: {e}; workers load backbones from "
                                  "their source, so a folder must be at that path on every node") from None
    system = System.from_config(config, backbones=backbones)
    weights = load_safetensors(checkpoint[native.WEIGHTS_NAME])
    # "auto": each link in the dtype the driver's was in (the tensors were sent in it), so rows match the driver's
    native.assign(system.link_modules(), weights, source="the link weights sent by the driver", link_dtype=AUTO)
    agents = system.graph().agents  # nested systems' agents too, by their full names
    for name, agent_tools in tools.items():
        agents[name].tools = agent_tools
    return system


def _agent_configs(config: dict, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """Every agent of a system config, nested systems' included, by its full name (``team.a``)."""
    for agent in config["agents"]:
        yield prefix + agent["name"], agent
    for nested in config.get("subsystems") or []:
        yield from _agent_configs(nested["system"], f"{prefix}{nested['name']}.")


def shipped(system: System, device: str) -> tuple[dict[str, bytes], dict[str, torch.dtype | None]]:
    """What a worker rebuilds ``system`` from: its checkpoint's bytes and each backbone's dtype (the driver's
    on the driver's kind of device, so results match; None, the device's default, elsewhere)."""
    agents = system.graph().agents  # nested systems' agents too, by their full names
    for name, agent in agents.items():
        backbone = agent.backbone
        if backbone.config.name_or_path != backbone.name_or_path:  # given as a loaded model: no source to load
            raise InputError(f"agent '{name}': its backbone was given as a loaded model ({backbone.name_or_path}), "
                             "which Ray workers cannot load; save it with model.save_pretrained(folder) and "
                             "tokenizer.save_pretrained(folder) in a folder every Ray node sees and build the agent "
                             "from that folder (or from a hub id), or evaluate in this process (no workers)")
    try:
        config = system.validate().to_config()
    except GraphError as e:
        raise InputError(f"Ray workers rebuild the system from its config, which cannot describe it: {e}; or "
                         "evaluate in this process (no workers)") from None
    dtypes = {name: agent.backbone.dtype if _device_kind(agent.backbone) == device else None
              for name, agent in agents.items()}
    return native.files(config, system.link_modules()), dtypes


def _device_kind(backbone: Backbone) -> str:
    """``"cpu"`` or ``"cuda"``: where the driver runs a backbone, read without loading a device-mapped one."""
    main = backbone.device_map.main_device() if backbone.device_map is not None else backbone.device
    return main.type


class RayWorkers:
    """Replicas of ``system`` on Ray workers, as ``options`` asks.

    Built before anything runs, it checks that Ray is installed and that workers can rebuild the system;
    entered, it joins Ray, checks the cluster can hold the workers and starts them; :meth:`answer` hands them
    batches; on exit the workers stop, and a Ray instance started here shuts down.
    """

    def __init__(self, system: System, options: WorkerOptions, code_runner: strict.CodeRunner | None,
                 code_timeout: float):
        self.ray, self.options = import_ray("evaluation on Ray workers"), options
        device = "cuda" if options.gpus_per_worker > 0 else "cpu"
        # a worker with several GPUs spreads each backbone over them (Ray shows it only its own)
        self.placement = {"device_map": "auto"} if options.gpus_per_worker > 1 else {"device": device}
        self.checkpoint, self.dtypes = shipped(system, device)
        tools = {name: agent.tools for name, agent in system.graph().agents.items() if agent.tools}
        try:
            self.extras = self.ray.cloudpickle.dumps({"tools": tools, "code_runner": code_runner,
                                                      "code_timeout": code_timeout})
        except (TypeError, pickle.PicklingError) as e:
            raise InputError(f"the agents' tools or the code runner cannot be sent to Ray workers ({e}); use ones "
                             "that pickle, or evaluate in this process (no workers)") from None
        self.actors: list = []
        self.shared: tuple = ()  # object-store refs of the checkpoint and extras, while workers run
        self.started = False

    def __enter__(self) -> RayWorkers:
        ray, options = self.ray, self.options
        self.started = join_ray(options.address, local_cpus=options.workers * options.threads_per_worker)
        try:
            _check_resources(ray, options)
        except InputError:
            self.__exit__()
            raise
        actor_class = ray.remote(num_cpus=options.threads_per_worker, num_gpus=options.gpus_per_worker,
                                 max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)(Replica)
        # one copy of each in the object store for all actors, its refs held until they are killed: an actor
        # that Ray restarts finds its arguments again
        self.shared = ray.put(self.checkpoint), ray.put(self.extras)
        checkpoint, extras = self.shared
        self.actors = [actor_class.remote(checkpoint, self.dtypes, extras, options.threads_per_worker, self.placement)
                       for _ in range(options.workers)]
        return self

    def __exit__(self, *exception: object) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors, self.shared = [], ()
        if self.started:
            self.ray.shutdown()
            self.started = False

    def answer(self, batches: list[Batch]) -> Iterator[tuple[Batch, list[dict]]]:
        """Answer ``batches``; yields each batch with its rows as it finishes (not in order)."""
        return _dispatch(self.ray, self.actors, batches)


def _dispatch(ray: Any, actors: list, batches: list[Batch]) -> Iterator[tuple[Batch, list[dict]]]:
    """Keep every actor ``IN_FLIGHT`` batches deep; yield each batch's rows as they come back."""
    waiting = iter(batches)
    running: dict[Any, tuple[Any, Batch]] = {}  # result ref -> (actor, batch)

    def submit(actor: Any) -> None:
        batch = next(waiting, None)
        if batch is not None:
            running[actor.answer.remote(batch)] = actor, batch

    for _ in range(IN_FLIGHT):
        for actor in actors:
            submit(actor)
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        actor, batch = running.pop(ref)
        rows = _rows(ray, ref)
        submit(actor)  # before the driver writes these rows, so the worker keeps going meanwhile
        yield batch, rows


def _rows(ray: Any, ref: Any) -> list[dict]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, LatentGraphError):  # the system's own error, as in-process; not Ray's wrapping
            raise e.cause from None
        raise
    except ray.exceptions.RayActorError as e:
        raise WorkerError(f"a Ray worker died and cannot be restarted ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); one that never started often lacks latentgraph on its "
                          f"node, one that died {MAX_RESTARTS + 1} times may run out of memory. The rows finished so "
                          "far are kept: run the evaluation again to resume") from None


def _check_resources(ray: Any, options: WorkerOptions) -> None:
    """Refuse a request the cluster cannot hold, which Ray would otherwise wait on forever."""
    have = ray.cluster_resources()
    for resource, each, flag in (("CPU", options.threads_per_worker, "threads_per_worker"),
                                 ("GPU", options.gpus_per_worker, "gpus_per_worker")):
        need = options.workers * each
        if need > have.get(resource, 0):
            raise InputError(f"{options.workers} workers with {flag}={each} need {need:g} {resource}s, but the Ray "
                             f"cluster has {have.get(resource, 0):g}; ask for fewer workers or a smaller "
                             f"{flag}, or add nodes")
