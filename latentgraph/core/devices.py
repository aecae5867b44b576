"""Where a backbone runs: one device, or a device map that spreads it over several GPUs with CPU or disk
offload, through accelerate.

A backbone given ``device_map=`` (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` or a
``{module: device}`` dict) is loaded by transformers' ``from_pretrained(device_map=..., max_memory=...,
offload_folder=...)``, which hands the placement to accelerate. Offloaded modules keep their weights on the
CPU or on disk and run, through accelerate's hooks, on an execution device.

Everything latentgraph places itself (prompt embeddings, the inner link, incoming outer links, sampling
generators) goes where the input embeddings execute: :func:`execution_device`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOADED = ("cpu", "disk")  # device-map values whose modules run on the execution device, not where they sit
MEMORY_KEYS = ("cpu", "disk", "mps")  # max_memory keys besides GPU indices


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` means CUDA when available, else CPU; a device this machine lacks is an :class:`InputError`."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:1', 'mps', ...") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} was asked for, but CUDA is not available on this machine "
                         "(no GPU, or a CPU-only torch); use device 'cpu' or leave it unset")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r} was asked for, but MPS is not available here; use 'cpu'")
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``None`` means bf16 on a GPU that supports it and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not (isinstance(resolved, torch.dtype) and resolved.is_floating_point):
        raise InputError(f"unknown dtype {dtype!r}; use a floating-point dtype such as 'float32' or 'bfloat16'")
    return resolved


@dataclass(frozen=True)
class DeviceMap:
    """A validated device map and its limits, as ``from_pretrained`` takes them."""

    device_map: str | dict[str, int | str]
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: str | None = None

    def key(self) -> tuple:
        """Hashable: backbones loaded with equal maps are one backbone."""
        layout = self.device_map if isinstance(self.device_map, str) else tuple(sorted(self.device_map.items()))
        memory = tuple(sorted(self.max_memory.items(), key=str)) if self.max_memory else None
        return layout, memory, self.offload_folder

    def main_device(self) -> torch.device:
        """The first GPU the map uses (what picks the default dtype); CPU if it uses none."""
        if isinstance(self.device_map, str):
            return default_device()
        gpus = [_as_device(d) for d in self.device_map.values() if d not in OFFLOADED]
        return gpus[0] if gpus else torch.device("cpu")

    def kwargs(self) -> dict[str, Any]:
        return {"device_map": self.device_map, "max_memory": self.max_memory, "offload_folder": self.offload_folder}

    def __str__(self) -> str:
        return f"device_map={self.device_map!r}"


def device_map_from(device: Any, device_map: Any, max_memory: Any, offload_folder: Any) -> DeviceMap | None:
    """Check the placement options of a backbone loaded from a hub id or a directory; ``None`` when no
    device map is asked for (then ``device`` alone places it)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise InputError("max_memory and offload_folder limit what a device map puts where; add "
                             "device_map='auto' (or a {module: device} dict), or drop them")
        return None
    if device is not None:
        raise InputError(f"device={device!r} and device_map={device_map!r} both place the backbone; pass device= "
                         "for one device, or device_map= to spread it over several (with offload), not both")
    if importlib.util.find_spec("accelerate") is None:
        raise InputError("device_map= needs the accelerate package: pip install accelerate")
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise InputError(f"device_map={device_map!r} is not one of {STRATEGIES} nor a {{module: device}} dict; "
                             f"to put the whole backbone on one device, pass device={device_map!r}")
    elif isinstance(device_map, dict) and device_map:
        for module, where in device_map.items():
            if not isinstance(module, str):
                raise InputError(f"device_map keys are module names such as 'model.layers.0', got {module!r}")
            if where not in OFFLOADED:
                _check_device(where, f"device_map[{module!r}]")
        device_map = dict(device_map)
    else:
        raise InputError(f"device_map must be one of {STRATEGIES} or a {{module: device}} dict such as "
                         f"{{'model.embed_tokens': 0, 'model.layers': 1, 'lm_head': 'cpu'}}, got {device_map!r}")
    if offload_folder is not None and not isinstance(offload_folder, (str, Path)):
        raise InputError(f"offload_folder must be a directory path, got {offload_folder!r}")
    return DeviceMap(device_map, _checked_memory(max_memory),
                     str(Path(offload_folder).expanduser()) if offload_folder is not None else None)


def _checked_memory(max_memory: Any) -> dict[int | str, int | str] | None:
    """``{0: "20GiB", "cpu": "60GiB"}``: a GPU index or cpu/disk/mps, each with bytes or a size string."""
    if max_memory is None:
        return None
    if not isinstance(max_memory, dict) or not max_memory:
        raise InputError(f"max_memory must map devices to sizes, e.g. {{0: '20GiB', 'cpu': '60GiB'}}, got "
                         f"{max_memory!r}")
    from accelerate.utils import convert_file_size_to_int

    checked: dict[int | str, int | str] = {}
    for where, size in max_memory.items():
        if isinstance(where, str) and where.startswith("cuda:") and where[5:].isdigit():
            where = int(where[5:])  # accelerate names GPUs by index
        if isinstance(where, bool) or not (isinstance(where, int) or where in MEMORY_KEYS):
            raise InputError(f"max_memory key {where!r} is not a GPU index (0, 1, ...) nor one of {MEMORY_KEYS}")
        if isinstance(where, int):
            _check_device(where, "max_memory")
        try:
            if isinstance(size, bool) or convert_file_size_to_int(size) < 0:
                raise ValueError
        except (ValueError, TypeError):
            raise InputError(f"max_memory[{where!r}] = {size!r} is not a size; use bytes (an integer) or a string "
                             "such as '20GiB' or '500MB'") from None
        checked[where] = size
    return checked


def _check_device(where: Any, what: str) -> None:
    if isinstance(where, bool) or not isinstance(where, (int, str)):
        raise InputError(f"{what}: {where!r} is not a device; use a GPU index, 'cuda:1', 'cpu' or 'disk'")
    if isinstance(where, int) and where < 0:
        raise InputError(f"{what}: GPU index {where} is negative")
    try:
        resolve_device(_as_device(where))
    except InputError as e:
        raise InputError(f"{what}: {e}") from None


def _as_device(where: int | str) -> torch.device:
    return torch.device("cuda", where) if isinstance(where, int) else torch.device(where)


def check_modules(model: nn.Module, placement: DeviceMap, source: str) -> None:
    """A dict map must name modules the model has (transformers ignores names it does not know)."""
    if isinstance(placement.device_map, str):
        return
    names = dict(model.named_modules())
    unknown = [module for module in placement.device_map if module not in names]
    if unknown:
        top = [name for name in names if name and "." not in name]
        raise InputError(f"backbone {source!r}: device_map names {unknown}, which it does not have; its modules "
                         f"are named like {top} and their children ('model.layers.0', ...)")


def execution_device(model: nn.Module) -> torch.device:
    """Where the input embeddings run: the execution device of accelerate's hook on them (their weights may sit
    offloaded, on ``meta``), else where their weights are."""
    for module in (model.get_input_embeddings(), model):
        hook = getattr(module, "_hf_hook", None)
        for each in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
            if getattr(each, "execution_device", None) is not None:
                return _as_device(each.execution_device)
    return model.get_input_embeddings().weight.device


def devices(model: nn.Module) -> frozenset[torch.device]:
    """Every device the model's layers run on: one, unless a device map spreads it over several GPUs."""
    layout = getattr(model, "hf_device_map", None) or {}
    running = {_as_device(where) for where in layout.values() if where not in OFFLOADED}
    return frozenset(running or {execution_device(model)})
