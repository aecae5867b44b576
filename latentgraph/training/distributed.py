"""Data-parallel training: the ranks of a torchrun job and what they share.

``torchrun --nproc-per-node N -m latentgraph train ...``, or :func:`~latentgraph.training.loop.train` called in
each process of a torchrun job, trains with N ranks: each rank holds a whole system and takes its own shard of
every global batch (see :func:`~latentgraph.training.loop.batches_for`), and gradients are averaged over the
ranks before the optimizer step, so N ranks of ``batch_size`` examples make the update one process makes with
``N * batch_size``. Outside torchrun (no ``WORLD_SIZE`` in the environment, no process group) there is one rank
and nothing here communicates.

Gradients are averaged by one explicit ``all_reduce`` of all link gradients per optimizer step, after the last
micro-batch's backward, rather than by torch's ``DistributedDataParallel``. DDP fits this structure badly: it
needs the loss computed in a module's forward and passes what that returns through a node of its own, so that
hooks on those tensors (the per-round message-gradient log) see no gradient; it needs ``find_unused_parameters``
(a plan may leave a link out of the graph, a feedback edge when one round is unrolled), an extra graph traversal
and a warning on every run; and its reducer holds the process group beyond ``destroy_process_group``, whose
deferred destruction was seen to deadlock a gloo rank at exit. Its one gain, overlapping communication with the
backward pass, is small for links of a few million parameters against the backbone forwards. Rank 0's links are
broadcast before the first step, so every rank starts from the same ones.

Only rank 0 writes (checkpoints, the final output, the log); the others wait for it, and if its write fails
they fail too, with the reason, instead of going on. A rank that fails anywhere else exits, and torchrun then
stops the others: no rank waits forever.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import CheckpointError, InputError, LatentGraphError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """The processes training together: ``size`` of them, this one ``rank``; one and not communicating outside
    a process group."""

    rank: int = 0
    size: int = 1
    device: torch.device | None = None  # where collectives put their tensors; None: no process group

    @property
    def grouped(self) -> bool:
        return self.device is not None

    @property
    def first(self) -> bool:
        return self.rank == 0

    def share(self, parameters: list[torch.nn.Parameter]) -> None:
        """Rank 0's values of ``parameters`` on every rank, so that all start from the same links whatever each
        computed (a closed-form initialisation, say)."""
        for parameter in parameters if self.grouped else ():
            dist.broadcast(parameter.data, src=0)

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks, in one collective: the gradient of the mean loss
        over all ranks' examples. Which parameters have a gradient is the same on every rank (one plan)."""
        grads = [p.grad for p in parameters if p.grad is not None] if self.grouped else []
        if not grads:
            return
        flat = torch.cat([g.flatten().to(self.device) for g in grads])
        dist.all_reduce(flat)
        for grad, mean in zip(grads, (flat / self.size).split([g.numel() for g in grads])):
            grad.copy_(mean.view_as(grad))

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (in one collective)."""
        if not self.grouped:
            return values
        summed = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return summed.tolist()

    def on_first(self, action: Callable[[], T]) -> T:
        """``action()`` on rank 0 only, its result given to every rank; the others wait for it, so none reads a
        file it is still writing. A LatentGraphError there is raised on every rank."""
        if not self.grouped:
            return action()
        outcome: list = [None, None]  # [result, error message]
        failure = None
        if self.first:
            try:
                outcome[0] = action()
            except LatentGraphError as e:
                failure, outcome[1] = e, str(e)
        dist.broadcast_object_list(outcome, src=0, device=self.device)
        if failure is not None:
            raise failure
        if outcome[1] is not None:
            raise CheckpointError(f"rank 0 failed, so rank {self.rank} stops too: {outcome[1]}")
        return outcome[0]


def join(device: torch.device) -> Ranks:
    """This process's rank in its torchrun job, collectives on ``device`` (NCCL on a GPU, gloo otherwise); one
    rank outside torchrun. Starts the process group unless the caller already has. One that this starts lasts
    until the process exits, for later calls of ``train`` too: after ``destroy_process_group`` a new one would
    meet the old one's addresses in torchrun's rendezvous store."""
    if not dist.is_available() or not (dist.is_initialized() or "WORLD_SIZE" in os.environ):
        return Ranks()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except (ValueError, RuntimeError) as e:
            raise InputError(f"WORLD_SIZE is set, as in a torchrun job, but the process group could not start "
                             f"({e}); launch with torchrun, or unset WORLD_SIZE to train in one process") from None
        atexit.register(_end_group)
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def _end_group() -> None:
    if dist.is_initialized():  # unless the user ended it first
        dist.destroy_process_group()


def local_device() -> str | None:
    """Where this process's system should run: ``cuda:LOCAL_RANK`` in a torchrun job on a machine with GPUs
    (one GPU per rank), else None (the loader's default)."""
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return None
