"""The base of latentgraph's configs: strict pydantic models whose errors name each bad field.

:mod:`~latentgraph.core.config` (a system as data) and :mod:`~latentgraph.core.conditions` (an edge's condition)
both build on it; it lives apart so that a system's config can hold conditions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from ..errors import GraphError

_AS_GRAPH_ERROR: ContextVar[bool] = ContextVar("latentgraph_config_as_graph_error", default=True)


@contextmanager
def _validation_errors() -> Iterator[None]:
    """Within this block configs raise pydantic's ``ValidationError`` (for callers that report it)."""
    token = _AS_GRAPH_ERROR.set(False)
    try:
        yield
    finally:
        _AS_GRAPH_ERROR.reset(token)


class ConfigModel(BaseModel):
    """Base of latentgraph's configs: strict types, no unknown fields, and building one in Python raises a
    :class:`~latentgraph.GraphError` that names each bad field."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def __init__(self, **data: Any):
        if not _AS_GRAPH_ERROR.get():  # nested in another config's validation: that one reports, with the path
            super().__init__(**data)
            return
        with _validation_errors():
            try:
                super().__init__(**data)
            except ValidationError as e:
                raise GraphError(f"invalid {type(self).__name__}: {describe_errors(e)}") from None


def describe_errors(error: ValidationError) -> str:
    """One line per problem: the dotted field path and what is wrong with it."""
    problems = []
    for err in error.errors():
        where = ".".join(map(str, err["loc"])) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown field (a typo? remove or rename it)")
        else:
            problems.append(f"{where}: {err['msg']}")
    return "; ".join(problems)


# What a registry of typed configs (link types, condition types) finds for a spec: the config itself when it is
# already one of its type's class, else that class and the fields to validate; ValueError for what is no spec.
Find = Callable[[Any], "ConfigModel | tuple[type[ConfigModel], dict[str, Any]]"]


def parse_typed(find: Find, spec: Any, where: str, what: Callable[[dict[str, Any]], str]) -> Any:
    """``spec`` as the config class its type registered; a GraphError naming ``where``, each bad field and the
    class's fields otherwise. ``what(fields)`` names the spec in the message (``"'ln_res' link config"``)."""
    try:
        found = find(spec)
    except ValueError as e:
        raise GraphError(f"{where}: {e}") from None
    if not isinstance(found, tuple):
        return found
    cls, fields = found
    try:
        with _validation_errors():
            return cls.model_validate(fields)
    except ValidationError as e:
        raise GraphError(f"{where}: invalid {what(fields)}: {describe_errors(e)}; its fields are: "
                         f"{', '.join(cls.model_fields)}") from None


def typed_field(find: Find, value: Any, error: str) -> Any:
    """A field validator's view of :func:`parse_typed`: the config, with errors that keep their field path."""
    try:
        found = find(value)
    except ValueError as e:
        raise PydanticCustomError(error, "{problem}", {"problem": str(e)}) from None
    return found[0].model_validate(found[1]) if isinstance(found, tuple) else found
