"""A system as data: the pydantic models that ``latentgraph_config.json`` holds.

``System.to_config()`` returns a :class:`SystemConfig`; ``System.from_config(config)`` builds the system
it describes (from the model, a dict, or a ``.json``/``.yaml`` file). ``save_pretrained`` writes exactly
``config.to_json()``. A link is described by the config class its type registered (see
:func:`latentgraph.register_link`), tagged on ``type``; its dims are not stored, they follow from the
backbones.

Configs are strict: a field of the wrong type (``"rounds": "3"``, ``true`` for a count), an out-of-range
value or an unknown field (a typo such as ``hiden_dim``) is an error naming the field. Built in Python the
error is a :class:`~latentgraph.GraphError`; read from a file it is a :class:`~latentgraph.CheckpointError`.
The one tolerance: a file written by a *newer* latentgraph may hold keys this version does not know;
they are dropped with a warning.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from ..errors import CheckpointError, GraphError, shown
from ..files.text import read_json, read_yaml
from ..version import __version__
from .conditions import ConditionField
from .config_base import ConfigModel, _validation_errors, describe_errors, parse_typed, typed_field
from .limits import AGENTS, EDGES, LATENT_STEPS, ROUNDS, Limit

CONFIG_NAME = "latentgraph_config.json"
WEIGHTS_NAME = "links.safetensors"
FORMAT_VERSION = 1
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")

Role = Literal["inner", "outer"]


def within(limit: Limit) -> AfterValidator:
    """A field validator refusing a number above ``limit`` (``None`` passes: the field's default applies)."""

    def check(value: int | None) -> int | None:
        if value is not None and (problem := limit.problem(value)):
            raise PydanticCustomError("limit", "{problem}", {"problem": problem})
        return value

    return AfterValidator(check)


def at_most(limit: Limit) -> BeforeValidator:
    """A field validator refusing a list longer than ``limit`` before any of its items is validated."""

    def check(value: Any) -> Any:
        if isinstance(value, list) and (problem := limit.problem(len(value))):
            raise PydanticCustomError("limit", "{problem}", {"problem": problem})
        return value

    return BeforeValidator(check)


class LinkConfig(ConfigModel):
    """What a link is: its registered ``type`` and that type's hyperparameters.

    ``role`` and the dims are filled in when the link is built in a graph (from the backbones' hidden
    sizes) and are not stored in ``latentgraph_config.json``. Each registered type has its own config
    class (``LnResConfig``, ``MLPConfig``, ... in :mod:`latentgraph.core.links`); a user type registered
    without one uses this class, which takes no other field.
    """

    type: str = "ln_res"
    role: Role | None = None
    in_dim: int | None = Field(None, ge=1)
    out_dim: int | None = Field(None, ge=1)

    def stored(self) -> dict[str, Any]:
        """The fields a file keeps: everything but role and dims, and no ``None`` that is a default."""
        fields = type(self).model_fields
        return {k: v for k, v in self.model_dump(mode="json", exclude={"role", "in_dim", "out_dim"}).items()
                if not (v is None and fields[k].default is None)}

    def without_placement(self) -> LinkConfig:
        """This config with role and dims unset, as a file holds it."""
        return type(self)(**self.stored())


# type name -> config class; filled by latentgraph.core.links.register_link
LINK_CONFIGS: dict[str, type[LinkConfig]] = {}
# the edge kinds' names; filled by latentgraph.core.edges.register_edge_kind
EDGE_MODES: set[str] = set()
OPTIONAL_EDGE_FIELDS = ("kv", "when")  # written only when set


def link_config_class(name: str) -> type[LinkConfig]:
    """The config class that the link type ``name`` registered."""
    if name not in LINK_CONFIGS:
        raise GraphError(f"unknown link type {name!r}; registered: {sorted(LINK_CONFIGS)}. "
                         "Register your own with @latentgraph.register_link")
    return LINK_CONFIGS[name]


def _link_fields(spec: Any) -> tuple[type[LinkConfig], dict[str, Any]] | LinkConfig:
    """The config class of a link spec's type and the fields to validate (or the spec, when it already is
    a config of its type's class). Raises ``ValueError`` for what is not a link spec at all."""
    if isinstance(spec, str):
        fields: dict[str, Any] = {"type": spec}
    elif isinstance(spec, LinkConfig):
        if type(spec) is LINK_CONFIGS.get(spec.type):
            return spec
        fields = {"type": spec.type, **spec.model_dump(exclude_unset=True)}
    elif isinstance(spec, dict):
        fields = dict(spec)
    else:
        raise ValueError(f"a link is a type name, a LinkConfig, a dict or an nn.Module, got {shown(spec)}")
    name = fields.get("type", "ln_res")
    if not isinstance(name, str):
        raise ValueError(f"a link type is the name of a registered type ({', '.join(sorted(LINK_CONFIGS))}), got "
                         f"{shown(name)}")
    if name not in LINK_CONFIGS:
        raise ValueError(f"unknown link type {name!r}; registered: {sorted(LINK_CONFIGS)}. "
                         "Register your own with @latentgraph.register_link")
    return LINK_CONFIGS[name], fields


def parse_link_config(spec: Any, where: str) -> LinkConfig:
    """A type name, a dict of fields or a :class:`LinkConfig`, as the config class of its type; a
    :class:`~latentgraph.GraphError` naming ``where`` and each bad field otherwise."""
    return parse_typed(_link_fields, spec, where, lambda fields: f"{fields.get('type', 'ln_res')!r} link config")


def _link_field(value: Any) -> LinkConfig:
    """Validator of link fields: the config class of the link's type (its errors keep their field path)."""
    return typed_field(_link_fields, value, "link_config")


class BackboneConfig(ConfigModel):
    """Where an agent's backbone comes from: a hub id or a local directory, and a hub revision."""

    name_or_path: str
    revision: str | None = None


class AgentConfig(ConfigModel):
    """An agent: its backbone, prompts, latent steps and inner link (see :class:`~latentgraph.Agent`)."""

    name: str
    backbone: BackboneConfig
    prompt: str = "{question}"
    feedback_prompt: str | None = None
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    latent_steps: Annotated[int, within(LATENT_STEPS)] = Field(32, ge=0)
    inner_link: LinkConfig = Field("ln_res", validate_default=True)

    @field_validator("backbone", mode="before")
    @classmethod
    def _backbone_shorthand(cls, value: Any) -> Any:
        return {"name_or_path": value} if isinstance(value, str) else value  # "backbone: some/dir" in a file

    @field_validator("inner_link", mode="before")
    @classmethod
    def _inner_link(cls, value: Any) -> LinkConfig:
        return _link_field(value)

    @field_serializer("inner_link")
    def _store_inner_link(self, link: LinkConfig) -> dict[str, Any]:
        return link.stored()


class EdgeConfig(ConfigModel):
    """A directed edge ``src -> dst`` of kind ``mode`` filling slot ``{slot}`` (default: ``src``; a KV edge
    fills none) of the receiver's prompt; a latent edge carries ``link`` (default ``ln_res``), the others none;
    ``kv`` is what a KV edge passes (``"all"`` when absent, or ``"thoughts"``); ``when``, the condition under which
    the edge carries its message (absent: always; see :mod:`~latentgraph.core.conditions`)."""

    src: str
    dst: str
    slot: str | None = None
    mode: str = "latent"
    feedback: bool = False
    link: LinkConfig | None = None
    kv: Literal["all", "thoughts"] | None = None
    when: ConditionField | None = None

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if value not in EDGE_MODES:
            raise PydanticCustomError("edge_mode", "{problem}",
                                      {"problem": f"an edge's mode is one of {sorted(EDGE_MODES)}, got {value!r}"})
        return value

    @field_validator("link", mode="before")
    @classmethod
    def _link(cls, value: Any) -> LinkConfig | None:
        return None if value is None else _link_field(value)

    @field_serializer("link")
    def _store_link(self, link: LinkConfig | None) -> dict[str, Any] | None:
        return None if link is None else link.stored()

    @model_serializer(mode="wrap")
    def _without_absent_options(self, handler: Any) -> dict[str, Any]:
        """A kind's options are written only where set, so a file without them reads as before they existed."""
        data = handler(self)
        for option in OPTIONAL_EDGE_FIELDS:
            if data.get(option) is None:
                data.pop(option, None)
        return data


class SystemConfig(ConfigModel):
    """A whole system: what ``latentgraph_config.json`` holds (keys and defaults: the Checkpoint formats page)."""

    format_version: int = Field(FORMAT_VERSION, ge=1)
    latentgraph_version: str | None = None
    rounds: Annotated[int, within(ROUNDS)] = Field(3, ge=1)
    answer: str | None = None
    agents: Annotated[list[AgentConfig], at_most(AGENTS)]
    subsystems: list[SubsystemConfig] = []
    edges: Annotated[list[EdgeConfig], at_most(EDGES)] = []

    @model_serializer(mode="wrap")
    def _without_absent_subsystems(self, handler: Any) -> dict[str, Any]:
        """Written only where there are some, so a flat system's file reads as before they existed."""
        data = handler(self)
        if not data.get("subsystems"):
            data.pop("subsystems", None)
        return data

    def to_json(self) -> str:
        """The JSON text ``save_pretrained`` writes."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    @classmethod
    def from_file(cls, path: str | Path) -> SystemConfig:
        """Read a ``.json`` or ``.yaml``/``.yml`` file; see :func:`read_config`."""
        return read_config(Path(path))


class SubsystemConfig(ConfigModel):
    """A nested system (:meth:`System.node <latentgraph.System.node>`): its node ``name``, the ``entry`` agents
    its in-edges deliver to, the ``rounds`` it runs inside each outer round and the ``system`` itself."""

    name: str
    entry: list[str]
    rounds: int = Field(1, ge=1)
    system: SystemConfig


SystemConfig.model_rebuild()


def read_config(path: Path) -> SystemConfig:
    """Read a system config from a JSON or YAML file (by suffix; anything else is read as JSON).

    Raises :class:`~latentgraph.CheckpointError` naming the file and each bad field. Unknown keys are
    dropped with a warning when the file was written by a newer latentgraph, and are errors otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} is missing: is {path.parent} a latentgraph checkpoint (save_pretrained)?")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; a system config is a .json or .yaml file")
    read = read_yaml if path.suffix.lower() in (".yaml", ".yml") else read_json
    raw = read(path, error=CheckpointError)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not describe a system: it holds a {type(raw).__name__}, not a mapping")
    version = raw.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {shown(version)}; this latentgraph reads up to "
                              f"{FORMAT_VERSION}: upgrade latentgraph")
    unknown = _drop_unknown(raw)
    if unknown:
        written = raw.get("latentgraph_version")
        if _newer(written):
            warnings.warn(f"{path}: ignoring unknown keys {unknown} (written by latentgraph {written}, newer "
                          "than this one)", stacklevel=3)
        else:
            raise CheckpointError(f"{path} has unknown keys {unknown}: a typo? Remove or rename them (only files "
                                  "written by a newer latentgraph may hold keys this version does not know)")
    try:
        with _validation_errors():
            return SystemConfig.model_validate(raw)
    except ValidationError as e:
        raise CheckpointError(f"{path} does not describe a system: {describe_errors(e)}") from None


def _newer(version: Any) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v)[:3])

    return isinstance(version, str) and parts(version) > parts(__version__)


def _drop_unknown(raw: dict, where: str = "config") -> list[str]:
    """Remove, in place, the keys the config models do not have; return their dotted paths."""
    found = _drop(raw, SystemConfig, where)
    for i, agent in enumerate(raw.get("agents") or []):
        if isinstance(agent, dict):
            found += _drop(agent, AgentConfig, f"{where}.agents[{i}]")
            if isinstance(agent.get("backbone"), dict):
                found += _drop(agent["backbone"], BackboneConfig, f"{where}.agents[{i}].backbone")
            found += _drop_link(agent.get("inner_link"), f"{where}.agents[{i}].inner_link")
    for i, sub in enumerate(raw.get("subsystems") or []):
        if isinstance(sub, dict):
            found += _drop(sub, SubsystemConfig, f"{where}.subsystems[{i}]")
            if isinstance(sub.get("system"), dict):
                found += _drop_unknown(sub["system"], f"{where}.subsystems[{i}].system")
    for i, edge in enumerate(raw.get("edges") or []):
        if isinstance(edge, dict):
            found += _drop(edge, EdgeConfig, f"{where}.edges[{i}]")
            found += _drop_link(edge.get("link"), f"{where}.edges[{i}].link")
    return found


def _drop_link(link: Any, where: str) -> list[str]:
    name = link.get("type", "ln_res") if isinstance(link, dict) else None
    if not isinstance(name, str) or name not in LINK_CONFIGS:  # a list or dict as type cannot even be looked up
        return []  # validation reports it
    return _drop(link, LINK_CONFIGS[name], where)


def _drop(raw: dict, model: type[BaseModel], where: str) -> list[str]:
    unknown = [key for key in raw if key not in model.model_fields]
    for key in unknown:
        del raw[key]
    return [f"{where}.{key}" for key in unknown]
