"""latentgraph's own checkpoint format: the graph as JSON, the link weights as safetensors.

``system.save_pretrained(dir)`` writes two files:

- ``latentgraph_config.json``: format version, rounds, answer node, agents (backbone ``name_or_path`` and
  revision, prompts, latent steps, inner link config) and edges (slot, mode, feedback, link config);
- ``links.safetensors``: link parameters only, keys ``"<agent>.<param>"`` for inner links and
  ``"<src>-><dst>.<param>"`` for outer links.

Backbones are referenced, never copied. The config is ``System.to_config()`` as JSON (see
:mod:`latentgraph.config`, which also reads it); this module is the file I/O around it and the link
weights. Loading fails clearly on missing files, missing keys, wrong shapes or dtypes and corrupt files.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, SystemConfig, read_config
from .errors import CheckpointError

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "assign", "check_shape", "link_state_dict",
           "load_pickled_state_dict", "load_weights", "read_config", "save"]


def link_state_dict(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every link parameter of ``modules`` (``System.link_modules()``), keyed ``"<owner>.<param>"``."""
    return {f"{owner}.{key}": value for owner, module in modules.items() for key, value in module.state_dict().items()}


def save(directory: str | Path, config: SystemConfig, modules: dict[str, nn.Module]) -> Path:
    """Write ``config`` and the parameters of ``modules`` in latentgraph's format; see the module docstring."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(config.to_json())
    # clone: safetensors refuses tensors that share memory; contiguous: it stores dense buffers
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in link_state_dict(modules).items()}
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    return directory


def load_weights(directory: str | Path, modules: dict[str, nn.Module]) -> None:
    """Copy ``directory``'s ``links.safetensors`` into ``modules``; every tensor they need is required."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing; a latentgraph checkpoint has {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e}); save the system again") from None
    assign(modules, state, source=str(weights))


def assign(modules: dict[str, nn.Module], state: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy ``state`` (keys as in :func:`link_state_dict`) into ``modules``; every key is required."""
    expected = link_state_dict(modules)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} link tensors: {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        warnings.warn(f"{source}: ignoring {len(unknown)} tensors that match no link: {unknown[:8]}", stacklevel=3)
    for key, target in expected.items():
        check_shape(state[key], target, key, source)
    for owner, module in modules.items():
        prefix = f"{owner}."
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)


def check_shape(tensor: torch.Tensor, target: torch.Tensor, key: str, source: str) -> None:
    """A link tensor must be floating point and have the shape of the parameter it fills."""
    if not tensor.is_floating_point():
        raise CheckpointError(f"{source}: tensor '{key}' has dtype {tensor.dtype}; link parameters are floating "
                              "point: the file is not a link checkpoint, or was corrupted")
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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a plain state dict of tensors; refused to unpickle it ({first})") from None
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of named tensors")
    return state
