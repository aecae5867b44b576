"""latentgraph: multi-agent LLM systems whose agents talk in latent space (RecursiveMAS) as typed graphs.

Agents wrap frozen Hugging Face causal LMs; edges carry small learned links over hidden states; feedback
edges close loops; one engine unrolls any topology for R rounds, for inference and training alike.

The package is organised by purpose: ``core`` (agents, links, the system graph, its plan and engine),
``checkpoints`` (our format, the published styles, ``load``), ``training``, ``evaluation``, ``tools``,
``embedded`` (backbones shipped in packages and the default system) and ``files`` (crash-safe writes, reading
user files, the hub). The names below are imported on first use, so ``import latentgraph`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import CheckpointError, GraphError, InputError, LatentGraphError, SandboxUnavailable
from .version import __version__ as __version__

_LAZY = {
    "Agent": "core.agent",
    "System": "core.system",
    "Link": "core.links",
    "register_link": "core.links",
    "RunOutput": "core.events",
    "render": "core.render",
    "load": "checkpoints.loading",
    "load_style": "checkpoints.published",
    "train": "training.loop",
    "TrainConfig": "training.loop",
    "evaluate": "evaluation.runner",
}

__all__ = ["Agent", "CheckpointError", "GraphError", "InputError", "LatentGraphError", "Link", "RunOutput",
           "SandboxUnavailable", "System", "TrainConfig", "evaluate", "load", "load_style", "register_link",
           "render", "train"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'latentgraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names above are loaded lazily
    from .checkpoints.loading import load
    from .checkpoints.published import load_style
    from .core.agent import Agent
    from .core.events import RunOutput
    from .core.links import Link, register_link
    from .core.render import render
    from .core.system import System
    from .evaluation.runner import evaluate
    from .training.loop import TrainConfig, train
