"""latentgraph's own checkpoint format: the graph as JSON, the link weights as safetensors.

``system.save_pretrained(dir)`` writes two files:

- ``latentgraph_config.json``: format version, rounds, answer node, agents (backbone ``name_or_path`` and
  revision, prompts, latent steps, inner link config) and edges (slot, mode, feedback, link config);
- ``links.safetensors``: link parameters only, keys ``"<agent>.<param>"`` for inner links and
  ``"<src>-><dst>.<param>"`` for outer links.

Backbones are referenced, never copied. The config is ``System.to_config()`` as JSON (see
:mod:`latentgraph.core.config`, which also reads it); this module is the file I/O around it and the link
weights. Loading fails clearly on missing files, missing keys, wrong shapes or dtypes and corrupt files.

Saving is crash-safe (:mod:`latentgraph.files.atomic`): both files are built in memory, written into a hidden
sibling folder and committed with one atomic exchange, so a kill or a full disk at any moment leaves the
complete old checkpoint or the complete new one, never the new config beside the old weights. Other files
in the folder are kept. A failed save raises :class:`~latentgraph.errors.CheckpointError`.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..core.config import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, SystemConfig, read_config
from ..errors import CheckpointError, unpickling_problem
from ..files.atomic import recover, write_directory
from .link_dtype import DEFAULT, LinkDtype, load_link_state

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "assign", "check_shape", "files", "link_state_dict",
           "load_pickled_state_dict", "load_weights", "read_config", "read_weights", "recover", "save"]


def link_state_dict(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every link parameter of ``modules`` (``System.link_modules()``), keyed ``"<owner>.<param>"``."""
    return {f"{owner}.{key}": value for owner, module in modules.items() for key, value in module.state_dict().items()}


def save(directory: str | Path, config: SystemConfig, modules: dict[str, nn.Module]) -> Path:
    """Write ``config`` and the parameters of ``modules`` in latentgraph's format, crash-safely; see the
    module docstring."""
    write_directory(directory, files(config, modules))
    return Path(directory)


def files(config: SystemConfig, modules: dict[str, nn.Module]) -> dict[str, bytes]:
    """The checkpoint as ``{file name: content}``, built in memory."""
    # clone: safetensors refuses tensors that share memory; contiguous: it stores dense buffers
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in link_state_dict(modules).items()}
    return {CONFIG_NAME: config.to_json().encode(), WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"})}


def load_weights(directory: str | Path, modules: dict[str, nn.Module], *, link_dtype: LinkDtype = DEFAULT) -> None:
    """Copy ``directory``'s ``links.safetensors`` into ``modules``, in ``link_dtype`` (see :mod:`.link_dtype`);
    every tensor they need is required."""
    weights = Path(directory) / WEIGHTS_NAME
    assign(modules, read_weights(weights), source=str(weights), link_dtype=link_dtype)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``links.safetensors`` file."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing; a latentgraph checkpoint has {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); save the system again") from None


def assign(modules: dict[str, nn.Module], state: dict[str, torch.Tensor], *, source: str,
           link_dtype: LinkDtype = DEFAULT) -> None:
    """Copy ``state`` (keys as in :func:`link_state_dict`) into ``modules``, each module put in ``link_dtype``
    first (``"auto"``: the dtype of its tensors in ``state``); every key is required."""
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
        load_link_state(module, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, link_dtype,
                        strict=False)


def check_shape(tensor: torch.Tensor, target: torch.Tensor, key: str, source: str) -> None:
    """A link tensor must be floating point and have the shape of the parameter it fills."""
    if not tensor.is_floating_point():
        raise CheckpointError(f"{source}: tensor '{key}' has dtype {tensor.dtype}; link parameters are floating "
                              "point: the file is not a link checkpoint, or was corrupted")
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(f"{source}: tensor '{key}' has shape {tuple(tensor.shape)}, the link expects "
                              f"{tuple(target.shape)}: the checkpoint was made for other backbones or link types")


def unpickle_safely(path: Path, what: str) -> object:
    """``torch.load`` with ``weights_only=True``: plain containers of tensors and numbers load, anything else
    (code, custom classes) is refused, never executed. A refusal or a corrupt file is a
    :class:`CheckpointError` saying the file is not ``what`` and why."""
    try:
        with warnings.catch_warnings():
            # torch warns about its unpickler (a pickle protocol other than 2, a TorchScript archive) on the way
            # to loading or refusing the file; the data, or our error saying why not, is all the user needs
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, OSError) as e:
        raise CheckpointError(f"{path} is not {what}: {unpickling_problem(e)}") from None


def load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A published ``.pt`` state dict: anything but plain tensors is refused, never executed."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    state = unpickle_safely(path, "a plain state dict of tensors")
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of named tensors")
    return state
