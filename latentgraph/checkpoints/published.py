"""The styles, loaded by name into editable :class:`System` objects: the published RecursiveMAS systems, and
training-free styles built on the embedded backbone (``latent_mas``).

Each agent's hub repo holds a full base model and its inner link(s) as pickled state dicts: one per task
(``adapter(math).pt``, ``adapter(code).pt``, named by ``innerlink_config.json``) or one for all
(``adapter.pt``). The style's outer-link repo holds one ``.pt`` per edge, named in
``outerlink_config.json`` by a legacy key (``outer_12``, ``outer_1s``, ...), either as
``{"adapters": [...]}`` or per task as ``{"tasks": {task: {"adapters": [...]}}}``. Pickles are read with
``torch.load(weights_only=True)``; every tensor is checked against the shapes the backbones imply.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from ..core.backbone import Backbone, get_backbone
from ..core.system import System
from ..errors import CheckpointError, InputError
from ..files.hub import fetch
from ..files.text import read_json
from ..tools.base import Tool
from .link_dtype import LinkDtype, cast_links, check_link_dtype, load_link_state
from .native import check_shape, load_pickled_state_dict

TASKS = ("math", "code")
LINK_PATTERNS = ["*.json", "*.pt"]  # what a link repo snapshot needs; backbones fetch their own files


def list_styles() -> list[str]:
    """The names of the styles: the published ones, then the training-free ones."""
    from ..styles import STYLES

    return list(STYLES)


def published_styles() -> list[str]:
    """The names of the styles with published checkpoints."""
    from ..styles import PUBLISHED

    return list(PUBLISHED)


def style_module(name: str) -> ModuleType:
    if name not in list_styles():
        raise CheckpointError(f"unknown style {name!r}; the styles are {list_styles()}")
    return importlib.import_module(f"latentgraph.styles.{name}")


def load_style(name: str, task: str = "math", *, revision: str | dict[str, str] | None = None,
               checkpoints: dict[str, str] | None = None, backbones: dict[str, Any] | None = None,
               device: Any = None, dtype: Any = None, device_map: Any = None, max_memory: Any = None,
               offload_folder: Any = None, load_weights: bool = True, tools: list[Tool] | None = None,
               trust_remote_code: bool = False, link_dtype: Any = "float32") -> System:
    """A style as an editable :class:`System`: a published one with its published link weights, or a
    training-free one (``"latent_mas"``) on the embedded backbone with its links fitted in closed form.

    Args:
        name: a style from :func:`list_styles` (``"sequential_light"``, ``"mixture"``, ``"latent_mas"``, ...).
        task: ``"math"`` or ``"code"``: which inner links to load where an agent has one per task (use
            ``"code"`` for code benchmarks, ``"math"`` for everything else), and which answer format the
            prompts ask for.
        revision: hub revision for every repo, or ``{role: revision}`` (``"links"`` for the outer links).
            Published styles only.
        checkpoints: ``{role: repo_or_directory}`` to use instead of the published repo of a role
            (``"links"`` for the outer links). Published styles only.
        backbones: ``{role: backbone}`` to run a role on another backbone (a hub id, a directory, a
            ``(model, tokenizer)`` pair or a ``Backbone``). In a published style, that agent's inner link and
            the outer links touching it start fresh (random), with a warning: retrain them. In a training-free
            style, the links are fitted in closed form on that backbone too.
        device: where the backbones run; dtype: their dtype.
        device_map, max_memory, offload_folder: instead of ``device``, spread each backbone over several GPUs
            with CPU or disk offload (see :class:`~latentgraph.Agent`); not for ``backbones=`` given loaded.
        load_weights: ``False`` gives the graph with fresh links (for rendering, or training from scratch); a
            training-free style then skips its closed-form fit.
        tools: the tools of the style's tool-using agent (deliberation's tool-caller), instead of the style's
            default ones; ``[]`` for none. Styles without such an agent refuse it.
        trust_remote_code: accepted so that the published model cards' snippet
            (``load_style("distillation", device="cuda", trust_remote_code=True)``) runs as written. It changes
            nothing, ``True`` included: every backbone loads with ``trust_remote_code=False``, since latentgraph
            never runs code from a model's repository (:mod:`~latentgraph.core.repository_code`), and every
            published backbone is a standard transformers architecture, which needs none.
        link_dtype: what the links hold their parameters and compute in: ``"float32"`` (default; the published
            bf16 values load exactly), ``"auto"`` (the dtype of the link files, bf16: the published numerics),
            or another dtype (``"bfloat16"``, ``torch.float16``, ...). Links without a file (``load_weights=False``,
            swapped backbones) are fp32 under ``"auto"``. See :mod:`latentgraph.checkpoints.link_dtype`.
    """
    style = style_module(name)
    link_dtype = check_link_dtype(link_dtype)
    if task not in TASKS:
        raise CheckpointError(f"task must be one of {TASKS}, got {task!r}")
    if tools is not None and not hasattr(style, "TOOL_AGENT"):
        raise InputError(f"style '{name}' has no agent that uses tools; tools= applies to "
                         f"{[s for s in list_styles() if hasattr(style_module(s), 'TOOL_AGENT')]}")
    spread = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    if name not in published_styles():
        system = _training_free(name, style, task, revision=revision, checkpoints=checkpoints, backbones=backbones,
                                fit=load_weights, device=device, dtype=dtype, spread=spread)
        cast_links(system.link_modules(), link_dtype)
        return system
    roles = [role for role in style.CHECKPOINTS if role != "links"]
    revisions = revision if isinstance(revision, dict) else dict.fromkeys(style.CHECKPOINTS, revision)
    for given, what in ((checkpoints, "checkpoints"), (backbones, "backbones"), (revisions, "revision")):
        unknown = set(given or {}) - set(style.CHECKPOINTS)
        if unknown:
            raise CheckpointError(f"{what}= names {sorted(unknown)}, not roles of style '{name}': "
                                  f"{[*roles, 'links']}")
    repos = {**style.CHECKPOINTS, **(checkpoints or {})}
    swapped = backbones or {}
    members = {role: _backbone(swapped[role], device, dtype, spread) if role in swapped else
               get_backbone(repos[role], revision=revisions.get(role), device=device, dtype=dtype, **spread)
               for role in roles}
    system = style.build(members, task=task, **({"tools": tools} if tools is not None else {}))
    cast_links(system.link_modules(), link_dtype)
    if not load_weights:
        return system
    if swapped:
        warnings.warn(f"style '{name}': backbones replaced for {sorted(swapped)}; their inner links and the outer "
                      "links touching them start fresh (random): train them before use", stacklevel=2)
    for role in roles:
        if role not in swapped:
            directory = fetch(repos[role], revision=revisions.get(role), allow=LINK_PATTERNS)
            _load_link(system.agents[role].inner_link, inner_link_file(directory, task), link_dtype)
    needed = {key for key, (src, dst) in style.LEGACY_KEYS.items() if src not in swapped and dst not in swapped}
    if not needed:  # every edge touches a swapped backbone: no published outer link applies
        return system.validate()
    directory = fetch(repos["links"], revision=revisions.get("links"), allow=LINK_PATTERNS)
    manifest = directory / "outerlink_config.json"
    loaded = set()
    for key, filename in outer_link_files(manifest, task).items():
        if key not in style.LEGACY_KEYS:
            raise CheckpointError(f"{manifest} names outer link '{key}', which style '{name}' does not have; "
                                  f"its links are {sorted(style.LEGACY_KEYS)}")
        src, dst = style.LEGACY_KEYS[key]
        if src not in swapped and dst not in swapped:
            _load_link(system.links[f"{src}->{dst}"], directory / filename, link_dtype)
            loaded.add(key)
    if needed - loaded:
        raise CheckpointError(f"{manifest} does not list the outer links {sorted(needed - loaded)} of style '{name}'")
    return system.validate()


def _training_free(name: str, style: ModuleType, task: str, *, revision: Any, checkpoints: Any, backbones: Any,
                   fit: bool, device: Any, dtype: Any, spread: dict[str, Any]) -> System:
    """A training-free style: built on the embedded backbone (or the ones given), links fitted in closed form."""
    refused = [option for option, value in (("revision=", revision), ("checkpoints=", checkpoints)) if value]
    if refused:
        raise CheckpointError(f"style '{name}' is training-free: it has no published checkpoint, so "
                              f"{' and '.join(refused)} {'do' if len(refused) > 1 else 'does'} not apply; drop "
                              f"{'them' if len(refused) > 1 else 'it'} "
                              "(backbones= runs its roles on another backbone)")
    unknown = set(backbones or {}) - set(style.ROLES)
    if unknown:
        raise CheckpointError(f"backbones= names {sorted(unknown)}, not roles of style '{name}': {list(style.ROLES)}")
    loaded: dict[int, Backbone] = {}  # one Backbone per source, so that roles given the same one share it
    for source in (backbones or {}).values():
        loaded.setdefault(id(source), _backbone(source, device, dtype, spread))
    given = {role: loaded[id(source)] for role, source in (backbones or {}).items()}
    return style.build_default(given, task=task, fit=fit, device=device, dtype=dtype, **spread)


def inner_link_file(directory: Path, task: str) -> Path:
    """The inner-link file of an agent repo for ``task``: from ``innerlink_config.json``, else
    ``adapter(<task>).pt``, else ``adapter.pt``."""
    manifest = directory / "innerlink_config.json"
    if manifest.exists():
        tasks = _read_json(manifest).get("tasks", {})
        if task not in tasks:
            raise CheckpointError(f"{manifest} has no inner link for task '{task}'; it has {sorted(tasks)}")
        return directory / tasks[task]["adapter.pt"]
    for candidate in (f"adapter({task}).pt", "adapter.pt"):
        if (directory / candidate).exists():
            return directory / candidate
    raise CheckpointError(f"{directory} has no inner link: expected innerlink_config.json, adapter({task}).pt "
                          "or adapter.pt")


def outer_link_files(manifest: Path, task: str) -> dict[str, str]:
    """``{legacy_key: filename}`` from an ``outerlink_config.json`` in either published shape."""
    if not manifest.exists():
        raise CheckpointError(f"{manifest} is missing: the outer-link repo must list its links there")
    data = _read_json(manifest)
    if "tasks" in data:
        if task not in data["tasks"]:
            raise CheckpointError(f"{manifest} has no outer links for task '{task}'; it has {sorted(data['tasks'])}")
        data = data["tasks"][task]
    try:
        return {entry["legacy_key"]: entry["filename"] for entry in data["adapters"]}
    except (KeyError, TypeError):
        raise CheckpointError(f"{manifest} must hold {{\"adapters\": [{{\"legacy_key\": ..., \"filename\": ...}}]}}, "
                              "optionally under {\"tasks\": {task: ...}}") from None


def _load_link(link: nn.Module, path: Path, link_dtype: LinkDtype) -> None:
    state = load_pickled_state_dict(path)
    expected = link.state_dict()
    if set(state) != set(expected):
        raise CheckpointError(f"{path}: keys {sorted(state)} do not match the link's {sorted(expected)}")
    for key, tensor in state.items():
        check_shape(tensor, expected[key], key, str(path))
    load_link_state(link, state, link_dtype)


def _read_json(path: Path) -> dict:
    return read_json(path, error=CheckpointError)


def _backbone(source: Any, device: Any, dtype: Any, spread: dict[str, Any]) -> Backbone:
    model, tokenizer = source if isinstance(source, tuple) else (source, None)
    return get_backbone(model, tokenizer=tokenizer, device=device, dtype=dtype, **spread)
