"""Declared JSON bodies: what a request body may hold, said once, checked all at once.

Why it exists: the admin API checked its bodies by hand, an ``isinstance`` chain per key, and
each endpoint spelled "unknown field", "must be an integer from 0 to 5" or "must be an object"
its own way. Here a body is declared as an ``Obj`` of named checks; ``Obj.parse`` walks a
decoded JSON value and returns the values of the keys present (converted: a list of hosts
becomes a tuple, a null metadata ``{}``), with *every* problem collected under its dotted field
name (``options.retries``, ``options.timeouts.read_s``), so one 422 names them all. Messages say
what a valid value looks like and never repeat the value sent (it may be a secret).

Why not pydantic or msgspec: msgspec stops at the first error, and a 422 here names every
field; pydantic collects them, but its messages ("Input should be less than or equal to 5") and
locations (``('rate_limits', 0, 'limit')``) are not the ones clients read today, and keeping ours
would take a custom validator on every field: this module again, over a compiled dependency.

A value that fails its check is kept as it came, so cross-field rules (``runtime_user_id``
needs ``default_connection_id``) still see that something was sent; a caller raises the
problems (``raise_problems``) before using any value. Pure module: no aiohttp.

Each check also says what it accepts as JSON Schema (``to_json_schema``, draft 2020-12 as
OpenAPI 3.1 uses it): ``proxy.web.openapi`` publishes the request bodies from these very
objects, so the document and the validation cannot drift. A check that cannot be said in JSON
Schema exactly (a byte budget, a cross-field rule) says the rest in ``description``.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from proxy.errors import ValidationError
from proxy.model import ID_RE

# ID_RE in the regular-expression dialect JSON Schema uses (ECMA 262: no \A, \Z).
ID_PATTERN: Final = "^" + ID_RE.pattern.removeprefix("\\A").removesuffix("\\Z") + "$"

__all__ = [
    "ID_PATTERN",
    "UNSET",
    "Bool",
    "Check",
    "Ident",
    "Int",
    "JsonObject",
    "ListOf",
    "NullMeans",
    "NullOmits",
    "Nullable",
    "Number",
    "Obj",
    "Problems",
    "Raw",
    "Simple",
    "Text",
    "Unset",
    "raise_problems",
]

Problems = dict[str, str]


class Unset(enum.Enum):
    """A key the body did not send (or sent as a null that means "not sent")."""

    UNSET = "unset"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET


def raise_problems(problems: Mapping[str, str]) -> None:
    """One 422 naming every problem (field names in the message, what is wrong in ``fields``)."""
    if problems:
        names = ", ".join(sorted(problems))
        raise ValidationError(f"invalid fields: {names}; see 'fields' for what is wrong", fields=problems)


class Check:
    """The rule of one JSON value at field name ``at``: ``read`` returns the value to use (or
    ``UNSET``: as if not sent) and records what is wrong in ``problems``."""

    message: str = "is invalid"

    def read(self, value: Any, at: str, problems: Problems) -> Any:
        raise NotImplementedError

    def to_json_schema(self) -> dict[str, Any]:
        """What this check accepts, as a JSON Schema. Every check declares it (a new one that
        does not makes the OpenAPI document fail to build, and its test)."""
        raise NotImplementedError(f"{type(self).__name__} declares no JSON Schema")


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` that also accepts null (3.1's ``type: [..., "null"]``, not 3.0's ``nullable``)."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    if isinstance(kind, list):
        return {**schema, "type": kind if "null" in kind else [*kind, "null"]}
    if not schema or set(schema) <= {"description"}:
        return schema  # already accepts anything
    return {"anyOf": [schema, {"type": "null"}]}


class Simple(Check):
    """A check of one value with one message: ``accepts`` it or not, then ``convert``."""

    def __init__(self, message: str) -> None:
        self.message = message

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def convert(self, value: Any) -> Any:
        return value

    def schema(self) -> dict[str, Any]:
        """The JSON Schema keywords of this check (``to_json_schema`` adds the message)."""
        raise NotImplementedError(f"{type(self).__name__} declares no JSON Schema")

    def to_json_schema(self) -> dict[str, Any]:
        return {**self.schema(), "description": self.message}

    def read(self, value: Any, at: str, problems: Problems) -> Any:
        if not self.accepts(value):
            problems[at] = self.message
            return value
        return self.convert(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


class Raw(Simple):
    """Anything; a later rule decides (e.g. PATCH compares ``integration_id`` with the stored one)."""

    def __init__(self) -> None:
        super().__init__("is invalid")

    def accepts(self, value: Any) -> bool:
        return True

    def schema(self) -> dict[str, Any]:
        return {}


class Int(Simple):
    """An integer (not a boolean) of at least ``lo``, at most ``hi``."""

    def __init__(self, lo: int, hi: int | None = None, message: str | None = None) -> None:
        default = f"must be an integer >= {lo}" if hi is None else f"must be an integer from {lo} to {hi}"
        super().__init__(message or default)
        self.lo, self.hi = lo, hi

    def accepts(self, value: Any) -> bool:
        return _is_int(value) and value >= self.lo and (self.hi is None or value <= self.hi)

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer", "minimum": self.lo}
        if self.hi is not None:
            out["maximum"] = self.hi
        return out


class Number(Simple):
    """An integer or a float (not a boolean) above ``gt``."""

    def __init__(self, gt: float = 0, message: str | None = None) -> None:
        super().__init__(message or f"must be a number > {gt:g}")
        self.gt = gt

    def accepts(self, value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and value > self.gt

    def schema(self) -> dict[str, Any]:
        return {"type": "number", "exclusiveMinimum": self.gt}


class Bool(Simple):
    def __init__(self, message: str = "must be true or false") -> None:
        super().__init__(message)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


class Ident(Simple):
    """An identifier as ids are everywhere (``proxy.model.ID_RE``)."""

    def __init__(self, message: str = "must be an identifier") -> None:
        super().__init__(message)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and ID_RE.match(value) is not None

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": ID_PATTERN}


class Text(Simple):
    """A string of ``lo`` to ``hi`` characters; ``stripped``: without surrounding whitespace."""

    def __init__(self, lo: int, hi: int, *, stripped: bool = False, message: str | None = None) -> None:
        super().__init__(message or f"must be a string of {lo}-{hi} characters")
        self.lo, self.hi, self.stripped = lo, hi, stripped

    def accepts(self, value: Any) -> bool:
        return (
            isinstance(value, str)
            and self.lo <= len(value) <= self.hi
            and (not self.stripped or value.strip() == value)
        )

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string", "minLength": self.lo, "maxLength": self.hi}
        if self.stripped:
            out["pattern"] = r"^(?:\S(?:[\s\S]*\S)?)?$"  # no whitespace at either end
        return out


class Nullable(Simple):
    """``inner`` or null (kept as None); the message says "or null" unless given."""

    def __init__(self, inner: Simple, message: str | None = None) -> None:
        super().__init__(message or f"{inner.message} or null")
        self.inner = inner

    def accepts(self, value: Any) -> bool:
        return value is None or self.inner.accepts(value)

    def convert(self, value: Any) -> Any:
        return None if value is None else self.inner.convert(value)

    def schema(self) -> dict[str, Any]:
        return _or_null(self.inner.schema())


class ListOf(Simple):
    """A list of at most ``max_len`` items that each pass ``item``, as a tuple; one message for
    the whole list, under the list's own name."""

    def __init__(self, item: Simple, max_len: int, message: str | None = None) -> None:
        super().__init__(message or f"must be a list of up to {max_len} items")
        self.item, self.max_len = item, max_len

    def accepts(self, value: Any) -> bool:
        return (
            isinstance(value, list)
            and len(value) <= self.max_len
            and all(self.item.accepts(v) for v in value)
        )

    def convert(self, value: Any) -> Any:
        return tuple(self.item.convert(v) for v in value)

    def schema(self) -> dict[str, Any]:
        return {"type": "array", "maxItems": self.max_len, "items": self.item.schema()}


class JsonObject(Check):
    """A free-form object (operator metadata), of at most ``max_bytes`` once encoded if given."""

    message = "must be an object"

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes

    def read(self, value: Any, at: str, problems: Problems) -> Any:
        if not isinstance(value, dict):
            problems[at] = self.message
        elif self.max_bytes is not None and len(json.dumps(value)) > self.max_bytes:
            problems[at] = f"must be at most {self.max_bytes} bytes of JSON"
        return value

    def to_json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "object", "description": self.message}
        if self.max_bytes is not None:
            out["description"] = f"an object of at most {self.max_bytes} bytes once encoded as JSON"
        return out


class NullMeans(Check):
    """Null stands for ``empty()`` (e.g. ``"metadata": null`` is ``{}``); anything else is ``inner``'s."""

    def __init__(self, inner: Check, empty: Callable[[], Any]) -> None:
        self.inner, self.empty = inner, empty
        self.message = inner.message

    def read(self, value: Any, at: str, problems: Problems) -> Any:
        return self.empty() if value is None else self.inner.read(value, at, problems)

    def to_json_schema(self) -> dict[str, Any]:
        return _or_null(self.inner.to_json_schema())


class NullOmits(Check):
    """Null is as if the key were not sent (an option set to null is no option)."""

    def __init__(self, inner: Check) -> None:
        self.inner = inner
        self.message = inner.message

    def read(self, value: Any, at: str, problems: Problems) -> Any:
        return UNSET if value is None else self.inner.read(value, at, problems)

    def to_json_schema(self) -> dict[str, Any]:
        return _or_null(self.inner.to_json_schema())


class Obj(Check):
    """An object of declared keys. Unknown keys are problems (``unknown`` says what is known;
    default "unknown field; known: <sorted keys>"), so is a missing ``required`` key (its
    check's message). ``parse`` gives the keys present, in the body's order."""

    message = "must be an object"

    def __init__(
        self, fields: Mapping[str, Check], *, unknown: str | None = None, required: Iterable[str] = ()
    ) -> None:
        self.fields = dict(fields)
        self.unknown = unknown or f"unknown field; known: {', '.join(sorted(self.fields))}"
        self.required = tuple(required)
        assert set(self.required) <= set(self.fields), "a required key must be declared"

    def to_json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "object",
            "properties": {k: c.to_json_schema() for k, c in self.fields.items()},
            "additionalProperties": False,  # unknown keys are problems
        }
        if self.required:
            out["required"] = list(self.required)
        return out

    def parse(self, value: Any) -> tuple[dict[str, Any], Problems]:
        """The top-level form: the values of the keys present, and every problem."""
        problems: Problems = {}
        out = self.read(value, "", problems)
        return (out if isinstance(out, dict) else {}), problems

    def read(self, value: Any, at: str, problems: Problems) -> Any:
        if not isinstance(value, dict):
            problems[at or "body"] = self.message
            return value

        def name(key: Any) -> str:
            return f"{at}.{key}" if at else str(key)

        for key in value:
            if key not in self.fields:
                problems[name(key)] = self.unknown
        read: dict[str, Any] = {}
        for key, check in self.fields.items():
            if key in value:
                read[key] = check.read(value[key], name(key), problems)
            elif key in self.required:
                problems[name(key)] = check.message
        return {k: read[k] for k in value if k in read and read[k] is not UNSET}
