"""The declared-body layer as pure functions: every problem at once, named by dotted field, with
the value sent never in a message."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import ValidationError
from proxy.shapes import (
    UNSET,
    Bool,
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
