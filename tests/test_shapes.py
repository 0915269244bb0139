"""The declared-body layer as pure functions: every problem at once, named by dotted field, with
the value sent never in a message."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import ValidationError
from proxy.shapes import (
    ID_PATTERN,
    UNSET,
    Bool,
    Check,
    Ident,
    Int,
    JsonObject,
    ListOf,
    Nullable,
    NullMeans,
    NullOmits,
    Number,
    Obj,
    Raw,
    Simple,
    Text,
    raise_problems,
)

SECRET = "s3cr3t-value-9f2"


def parse(shape: Obj, value: Any) -> tuple[dict[str, Any], dict[str, str]]:
    return shape.parse(value)


def test_scalars_accept_what_they_say_and_refuse_the_rest() -> None:
    cases: list[tuple[Any, list[Any], list[Any], str]] = [
        (Int(0), [0, 7, 10**20], [-1, 1.5, True, "1", None], "must be an integer >= 0"),
        (Int(0, 5), [0, 5], [6, -1, False], "must be an integer from 0 to 5"),
        (Number(gt=0), [0.1, 3, float("inf")], [0, -2, True, "1", float("nan")], "must be a number > 0"),
        (Bool(), [True, False], [0, 1, "true", None], "must be true or false"),
        (
            Ident(),
            ["a", "a.b:c@d", "x" * 200],
            ["", "-a", "a b", "a\n", "x" * 201, 5],
            "must be an identifier",
        ),
        (Text(1, 3), ["a", "abc"], ["", "abcd", 3], "must be a string of 1-3 characters"),
        (Text(1, 9, stripped=True), ["a.b"], [" a", "a "], "must be a string of 1-9 characters"),
        (Nullable(Ident()), [None, "a"], ["", 1], "must be an identifier or null"),
        (
            ListOf(Text(1, 5), 2),
            [[], ["a", "b"]],
            [["a", "b", "c"], [""], "a", None],
            "must be a list of up to 2 items",
        ),
    ]
    for check, good, bad, message in cases:
        shape = Obj({"k": check})
        for value in good:
            assert parse(shape, {"k": value})[1] == {}, (check, value)
        for value in bad:
            _values, problems = parse(shape, {"k": value})
            assert problems == {"k": message}, (check, value, problems)


def test_conversions_and_null_rules() -> None:
    shape = Obj(
        {
            "hosts": Nullable(ListOf(Text(1, 9), 3)),
            "meta": NullMeans(JsonObject(max_bytes=20), dict),
            "knob": NullOmits(Int(0)),
            "any": Raw(),
        }
    )
    values, problems = parse(shape, {"hosts": ["a", "b"], "meta": None, "knob": None, "any": [1]})
    assert problems == {}
    assert values == {"hosts": ("a", "b"), "meta": {}, "any": [1]}  # a null knob is no knob
    values, problems = parse(shape, {"hosts": None, "meta": {"k": "x" * 30}})
    assert values["hosts"] is None
    assert problems == {"meta": "must be at most 20 bytes of JSON"}
    assert parse(shape, {"meta": [1]})[1] == {"meta": "must be an object"}


def test_nested_objects_name_fields_by_path_and_report_everything_at_once() -> None:
    inner = Obj(
        {"read_s": Number(gt=0, message="must be a number of seconds > 0")}, unknown="unknown; use read_s"
    )
    shape = Obj(
        {"id": Ident("required: an id"), "opts": Obj({"t": inner, "n": Int(0)}, unknown="unknown option")},
        required=("id",),
    )
    _values, problems = parse(
        shape, {"opts": {"t": {"read_s": 0, "nap_s": 1}, "n": -1, "zz": 1}, "extra": SECRET}
    )
    assert problems == {
        "id": "required: an id",
        "extra": "unknown field; known: id, opts",
        "opts.t.read_s": "must be a number of seconds > 0",
        "opts.t.nap_s": "unknown; use read_s",
        "opts.n": "must be an integer >= 0",
        "opts.zz": "unknown option",
    }
    assert parse(shape, {"id": "a", "opts": "x"})[1] == {"opts": "must be an object"}
    assert parse(shape, [1])[1] == {"body": "must be an object"}


def test_values_keep_the_body_order_and_failed_values_stay_as_sent() -> None:
    shape = Obj({"a": Int(0), "b": Int(0), "c": Int(0)})
    values, problems = parse(shape, {"c": 1, "a": "x", "b": 2})
    assert list(values) == ["c", "a", "b"]
    assert values["a"] == "x" and problems == {"a": "must be an integer >= 0"}
    assert "b" not in parse(shape, {"a": 1})[0]  # absent stays absent (UNSET is never a value)
    assert UNSET not in parse(Obj({"k": NullOmits(Int(0))}), {"k": None})[0].values()


def test_raise_problems_names_fields_never_values() -> None:
    raise_problems({})
    with pytest.raises(ValidationError) as info:
        raise_problems({"b": "must be an object", "a": "unknown field; known: x"})
    assert info.value.message == "invalid fields: a, b; see 'fields' for what is wrong"
    assert info.value.fields == {"b": "must be an object", "a": "unknown field; known: x"}
    _values, problems = parse(Obj({"k": Int(0)}), {"k": SECRET, SECRET: 1})
    assert all(SECRET not in m for m in problems.values())


# --- to_json_schema: the OpenAPI document's bodies accept what the checks accept ----------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
_strings = st.from_regex(ID_PATTERN.replace("{0,199}", "{0,8}"), fullmatch=True) | st.text(max_size=12)
_CHECKS: list[Simple] = [
    Int(0),
    Int(0, 5),
    Number(gt=0),
    Bool(),
    Ident(),
    Text(1, 5),
    Text(1, 5, stripped=True),
    Nullable(Text(1, 200)),
    ListOf(Text(1, 6, stripped=True), 3),
]


def _comparable(v: Any) -> bool:
    # JSON Schema's "integer" takes 1.0 (JSON encoders write 1); Python's re, which jsonschema
    # uses, lets "$" match before a final newline, which ECMA 262 (OpenAPI's dialect) does not.
    if isinstance(v, float):
        return not v.is_integer()
    if isinstance(v, str):
        return not v.endswith("\n")
    if isinstance(v, list):
        return all(_comparable(x) for x in v)
    return True


@settings(max_examples=300, deadline=None, derandomize=True)
@given(index=st.integers(0, len(_CHECKS) - 1), value=_json | _strings | st.lists(_strings, max_size=4))
def test_each_check_and_its_json_schema_accept_the_same_values(index: int, value: Any) -> None:
    check = _CHECKS[index]
    if not _comparable(value):
        return
    assert check.accepts(value) == jsonschema.Draft202012Validator(check.to_json_schema()).is_valid(value), (
        check,
        value,
    )


def test_an_obj_schema_says_required_unknown_and_null_as_the_parse_does() -> None:
    shape = Obj(
        {
            "a": Int(0, 5),
            "b": Nullable(Text(1, 3)),
            "c": NullOmits(Bool()),
            "m": NullMeans(JsonObject(64), dict),
        },
        required=("a",),
    )
    schema = shape.to_json_schema()
    assert schema["required"] == ["a"] and schema["additionalProperties"] is False
    assert schema["properties"]["b"]["type"] == ["string", "null"]
    assert schema["properties"]["a"]["description"] == "must be an integer from 0 to 5"
    assert "64 bytes" in schema["properties"]["m"]["description"]
    v = jsonschema.Draft202012Validator(schema)
    for body in ({"a": 1}, {"a": 1, "b": None, "c": None, "m": None}, {"a": 0, "b": "xy", "m": {}}):
        assert v.is_valid(body) and shape.parse(body)[1] == {}, body
    for body in ({}, {"a": 6}, {"a": 1, "z": 1}, {"a": 1, "b": ""}, {"a": 1, "c": "yes"}):
        assert not v.is_valid(body) and shape.parse(body)[1], body


def test_a_check_that_declares_no_schema_refuses_to_guess() -> None:
    class Odd(Check):
        def read(self, value: Any, at: str, problems: dict[str, str]) -> Any:
            return value

    with pytest.raises(NotImplementedError, match="Odd declares no JSON Schema"):
        Obj({"x": Odd()}).to_json_schema()
