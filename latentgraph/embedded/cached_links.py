"""Links fitted in closed form on the bundled calibration corpus, computed once per machine and cached.

A fit over the calibration texts takes from seconds to a minute on a CPU, and gives the same links every time
for the same backbones, corpus and recipe; so the first call saves them beside the converted backbones, and
later calls read them back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib.resources import files
from typing import Any

from safetensors.torch import load_file

from ..checkpoints.link_dtype import DEFAULT, LinkDtype
from ..checkpoints.native import WEIGHTS_NAME, assign
from ..core.system import System
from .backbones import cache_dir

CALIBRATION = files("latentgraph") / "data" / "gsm8k_calibration.jsonl"


def fit_once(system: System, name: str, recipe: str, fit: Callable[[], Any], *,
             link_dtype: LinkDtype = DEFAULT) -> System:
    """Give ``system`` the links ``fit()`` writes into it, fitting only when no earlier call cached them.

    ``name`` begins the cache folder's name; ``recipe`` (the backbones, and a version to bump when the graph, the
    link types or the fit change) and the calibration corpus key it. ``link_dtype``: what the links compute in
    (checked by :func:`~latentgraph.checkpoints.link_dtype.check_link_dtype`).
    """
    key = hashlib.sha256(recipe.encode() + CALIBRATION.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / "systems" / f"{name}-{key}"
    if not (cached / WEIGHTS_NAME).exists():
        fit()
        cached.parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(dir=cached.parent, prefix=f".{cached.name}.")
        system.save_pretrained(scratch)
        try:
            os.rename(scratch, cached)  # atomic: a folder that exists is complete
        except OSError:  # another process finished first; its links are the same
            shutil.rmtree(scratch, ignore_errors=True)
    assign(system.link_modules(), load_file(cached / WEIGHTS_NAME), source=str(cached / WEIGHTS_NAME),
           link_dtype=link_dtype)
    return system
