"""The base of latentgraph's configs: strict pydantic models whose errors name each bad field.

:mod:`~latentgraph.core.config` (a system as data) and :mod:`~latentgraph.core.conditions` (an edge's condition)
both build on it; it lives apart so that a system's config can hold conditions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

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
