"""One entry point for every kind of system: ``latentgraph.load(name)``.

A name is ``"default"`` (the embedded default system, real small backbones shipped in packages), a
style (a published RecursiveMAS one such as ``"sequential_light"``, or the training-free ``"latent_mas"``), a
folder written by ``save_pretrained``, or a system declared in a ``.json``/``.yaml`` file (with the links of a
``links.safetensors`` beside it, else fresh untrained links). A folder that a save killed midway left aside is
put back first (:func:`~latentgraph.files.atomic.recover`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..core.config import CONFIG_NAME, CONFIG_SUFFIXES, WEIGHTS_NAME
from ..core.system import System
from ..errors import CheckpointError
from ..files.atomic import recover
from ..files.hub import looks_like_path
from .link_dtype import cast_links, check_link_dtype
from .native import load_weights
from .published import list_styles, load_style, style_module

DEFAULT = "default"


def load(name: str | Path = DEFAULT, *, task: str = "math", weights: bool = True, device: Any = None,
         dtype: Any = None, device_map: Any = None, max_memory: Any = None, offload_folder: Any = None,
         allow_unsandboxed_tools: bool = False, link_dtype: Any = "float32") -> System:
    """A system by name.

    Args:
        name: ``"default"``, a style, a saved folder, or a ``.json``/``.yaml`` system file.
        task: for styles, ``"math"`` or ``"code"`` (which links and answer format).
        weights: ``False`` gives a style's graph with fresh links (for drawing it).
        device, dtype: where and in what dtype the backbones run.
        device_map, max_memory, offload_folder: instead of ``device``, spread each backbone over several GPUs
            with CPU or disk offload (see :class:`~latentgraph.Agent`).
        allow_unsandboxed_tools: give a published style's tool agent a Python tool that runs code with
            whatever protections this machine has (``PythonTool(require=())``) instead of failing closed.
        link_dtype: what the links hold their parameters and compute in: ``"float32"`` (default), ``"auto"`` (the
            dtype their file holds: bf16 for the published styles, their numerics), or another dtype (see
            :mod:`latentgraph.checkpoints.link_dtype`).
    """
    name = str(name)
    link_dtype = check_link_dtype(link_dtype)
    placement = {"device": device, "dtype": dtype, "device_map": device_map, "max_memory": max_memory,
                 "offload_folder": offload_folder}
    if name == DEFAULT:
        from ..embedded.default_system import default_system

        return default_system(**placement, link_dtype=link_dtype)
    if name in list_styles():
        tools = {}
        if allow_unsandboxed_tools and hasattr(style_module(name), "TOOL_AGENT"):
            from ..tools import PythonTool

            tools = {"tools": [PythonTool(require=())]}
        return load_style(name, task=task, load_weights=weights, **placement, **tools, link_dtype=link_dtype)
    path = recover(Path(name).expanduser())
    if (path / CONFIG_NAME).exists():
        return System.from_pretrained(path, **placement, link_dtype=link_dtype)
    if path.suffix.lower() in CONFIG_SUFFIXES and path.is_file():
        system = System.from_config(path, **placement)
        cast_links(system.link_modules(), link_dtype)
        if (path.parent / WEIGHTS_NAME).exists():
            load_weights(path.parent, system.link_modules(), link_dtype=link_dtype)
        else:
            warnings.warn(f"no {WEIGHTS_NAME} beside {path}: the links are freshly initialised, not trained",
                          stacklevel=2)
        return system
    if path.is_dir():
        raise CheckpointError(f"the folder {name!r} has no {CONFIG_NAME}, so it is no saved system: pass a folder "
                              "written by save_pretrained, latentgraph train or latentgraph convert")
    if looks_like_path(name) and not path.exists():
        raise CheckpointError(f"{name!r} does not exist; check the path")
    raise CheckpointError(f"{name!r} is not '{DEFAULT}', a style ({', '.join(list_styles())}), a "
                          f"directory with a {CONFIG_NAME} or a system file ({', '.join(CONFIG_SUFFIXES)})")
