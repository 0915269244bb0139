"""JSON from outside: the depth cap and the finite-numbers rule, and that ordinary JSON is untouched."""

from __future__ import annotations

import json

import pytest

from proxy import jsonin


def test_ordinary_json_parses_as_json_loads_does() -> None:
    doc = {"a": [1, 2.5, -3e10, None, True, "é", "\\ud83d\\ude00"], "b": {"c": [[[]]]}}
    raw = json.dumps(doc)
    assert jsonin.loads(raw) == json.loads(raw)
    assert jsonin.loads(raw.encode()) == json.loads(raw)
    assert jsonin.loads(raw.encode("utf-16")) == json.loads(raw)
    # Many containers side by side are not deep: only nesting counts.
    wide = json.dumps([{"k": [i]} for i in range(5000)])
    assert len(jsonin.loads(wide)) == 5000


@pytest.mark.parametrize("opener,closer", [("[", "]"), ('{"k":', "}")])
def test_nesting_is_capped_at_max_depth(opener: str, closer: str) -> None:
    at_limit = opener * jsonin.MAX_DEPTH + "1" + closer * jsonin.MAX_DEPTH
    assert jsonin.loads(at_limit) is not None
    over = opener * (jsonin.MAX_DEPTH + 1) + "1" + closer * (jsonin.MAX_DEPTH + 1)
    with pytest.raises(jsonin.JsonInputError, match="nested deeper than 64"):
        jsonin.loads(over)
    # Deep enough to exhaust the C parser's recursion: the same error, not a RecursionError.
    with pytest.raises(jsonin.JsonInputError, match="nested deeper"):
        jsonin.loads(opener * 200_000 + "1" + closer * 200_000)
    with pytest.raises(jsonin.JsonInputError):
        jsonin.loads((opener * 200_000).encode())
    assert jsonin.loads(opener * 3 + "1" + closer * 3, max_depth=3) is not None
    with pytest.raises(jsonin.JsonInputError):
        jsonin.loads(opener * 4 + "1" + closer * 4, max_depth=3)


@pytest.mark.parametrize("raw", ["NaN", "[Infinity]", '{"x": -Infinity}', "1e400", "[-1e999]"])
def test_non_finite_numbers_are_refused(raw: str) -> None:
    with pytest.raises(jsonin.JsonInputError) as caught:
        jsonin.loads(raw)
    assert isinstance(caught.value, ValueError) and "finite" in caught.value.reason


def test_malformed_json_is_still_a_value_error() -> None:
    for raw in ("", "{", b"\xff\xfe\x00", "[1,]"):
        with pytest.raises(ValueError):
            jsonin.loads(raw)
