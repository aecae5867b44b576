"""What the commands share to choose, place and load a system: the style name, the placement flags (parsed for
:func:`latentgraph.load`), and loading with warnings as lines; and the console they report on."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from .errors import InputError, shown
from .files.text import NotJSON, parse_json

console = Console(stderr=True)  # progress and errors; results go to stdout
DEFAULT = "default"
DEVICE_MAP_HELP = ("Spread each backbone over several GPUs with CPU or disk offload (needs accelerate): auto, "
                   "balanced, balanced_low_0, sequential, or a JSON object of module: device, e.g. "
                   '\'{"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu"}\'. Instead of --device.')
MAX_MEMORY_HELP = ("With --device-map: the most each device may hold (bytes, or a size with a unit), e.g. "
                   "0=20GiB,1=20GiB,cpu=60GiB.")
OFFLOAD_HELP = "With --device-map: the directory for weights offloaded to disk."
LINK_DTYPE_HELP = ("What the links compute in: float32 (exact published values, no bf16 rounding), auto (the dtype "
                   "their files hold: bf16 for the published styles, their numerics), bfloat16, float16 or float64.")
UNSANDBOXED_HELP = ("Run model-written code (the Python tool, code scoring) even where the sandbox lacks protections "
                    "(no bubblewrap, say), with whatever this machine has. Off: such code does not run.")


def placement(device: str | None, device_map: str | None, max_memory: str | None,
              offload_folder: Path | None) -> dict[str, Any]:
    """The backbones' placement options of ``run`` and ``eval``, parsed for :func:`latentgraph.load`."""
    layout: Any = device_map
    if device_map is not None and device_map.lstrip().startswith("{"):
        try:
            layout = parse_json(device_map)
        except NotJSON as e:
            raise InputError(f"--device-map is {e}; pass a JSON object, e.g. "
                             '\'{"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu"}\', or auto') from None
    limits = None
    if max_memory is not None:
        limits = {}
        for entry in max_memory.split(","):
            where, equals, size = entry.strip().partition("=")
            if not (equals and where.strip() and size.strip()):
                raise InputError(f"--max-memory takes device=size pairs separated by commas, e.g. "
                                 f"0=20GiB,cpu=60GiB; got {shown(max_memory)}")
            where, size = where.strip(), size.strip()
            try:
                limits[int(where) if where.isdecimal() else where] = int(size) if size.isdecimal() else size  # bytes
            except ValueError:  # more digits than int() converts: no device index or size is that long
                raise InputError(f"--max-memory {shown(entry.strip())}: a number of thousands of digits is neither a "
                                 "device index nor a size; pass e.g. 0=20GiB,cpu=60GiB") from None
    return {"device": device, "device_map": layout, "max_memory": limits, "offload_folder": offload_folder}


def load(style: str, **kwargs):
    """:func:`latentgraph.load`, with its warnings as one ``warning:`` line each and without transformers'
    per-tensor progress bars (the command shows its own)."""
    from transformers.utils.logging import disable_progress_bar

    from .checkpoints.loading import load as load_system

    disable_progress_bar()
    with warnings.catch_warnings(record=True) as caught:
        system = load_system(style, **kwargs)
    for warning in caught:
        console.print(f"[yellow]warning:[/] {escape(str(warning.message))}", highlight=False, soft_wrap=True)
    return system
