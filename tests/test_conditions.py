"""Conditions on edges (latentgraph.core.conditions): per-row decisions of each built-in, user conditions,
round trips through dicts, and every error with its message."""

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from latentgraph import GraphError, InputError
from latentgraph.core import conditions
from latentgraph.core.conditions import (
    CONDITIONS,
    Condition,
    ConditionField,
    InRounds,
    Not,
    RouteState,
    Said,
    parse_condition,
    register_condition,
)
from latentgraph.core.config import ConfigModel

QUESTIONS = ["What is 2+2?", "Write a sort in Python.", "Who wrote Hamlet?", "Integrate x^2."]
ROUTER = ["MATH: add the numbers", "code: python", "trivia", None]  # row 3: the router did not speak for it


def state(round_=1, rounds=3, said=None):
    said = {"router": ROUTER} if said is None else said
    return RouteState(round=round_, rounds=rounds, questions=QUESTIONS, said=said)


@pytest.fixture(autouse=True)
def registry():
    """User conditions registered by a test are forgotten after it."""
    before = dict(conditions.CONDITIONS)
    yield
    conditions.CONDITIONS.clear()
    conditions.CONDITIONS.update(before)


def test_rounds_are_on_for_every_row_in_the_rounds_listed():
    condition = InRounds(rounds=[1, 2])
    assert [condition.on(state(r)) for r in (1, 2, 3)] == [[True] * 4, [True] * 4, [False] * 4]


def test_last_and_not_last_follow_the_runs_rounds():
    last, not_last = InRounds(rounds=["last"]), InRounds(rounds=["not_last"])
    assert [last.on(state(r, rounds=3))[0] for r in (1, 2, 3)] == [False, False, True]
    assert [not_last.on(state(r, rounds=3))[0] for r in (1, 2, 3)] == [True, True, False]
    assert last.on(state(1, rounds=1)) == [True] * 4 and not_last.on(state(1, rounds=1)) == [False] * 4
    both = InRounds(rounds=[1, "last"])
    assert [both.on(state(r, rounds=4))[0] for r in (1, 2, 3, 4)] == [True, False, False, True]


def test_a_round_above_the_runs_rounds_never_comes():
    assert [InRounds(rounds=[5]).on(state(r, rounds=3))[0] for r in (1, 2, 3)] == [False, False, False]


def test_said_matches_each_rows_latest_text_ignoring_case_by_default():
    assert Said(agent="router", pattern="math").on(state()) == [True, False, False, False]
    assert Said(agent="router", pattern=r"^(code|trivia)\b").on(state()) == [False, True, True, False]


def test_said_can_be_case_sensitive():
    said = Said(agent="router", pattern="math", ignore_case=False)
    assert said.on(state()) == [False, False, False, False]
    assert Said(agent="router", pattern="MATH", ignore_case=False).on(state()) == [True, False, False, False]


def test_said_is_off_for_rows_the_agent_has_not_spoken_for():
    said = Said(agent="router", pattern=".*")  # matches any text, even an empty one
    assert said.on(state()) == [True, True, True, False]  # row 3 holds None
    assert said.on(state(said={})) == [False] * 4  # the router has not spoken at all
    assert said.on(state(said={"router": ["", "", "", ""]})) == [True] * 4


def test_not_is_on_exactly_where_its_condition_is_off():
    said = Said(agent="router", pattern="math")
    negation = Not(condition=said)
    assert negation.on(state()) == [False, True, True, True]
    assert negation.reads() == said.reads() == frozenset({"router"})
    assert Not(condition=InRounds(rounds=["last"])).on(state(3)) == [False] * 4


def test_reads_names_the_agents_whose_text_is_read():
    assert InRounds(rounds=[1]).reads() == frozenset()
    assert Said(agent="planner", pattern="x").reads() == frozenset({"planner"})


def test_labels_for_diagrams_and_plan_tables():
    assert InRounds(rounds=[1, 2]).describe() == "rounds 1, 2"
    assert InRounds(rounds=[2]).describe() == "round 2"
    assert InRounds(rounds=["last"]).describe() == "last round"
    assert InRounds(rounds=[1, "not_last"]).describe() == "round 1 or all but the last round"
    assert Said(agent="router", pattern="math").describe() == "router says /math/"
    assert Said(agent="router", pattern="M", ignore_case=False).describe() == "router says /M/ (case-sensitive)"
    assert Not(condition=Said(agent="router", pattern="math")).describe() == "not (router says /math/)"


def test_a_registered_user_condition_gets_its_fields_and_reads_its_agent():
    @register_condition("said_longer_than", reads="agent")
    def said_longer_than(state, *, agent: str, chars: int = 10):
        return [text is not None and len(text) > chars for text in state.said.get(agent, [None] * state.rows)]

    condition = parse_condition({"type": "said_longer_than", "agent": "router", "chars": 12}, "edge 'router->math'")
    assert condition.on(state()) == [True, False, False, False]  # "MATH: add the numbers" is the one over 12
    assert parse_condition({"type": "said_longer_than", "agent": "router"}, "e").on(state()) == [True, True, False,
                                                                                                 False]
    assert condition.reads() == frozenset({"router"})
    assert condition.describe() == "said_longer_than(agent='router', chars=12)"
    assert condition.to_dict() == {"type": "said_longer_than", "agent": "router", "chars": 12}


def test_a_user_condition_without_fields_is_named_by_a_bare_string():
    @register_condition("long_question")
    def long_question(state):
        return [len(q) > 15 for q in state.questions]

    condition = parse_condition("long_question", "edge 'a->b'")
    assert condition.on(state()) == [False, True, True, False]
    assert condition.reads() == frozenset() and condition.describe() == "long_question"
    assert Not(condition="long_question").on(state()) == [True, False, False, True]


def test_conditions_are_frozen_and_equal_by_value():
    assert Said(agent="router", pattern="math") == parse_condition(
        {"type": "said", "agent": "router", "pattern": "math", "ignore_case": True}, "e")
    assert Said(agent="router", pattern="math") != Said(agent="router", pattern="math", ignore_case=False)
    with pytest.raises(ValidationError, match="frozen"):
        Said(agent="router", pattern="math").pattern = "code"
    assert InRounds(rounds=[1, "last"]) == InRounds(rounds=(1, "last"))
    labels = {InRounds(rounds=[1]): "first", Not(condition=Said(agent="r", pattern="x")): "else"}  # hashable
    assert labels[parse_condition({"type": "rounds", "rounds": [1]}, "e")] == "first"
    assert labels[parse_condition({"type": "not", "condition": {"type": "said", "agent": "r", "pattern": "x"}},
                                  "e")] == "else"


def _registered_for_round_trip():
    @register_condition("round_trip_user", reads="agents")
    def round_trip_user(state, *, agents: list[str], threshold: float = 0.5):
        return [True] * state.rows

    return parse_condition({"type": "round_trip_user", "agents": ["a", "b"], "threshold": 0.25}, "e")


@pytest.mark.parametrize("make", [
    lambda: InRounds(rounds=[1, 3, "last", "not_last"]),
    lambda: Said(agent="router", pattern=r"\bmath\b", ignore_case=False),
    lambda: Not(condition={"type": "said", "agent": "router", "pattern": "math"}),
    lambda: Not(condition=InRounds(rounds=["last"])),
    _registered_for_round_trip,
], ids=["rounds", "said", "not-said", "not-rounds", "user"])
def test_to_dict_round_trips_with_type_first(make):
    condition = make()
    data = condition.to_dict()
    assert next(iter(data)) == "type" and data["type"] == condition.type
    assert parse_condition(data, "e") == condition and parse_condition(condition, "e") is condition
    assert json.loads(json.dumps(data)) == data  # JSON-able: plain values only


def test_a_round_trip_of_a_user_condition_reads_its_agents():
    assert _registered_for_round_trip().reads() == frozenset({"a", "b"})


WHERE = "edge 'router->math'"
BAD = [
    ({"type": "said", "agent": "router", "pattern": "(math"},
     "edge 'router->math': invalid 'said' condition: pattern: '(math' is not a regular expression (missing ), "
     "unterminated subpattern at position 0): fix it, or match text literally by escaping the characters "
     ".^$*+?()[]{}|\\ with a backslash (as re.escape does); its fields are: type, agent, pattern, ignore_case"),
    ({"type": "said", "agent": "router", "pattern": "a" * 1001},
     "edge 'router->math': invalid 'said' condition: pattern: a pattern of 1,001 characters exceeds latentgraph's "
     "limit of 1,000 characters in a pattern: shorten the pattern, or raise the limit with the environment variable "
     "LATENTGRAPH_MAX_PATTERN_CHARS"),
    ({"type": "sayd", "agent": "router", "pattern": "math"},
     "edge 'router->math': unknown condition type 'sayd'; registered: ['not', 'rounds', 'said']. Register it with "
     "@latentgraph.core.conditions.register_condition('sayd') before loading"),
    ({"type": "said", "agent": "router", "patern": "math"},
     "edge 'router->math': invalid 'said' condition: pattern: Field required; patern: unknown field (a typo? remove "
     "or rename it); its fields are: type, agent, pattern, ignore_case"),
    ({"type": "said", "agent": "router", "pattern": "math", "ignore_case": "yes"},
     "edge 'router->math': invalid 'said' condition: ignore_case: Input should be a valid boolean"),
    ({"type": "rounds", "rounds": [0]},
     "edge 'router->math': invalid 'rounds' condition: rounds.0: a round is a number from 1, 'last' or 'not_last'; "
     "got 0"),
    ({"type": "rounds", "rounds": ["first"]},
     "invalid 'rounds' condition: rounds.0: a round is a number from 1, 'last' or 'not_last'; got 'first'"),
    ({"type": "rounds", "rounds": [True]}, "rounds.0: a round is a number from 1, 'last' or 'not_last'; got True"),
    ({"type": "rounds", "rounds": 2},
     "invalid 'rounds' condition: rounds: the rounds are a list such as [1, 'last'], got 2"),
    ({"type": "rounds", "rounds": [1] * 1001},
     "rounds: a list of 1,001 rounds exceeds latentgraph's limit of 1,000 rounds"),
    ({"type": "rounds", "rounds": []},
     "rounds: no round is listed, so the edge would never carry a message: list the rounds it is on in, or remove "
     "the edge"),
    ({"type": "rounds", "rounds": [2000]},
     "rounds.0: 2,000 exceeds latentgraph's limit of 1,000 rounds: use fewer rounds"),
    ({"type": "not", "condition": {"type": "not", "condition": {"type": "rounds", "rounds": [1]}}},
     "invalid 'not' condition: condition: a 'not' of a 'not' is its inner condition: write that instead"),
    ({"type": "not", "condition": {"type": "said", "agent": "router", "pattern": "[a-"}},
     "invalid 'not' condition: condition.pattern: '[a-' is not a regular expression"),
    ("said", "invalid 'said' condition: agent: Field required; pattern: Field required"),
    (["rounds", 1], "edge 'router->math': a condition is a dict such as {'type': 'rounds', 'rounds': [1]}, a "
                    "registered condition's name or a Condition, got ['rounds', 1]"),
    ({"rounds": [1]}, "edge 'router->math': a condition's 'type' is the name of a registered condition (not, rounds, "
                      "said), got None"),
]


@pytest.mark.parametrize("spec, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_bad_spec_is_a_graph_error_naming_the_edge_the_field_and_the_fix(spec, message):
    with pytest.raises(GraphError) as caught:
        parse_condition(spec, WHERE)
    registered = sorted(CONDITIONS)  # other test modules register conditions of their own
    message = message.replace("['not', 'rounds', 'said']", str(registered))
    assert message.replace("(not, rounds, said)", f"({', '.join(registered)})") in str(caught.value)


def test_the_pattern_limit_is_raised_by_its_environment_variable(monkeypatch):
    monkeypatch.setenv("LATENTGRAPH_MAX_PATTERN_CHARS", "2000")
    assert parse_condition({"type": "said", "agent": "r", "pattern": "a" * 1001}, WHERE).pattern == "a" * 1001


def test_user_fields_are_typed_strictly_from_the_signature():
    @register_condition("min_length")
    def min_length(state, *, chars: int):
        return [len(q) >= chars for q in state.questions]

    with pytest.raises(GraphError, match=re.escape("invalid 'min_length' condition: chars: Input should be a valid "
                                                   "integer; its fields are: type, chars")):
        parse_condition({"type": "min_length", "chars": "12"}, WHERE)
    with pytest.raises(GraphError, match=re.escape("chars: Field required")):
        parse_condition("min_length", WHERE)
    with pytest.raises(GraphError, match=re.escape("minimum: unknown field (a typo? remove or rename it)")):
        parse_condition({"type": "min_length", "chars": 3, "minimum": 1}, WHERE)


@pytest.mark.parametrize("returned, problem", [
    ([True, False], "returned 2 values for 4 questions"),
    ([True, False, 1, True], "returned 1 (int, not bool) for row 2"),
    ("yes", "returned a str ('yes')"),
    (None, "returned a NoneType (None)"),
])
def test_a_user_condition_returning_anything_but_one_bool_per_row_fails_closed(returned, problem):
    @register_condition("broken")
    def broken(state):
        return returned

    with pytest.raises(InputError) as caught:
        parse_condition("broken", WHERE).on(state(), WHERE)
    assert str(caught.value) == (f"{WHERE}: the condition 'broken' {problem}: a condition returns a list of 4 "
                                 "True/False values, one per question; make it do so (bool(x) turns a numpy or torch "
                                 "boolean into one)")
    with pytest.raises(InputError) as nested:  # inside a 'not': the edge is named once, the inner condition too
        Not(condition="broken").on(state(), WHERE)
    assert str(nested.value) == str(caught.value)
    with pytest.raises(InputError, match=r"^the condition 'broken' "):  # without where: the caller prefixes it
        parse_condition("broken", WHERE).on(state())


def test_registering_a_name_twice_with_another_function_is_an_error():
    def first(state):
        return [True] * state.rows

    def second(state):
        return [False] * state.rows

    register_condition("twice")(first)
    assert register_condition("twice")(first) is first  # the same function again: nothing changes
    with pytest.raises(GraphError, match=re.escape("the condition type 'twice' is already registered (to the "
                                                   "function test_registering_a_name_twice_with_another_function_is_an"
                                                   "_error.<locals>.first): pick another name")):
        register_condition("twice")(second)
    with pytest.raises(GraphError, match=re.escape("the condition type 'said' is already registered (to the "
                                                   "built-in Said): pick another name")):
        register_condition("said")(second)
    assert parse_condition("twice", "e").on(state()) == [True] * 4


@pytest.mark.parametrize("function, reads, message", [
    (lambda state, *args: [], None, "parameter 'args' cannot be a field"),
    (lambda state, *, type: [], None, "parameter 'type' cannot be a field"),
    (lambda *, agent: [], None, "the function's first parameter is the RouteState"),
    (lambda state, *, agent: [], "agents", "has no parameter 'agents'; name the parameter that holds the agent"),
])
def test_a_function_that_cannot_be_a_condition_is_refused_at_registration(function, reads, message):
    with pytest.raises(GraphError, match=re.escape(message)):
        register_condition("refused", reads=reads)(function)
    assert "refused" not in conditions.CONDITIONS


class EdgeLike(ConfigModel):
    """How a config holds a condition: the hook EdgeConfig.when uses."""

    src: str
    when: ConditionField | None = None


class SystemLike(ConfigModel):
    edges: list[EdgeLike] = []


def test_a_config_field_parses_any_spec_and_stores_the_dict():
    edge = EdgeLike(src="router", when={"type": "said", "agent": "router", "pattern": "math"})
    assert isinstance(edge.when, Said) and edge.when == Said(agent="router", pattern="math")
    assert edge.model_dump(mode="json") == {"src": "router", "when": edge.when.to_dict()}
    assert EdgeLike(src="a").model_dump(mode="json") == {"src": "a", "when": None}
    assert EdgeLike(src="a", when=InRounds(rounds=[1])).when == InRounds(rounds=[1])
    assert EdgeLike.model_validate(edge.model_dump(mode="json")) == edge


def test_a_config_fields_errors_keep_their_path():
    spec = {"edges": [{"src": "a"}, {"src": "b", "when": {"type": "not", "condition": {"type": "said", "agent": "r",
                                                                                       "pattern": "(", "x": 1}}}]}
    with pytest.raises(GraphError) as caught:
        SystemLike(**spec)
    message = str(caught.value)
    assert message.startswith("invalid SystemLike: edges.1.when.condition.pattern: '(' is not a regular expression")
    assert "edges.1.when.condition.x: unknown field (a typo? remove or rename it)" in message
    with pytest.raises(GraphError, match=re.escape("edges.0.when: unknown condition type 'nope'")):
        SystemLike(edges=[{"src": "a", "when": "nope"}])


def test_a_condition_subclass_must_implement_rows():
    class Unfinished(Condition):
        pass

    with pytest.raises(GraphError, match="Unfinished does not implement Condition.rows: implement it, or register"):
        Unfinished(type="unfinished").on(state())


def test_the_edges_page_examples_are_valid_conditions():
    page = (Path(__file__).parents[1] / "docs" / "edges.md").read_text()
    page = page[page.index("## Conditional edges"):]
    page = page[:page.find("\n## ") if "\n## " in page else None]  # that section only
    connected = []

    class System:  # records what the page connects; its conditions are parsed as EdgeConfig.when will
        def connect(self, src, dst, when=None, **options):
            connected.append(parse_condition(when, f"edge '{src}->{dst}'"))

    for block in re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL):
        exec(block, {"system": System()})
    assert [c.describe() for c in connected] == [
        "router says /math/", "not (router says /math/)", "long_question(min_chars=80)",
        "long_question(min_chars=200)", "said_number(agent='solver')"]
    assert connected[-1].reads() == frozenset({"solver"})
    assert connected[-1].on(RouteState(round=1, rounds=1, questions=["q", "q"], said={"solver": ["x = 4", "no"]})) \
        == [True, False]
    edge = json.loads(re.findall(r"```json\n(.*?)```", page, flags=re.DOTALL)[0])
    assert parse_condition(edge["when"], "e").to_dict() == edge["when"]  # the stored form, every field shown


@register_condition("any_word")
def any_word(state, *, words: list[str] = ["x"]):  # noqa: B006 (a default read, never changed)
    return [any(w in q for w in words) for q in state.questions]


def test_a_user_condition_with_a_list_field_hashes_by_its_stored_form():
    made = parse_condition({"type": "any_word", "words": ["7", "8"]}, WHERE)
    again = parse_condition(made.to_dict(), WHERE)
    assert made == again and hash(made) == hash(again)  # so a plan keyed by its graph's edges can be cached
    assert {made: 1}[again] == 1
    assert hash(made) != hash(parse_condition({"type": "any_word", "words": ["9"]}, WHERE))
    assert made.on(RouteState(round=1, rounds=1, questions=["a 7", "b"], said={})) == [True, False]
