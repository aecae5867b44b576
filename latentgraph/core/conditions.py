"""Conditions on edges: whether an edge carries its message, decided per row (question) of a batch and per round.

A condition is data, like a link: a dict ``{"type": <name>, ...fields}`` in ``latentgraph_config.json``, tagged on
``type``, whose class the name registered. The built-ins are ``rounds`` (:class:`InRounds`), ``said``
(:class:`Said`) and ``not`` (:class:`Not`); :func:`register_condition` adds a user function under a name of its
own. Each one decides from a :class:`RouteState`, the little a router may look at: the round, how many rounds the
run unrolls, the questions and what the agents said so far.

Conditions are strict configs: an unknown field, a field of the wrong type or a pattern that does not compile is
a :class:`~latentgraph.GraphError` naming the field. What a condition returns at run time is checked too (one
``bool`` per row), so a user function that returns anything else stops the run instead of routing at random.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, PlainSerializer, create_model, field_validator
from pydantic_core import PydanticCustomError

from ..errors import GraphError, InputError, shown
from .config_base import ConfigModel, parse_typed, typed_field
from .limits import PATTERN_CHARS, ROUNDS


@dataclass(frozen=True)
class RouteState:
    """What a condition decides from, in one round of a run.

    Attributes:
        round: the round being run, from 1.
        rounds: how many rounds the run unrolls (``R``), so ``round == rounds`` is the last one.
        questions: the batch's questions, one per row.
        said: per agent, the latest text it spoke for each row, in this round or an earlier one; an agent that has
            not spoken is absent, and a row it has not spoken for (its edges were off there) holds ``None``.
    """

    round: int
    rounds: int
    questions: Sequence[str]
    said: Mapping[str, Sequence[str | None]]

    @property
    def rows(self) -> int:
        return len(self.questions)


class Condition(ConfigModel):
    """Base class of conditions: a frozen config, equal to another when its type and fields are.

    The built-ins subclass it: each declares its fields, sets ``type`` to a ``Literal`` of its name, and implements
    :meth:`rows`, :meth:`describe` and, when it reads agents' texts, :meth:`reads`. A user condition is a function
    instead, which :func:`register_condition` turns into a subclass.
    """

    type: str

    def on(self, state: RouteState, where: str = "") -> list[bool]:
        """Per row of ``state``, whether the edge carries its message. Anything but one ``bool`` per row is an
        :class:`~latentgraph.InputError` naming this condition, after ``where`` (the edge) when given."""
        try:
            result = self.rows(state)
        except InputError as e:  # from a condition nested in this one, or raised by a user function
            if not where:
                raise
            raise InputError(f"{where}: {e}") from None
        if problem := _wrong_result(result, state.rows):
            raise InputError(f"{where + ': ' if where else ''}the condition {self.describe()!r} returned {problem}: "
                             f"a condition returns a list of {state.rows} True/False values, one per question; "
                             "make it do so (bool(x) turns a numpy or torch boolean into one)")
        return list(result)

    def rows(self, state: RouteState) -> Any:
        """The decision per row, unchecked (:meth:`on` checks it)."""
        raise GraphError(f"{type(self).__name__} does not implement Condition.rows: implement it, or register a "
                         "function with register_condition instead")

    def reads(self) -> frozenset[str]:
        """The agents whose text this condition reads: they must speak before the edge's sender runs."""
        return frozenset()

    def fixed(self, round_: int, rounds: int) -> bool | None:
        """Its decision for every row of round ``round_`` of ``rounds`` when only the round decides it (a plan
        resolves it when compiled); ``None`` when it depends on the run."""
        return None

    def describe(self) -> str:
        """A short label for diagrams and plan tables."""
        return self.type

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict a config file holds, ``type`` first; :func:`parse_condition` reads it back."""
        fields = self.model_dump(mode="json")
        return {"type": self.type, **{k: v for k, v in fields.items() if k != "type"}}

    def __hash__(self) -> int:
        # By the stored form: a user condition's list field has no hash of its own, and a plan is cached by
        # its graph's edges, conditions included.
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def _wrong_result(result: Any, rows: int) -> str | None:
    """What is wrong with a condition's result for ``rows`` rows, in words; ``None`` when it is right."""
    if not isinstance(result, list | tuple):
        return f"a {type(result).__name__} ({shown(result)})"
    if len(result) != rows:
        return f"{len(result)} values for {rows} questions"
    for row, value in enumerate(result):
        if type(value) is not bool:  # 1, "yes" or a numpy bool would route by accident of truthiness
            return f"{shown(value)} ({type(value).__name__}, not bool) for row {row}"
    return None


# type name -> condition class; built-ins and register_condition fill it
CONDITIONS: dict[str, type[Condition]] = {}


def _register(cls: type[Condition]) -> type[Condition]:
    CONDITIONS[cls.model_fields["type"].default] = cls
    return cls


def _condition_fields(spec: Any) -> Condition | tuple[type[Condition], dict[str, Any]]:
    """A spec's condition class and the fields to validate (or the spec, when it already is a registered
    condition). Raises ``ValueError`` for what is not a condition spec at all."""
    if isinstance(spec, Condition):
        if type(spec) is CONDITIONS.get(spec.type):
            return spec
        spec = spec.to_dict()
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"a condition is a dict such as {{'type': 'rounds', 'rounds': [1]}}, a registered "
                         f"condition's name or a Condition, got {shown(spec)}")
    name = spec.get("type")
    if not isinstance(name, str):
        raise ValueError(f"a condition's 'type' is the name of a registered condition "
                         f"({', '.join(sorted(CONDITIONS))}), got {shown(name)}")
    if name not in CONDITIONS:
        raise ValueError(f"unknown condition type {shown(name)}; registered: {sorted(CONDITIONS)}. Register it with "
                         f"@latentgraph.core.conditions.register_condition({name!r}) before loading")
    return CONDITIONS[name], dict(spec)


def parse_condition(spec: Any, where: str) -> Condition:
    """A :class:`Condition`, a dict of its fields or a registered name (a condition without fields), as the class
    its type registered; a :class:`~latentgraph.GraphError` naming ``where`` and each bad field otherwise."""
    return parse_typed(_condition_fields, spec, where, lambda fields: f"{fields['type']!r} condition")


def _condition_field(value: Any) -> Condition:
    """Validator of condition fields: the class of the condition's type (its errors keep their field path)."""
    return typed_field(_condition_fields, value, "condition")


ConditionField = Annotated[Condition, BeforeValidator(_condition_field),
                           PlainSerializer(lambda condition: condition.to_dict(), return_type=dict)]
"""The type of a config field holding a condition (``when: ConditionField | None = None``): it reads any spec
:func:`parse_condition` reads, reports bad fields under the field's path, and stores :meth:`Condition.to_dict`."""


# ---- built-ins ----

ROUND_WORDS = ("last", "not_last")  # the rounds named relative to R, which only a run knows


def _round(value: Any) -> int | str:
    """One entry of ``InRounds.rounds``: a round number >= 1, ``"last"`` or ``"not_last"``."""
    if value in ROUND_WORDS and isinstance(value, str):
        return value
    if type(value) is not int or value < 1:
        raise PydanticCustomError("round", "{problem}", {
            "problem": f"a round is a number from 1, 'last' or 'not_last'; got {shown(value)}"})
    if problem := ROUNDS.problem(value):
        raise PydanticCustomError("limit", "{problem}", {"problem": problem})
    return value


def _round_list(value: Any) -> Any:
    """``InRounds.rounds``: a non-empty list, of bounded length, kept as a tuple so that the condition hashes."""
    if not isinstance(value, list | tuple):
        raise PydanticCustomError("rounds", "{problem}", {
            "problem": f"the rounds are a list such as [1, 'last'], got {shown(value)}"})
    if not value:
        raise PydanticCustomError("empty", "no round is listed, so the edge would never carry a message: list the "
                                  "rounds it is on in, or remove the edge")
    if problem := ROUNDS.problem(len(value), f"a list of {len(value):,} rounds"):
        raise PydanticCustomError("limit", "{problem}", {"problem": problem})
    return tuple(value)


@_register
class InRounds(Condition):
    """``{"type": "rounds", "rounds": [1, "last"]}``: on, for every row, in the rounds listed.

    An entry is a round number (from 1), ``"last"`` (round ``R``) or ``"not_last"`` (every round before ``R``);
    ``R`` is the run's, so one system file serves ``run(rounds=...)`` of any length. A number above ``R`` is a round
    that never comes.
    """

    type: Literal["rounds"] = "rounds"
    rounds: Annotated[tuple[Annotated[int | str, BeforeValidator(_round)], ...], BeforeValidator(_round_list)]

    def rows(self, state: RouteState) -> list[bool]:
        last = state.round == state.rounds
        on = state.round in self.rounds or ("last" in self.rounds and last) or ("not_last" in self.rounds and not last)
        return [on] * state.rows

    def fixed(self, round_: int, rounds: int) -> bool | None:
        return self.rows(RouteState(round=round_, rounds=rounds, questions=[""], said={}))[0]

    def describe(self) -> str:
        numbers = [str(r) for r in self.rounds if isinstance(r, int)]
        parts = [f"round{'s' if len(numbers) > 1 else ''} {', '.join(numbers)}"] if numbers else []
        parts += [{"last": "last round", "not_last": "all but the last round"}[w] for w in ROUND_WORDS
                  if w in self.rounds]
        return " or ".join(parts)


def _pattern(value: Any) -> Any:
    """``Said.pattern``: a regular expression of bounded length that compiles."""
    if not isinstance(value, str):
        return value  # the str type reports it
    if problem := PATTERN_CHARS.problem(len(value), f"a pattern of {len(value):,} characters"):
        raise PydanticCustomError("limit", "{problem}", {"problem": problem})
    try:
        re.compile(value)
    except re.error as e:
        raise PydanticCustomError("pattern", "{problem}", {
            "problem": f"{shown(value)} is not a regular expression ({e}): fix it, or match text literally by "
                       "escaping the characters .^$*+?()[]{}|\\ with a backslash (as re.escape does)"}) from None
    return value


@_register
class Said(Condition):
    """``{"type": "said", "agent": "router", "pattern": "math"}``: on for the rows whose latest text from ``agent``
    matches the regular expression ``pattern`` somewhere (Python's ``re.search``), ignoring case unless
    ``"ignore_case": false``. A row ``agent`` has not spoken for yet is off."""

    type: Literal["said"] = "said"
    agent: str = Field(min_length=1)
    pattern: Annotated[str, BeforeValidator(_pattern)]
    ignore_case: bool = True

    def rows(self, state: RouteState) -> list[bool]:
        texts = state.said.get(self.agent) or [None] * state.rows
        flags = re.IGNORECASE if self.ignore_case else 0
        return [text is not None and re.search(self.pattern, text, flags) is not None for text in texts]

    def reads(self) -> frozenset[str]:
        return frozenset({self.agent})

    def describe(self) -> str:
        return f"{self.agent} says /{self.pattern}/" + ("" if self.ignore_case else " (case-sensitive)")


@_register
class Not(Condition):
    """``{"type": "not", "condition": {...}}``: on exactly where ``condition`` is off (a router's "else" branch)."""

    type: Literal["not"] = "not"
    condition: ConditionField

    @field_validator("condition")
    @classmethod
    def _no_double_negation(cls, condition: Condition) -> Condition:
        if isinstance(condition, Not):  # also bounds how deep a file can nest conditions
            raise PydanticCustomError("double_negation", "a 'not' of a 'not' is its inner condition: write "
                                      "that instead")
        return condition

    def rows(self, state: RouteState) -> list[bool]:
        return [not on for on in self.condition.on(state)]

    def reads(self) -> frozenset[str]:
        return self.condition.reads()

    def fixed(self, round_: int, rounds: int) -> bool | None:
        inner = self.condition.fixed(round_, rounds)
        return None if inner is None else not inner

    def describe(self) -> str:
        return f"not ({self.condition.describe()})"


# ---- user conditions ----

class FunctionCondition(Condition):
    """A condition whose decision is a registered user function (see :func:`register_condition`); its fields
    are the function's keyword parameters."""

    function: ClassVar[Callable[..., Any]]
    reads_field: ClassVar[str | None] = None

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields if name != "type"}

    def rows(self, state: RouteState) -> Any:
        return type(self).function(state, **self.fields())

    def reads(self) -> frozenset[str]:
        if self.reads_field is None:
            return frozenset()
        agents = getattr(self, self.reads_field)
        return frozenset([agents] if isinstance(agents, str) else agents)

    def describe(self) -> str:
        fields = self.fields()
        return f"{self.type}({', '.join(f'{k}={v!r}' for k, v in fields.items())})" if fields else self.type


def register_condition(name: str, *, reads: str | None = None) -> Callable[[Callable], Callable]:
    """Function decorator that registers a user condition under ``name``, the ``type`` configs name it by.

    The function takes the :class:`RouteState` and the condition's fields as keyword arguments, and returns one
    ``bool`` per row (``len(state.questions)``). Its parameters after ``state`` are the fields: their annotations
    are the fields' types (checked strictly, like every config field) and their defaults the fields' defaults; a
    config with another field, or without a field that has no default, is an error naming it.

    Args:
        name: the condition's ``type``; registering it again with another function is an error.
        reads: the field holding the agent (a name, or a list of names) whose text the function reads in
            ``state.said``, so that the plan makes that agent speak first. ``None``: it reads no agent's text.

    Example:
        >>> @register_condition("long_question")
        ... def long_question(state, *, min_chars: int = 200):
        ...     return [len(q) >= min_chars for q in state.questions]
        >>> parse_condition({"type": "long_question", "min_chars": 80}, "edge a->b").describe()
        'long_question(min_chars=80)'
    """

    def decorator(function: Callable) -> Callable:
        if not callable(function):
            raise GraphError(f"register_condition({name!r}) decorates a function, got {shown(function)}")
        known = CONDITIONS.get(name)
        if known is not None:
            if getattr(known, "function", None) is function:
                return function
            raise GraphError(f"the condition type {name!r} is already registered (to {_owner(known)}): pick "
                             "another name")
        fields = _signature_fields(name, function)
        if reads is not None and reads not in fields:
            raise GraphError(f"register_condition({name!r}, reads={reads!r}): {function.__qualname__} has no "
                             f"parameter {reads!r}; name the parameter that holds the agent it reads")
        cls = create_model(f"{name}Condition", __base__=FunctionCondition, __module__=function.__module__,
                           type=(Literal[name], name), **fields)
        cls.function, cls.reads_field = staticmethod(function), reads
        _register(cls)
        return function

    return decorator


def _owner(cls: type[Condition]) -> str:
    function = getattr(cls, "function", None)
    return f"the function {function.__qualname__}" if function else f"the built-in {cls.__name__}"


def _signature_fields(name: str, function: Callable) -> dict[str, tuple[Any, Any]]:
    """The fields of a condition function: its parameters after ``state``, as pydantic field definitions."""
    try:
        parameters = list(inspect.signature(function, eval_str=True).parameters.values())
    except (NameError, TypeError, ValueError) as e:
        raise GraphError(f"register_condition({name!r}): cannot read the signature of {shown(function)} ({e}); "
                         "give it plain annotations") from None
    if not parameters or parameters[0].kind not in (parameters[0].POSITIONAL_ONLY, parameters[0].POSITIONAL_OR_KEYWORD):
        raise GraphError(f"register_condition({name!r}): the function's first parameter is the RouteState: "
                         "def condition(state, *, field: type = default)")
    fields = {}
    for p in parameters[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) or p.name == "type":
            raise GraphError(f"register_condition({name!r}): parameter {p.name!r} cannot be a field; after "
                             "state, give each field a named keyword parameter (not *args, **kwargs or 'type')")
        annotation = Any if p.annotation is p.empty else p.annotation
        fields[p.name] = (annotation, ... if p.default is p.empty else p.default)
    return fields
