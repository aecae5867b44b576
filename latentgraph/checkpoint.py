"""latentgraph's own checkpoint format: the graph as JSON, the link weights as safetensors.

``system.save_pretrained(dir)`` writes two files:

- ``latentgraph_config.json``: format version, rounds, answer node, agents (backbone ``name_or_path`` and
  revision, prompts, latent steps, inner link config) and edges (slot, mode, feedback, link config);
- ``links.safetensors``: link parameters only, keys ``"<agent>.<param>"`` for inner links and
  ``"<src>-><dst>.<param>"`` for outer links.

Backbones are referenced, never copied. Loading tolerates unknown config keys (with a warning) and fails
clearly on missing files, missing keys, wrong shapes and corrupt files.

Saving is crash-safe (:mod:`latentgraph.atomic`): both files are built in memory, written into a hidden
sibling folder and committed with one atomic exchange, so a kill or a full disk at any moment leaves the
complete old checkpoint or the complete new one, never the new config beside the old weights. Other files
in the folder are kept. A failed save raises :class:`~latentgraph.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .atomic import recover, write_directory
from .errors import CheckpointError, unpickling_problem
from .links import Link, LinkConfig
from .textfiles import read_json

if TYPE_CHECKING:
    from .system import System

CONFIG_NAME = "latentgraph_config.json"
WEIGHTS_NAME = "links.safetensors"
FORMAT_VERSION = 1


class _Spec(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown keys are kept, then reported by _warn_unknown

    def unknown(self, where: str) -> list[str]:
        found = [f"{where}.{key}" for key in (self.model_extra or {})]
        for name, value in self:
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, _Spec):
                    found += item.unknown(f"{where}.{name}[{i}]" if isinstance(value, list) else f"{where}.{name}")
        return found


class BackboneSpec(_Spec):
    name_or_path: str
    revision: str | None = None


class AgentSpec(_Spec):
    name: str
    backbone: BackboneSpec
    prompt: str
    feedback_prompt: str | None = None
    system_prompt: str | None = None
    latent_steps: int
    inner_link: dict[str, Any]


class EdgeSpec(_Spec):
    src: str
    dst: str
    slot: str
    mode: Literal["latent", "text"] = "latent"
    feedback: bool = False
    link: dict[str, Any] | None = None


class SystemSpec(_Spec):
    format_version: int
    latentgraph_version: str | None = None
    rounds: int
    answer: str | None
    agents: list[AgentSpec]
    edges: list[EdgeSpec]


def link_state_dict(system: System) -> dict[str, torch.Tensor]:
    """Every link parameter, keyed ``"<agent>.<param>"`` (inner) or ``"<src>-><dst>.<param>"`` (outer)."""
    modules = {**{name: agent.inner_link for name, agent in system.agents.items()}, **dict(system.links)}
    return {f"{owner}.{key}": value for owner, module in modules.items() for key, value in module.state_dict().items()}


def _link_config(module: nn.Module, where: str) -> dict[str, Any]:
    if not isinstance(module, Link):
        raise CheckpointError(f"{where} is a plain {type(module).__name__}, which cannot be saved as a config; "
                              "make it a Link subclass registered with @latentgraph.register_link")
    return module.config.model_dump(exclude={"role", "in_dim", "out_dim"}, exclude_none=True)


def save(system: System, directory: str | Path) -> Path:
    """Write ``system`` in latentgraph's format, crash-safely; see the module docstring."""
    write_directory(directory, files(system))
    return Path(directory)


def files(system: System) -> dict[str, bytes]:
    """The checkpoint of ``system`` as ``{file name: content}``, built (and the system validated) in memory."""
    from . import __version__

    system.validate()
    spec = SystemSpec(
        format_version=FORMAT_VERSION, latentgraph_version=__version__, rounds=system.rounds, answer=system.answer,
        agents=[AgentSpec(name=name, backbone=BackboneSpec(name_or_path=agent.backbone.name_or_path,
                                                             revision=agent.backbone.revision),
                          prompt=agent.prompt, feedback_prompt=agent.feedback_prompt,
                          system_prompt=agent.system_prompt, latent_steps=agent.latent_steps,
                          inner_link=_link_config(agent.inner_link, f"agent '{name}' inner link"))
                for name, agent in system.agents.items()],
        edges=[EdgeSpec(src=e.src, dst=e.dst, slot=e.slot, mode=e.mode, feedback=e.feedback,
                        link=_link_config(system.links[e.name], f"edge '{e.name}' link") if e.mode == "latent" else None)
               for e in system.edges.values()],
    )
    # clone: safetensors refuses tensors that share memory; contiguous: it stores dense buffers
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in link_state_dict(system).items()}
    return {CONFIG_NAME: (json.dumps(spec.model_dump(), indent=2) + "\n").encode(),
            WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"})}


def load(directory: str | Path, *, backbones: dict[str, Any] | None = None, device: Any = None,
         dtype: Any = None) -> System:
    """Read a system written by :func:`save`. ``backbones={agent: source}`` replaces saved backbones: a hub
    id, a directory, a ``(model, tokenizer)`` pair or a :class:`~latentgraph.backbone.Backbone`."""
    from .agent import Agent
    from .backbone import get_backbone
    from .system import System

    directory = recover(Path(directory))
    spec = read_spec(directory / CONFIG_NAME)
    names = [a.name for a in spec.agents]
    for name in backbones or {}:
        if name not in names:
            raise CheckpointError(f"backbones= names agent '{name}', which {directory} does not have; agents: {names}")
    injected, agents = backbones or {}, []
    for a in spec.agents:
        source = injected.get(a.name, a.backbone.name_or_path)
        model, tokenizer = source if isinstance(source, tuple) else (source, None)
        revision = None if a.name in injected else a.backbone.revision
        backbone = get_backbone(model, tokenizer=tokenizer, revision=revision, device=device, dtype=dtype)
        agents.append(Agent(a.name, backbone, a.prompt, feedback_prompt=a.feedback_prompt,
                            system_prompt=a.system_prompt, latent_steps=a.latent_steps, inner_link=a.inner_link))
    system = System(agents, rounds=spec.rounds, answer=spec.answer)
    for e in spec.edges:
        system.connect(e.src, e.dst, slot=e.slot, mode=e.mode, feedback=e.feedback, link=e.link)
    weights = directory / WEIGHTS_NAME
    assign(system, read_weights(weights), source=str(weights))
    return system.validate()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``links.safetensors`` file."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing; a latentgraph checkpoint has {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); save the system again") from None


def read_spec(path: Path) -> SystemSpec:
    if not path.exists():
        raise CheckpointError(f"{path} is missing: is {path.parent} a latentgraph checkpoint (save_pretrained)?")
    raw = read_json(path, error=CheckpointError)
    try:
        spec = SystemSpec.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise CheckpointError(f"{path} does not describe a system: {problems}") from None
    if spec.format_version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {spec.format_version}; this latentgraph reads up to "
                              f"{FORMAT_VERSION}: upgrade latentgraph")
    if unknown := spec.unknown("config"):
        warnings.warn(f"{path}: ignoring unknown keys {unknown} (written by a newer latentgraph?)", stacklevel=3)
    return spec


def assign(system: System, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy ``state`` (keys as in :func:`link_state_dict`) into the system's links; every key is required."""
    expected = link_state_dict(system)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} link tensors: {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        warnings.warn(f"{source}: ignoring {len(unknown)} tensors that match no link: {unknown[:8]}", stacklevel=3)
    for key, target in expected.items():
        check_shape(state[key], target, key, source)
    modules = {**{name: agent.inner_link for name, agent in system.agents.items()}, **dict(system.links)}
    for owner, module in modules.items():
        prefix = f"{owner}."
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)


def check_shape(tensor: torch.Tensor, target: torch.Tensor, key: str, source: str) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(f"{source}: tensor '{key}' has shape {tuple(tensor.shape)}, the link expects "
                              f"{tuple(target.shape)}: the checkpoint was made for other backbones or link types")


def load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A published ``.pt`` state dict, unpickled with ``weights_only=True``: anything but plain tensors is
    refused, never executed."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a plain state dict of tensors: {unpickling_problem(e)}") from None
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of named tensors")
    return state
