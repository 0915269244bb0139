"""What a connection write may say, declared: the typed input of ``proxy.vault.connections``.

Why it exists: the admin API's PUT and PATCH bodies (and the proxy knobs under ``options``) are
part of the contract; declaring them in one table keeps every key, bound and message in one
place, and lets the connection service take a typed ``ConnectionBody`` instead of a dict it
would have to distrust. Only the *shape* is checked here: whether parameters fit the integration,
whether a default connection exists, whether a base URL is allowed, are the service's rules
(they need the catalogue and the store) and join these problems in the same 422.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from proxy.errors import ValidationError
from proxy.model import RateWindow, parse_rate_limits
from proxy.security.destinations import USERS_CHOOSE_OPTION
from proxy.shapes import (
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
    Problems,
    Raw,
    Text,
    Unset,
)

__all__ = [
    "METADATA_MAX_BYTES",
    "OPTIONS",
    "PATCH_SHAPE",
    "PUT_SHAPE",
    "TIMEOUT_KEYS",
    "ConnectionBody",
    "patch_body",
    "put_body",
]

TIMEOUT_KEYS: Final = ("connect_s", "read_s", "total_s")
METADATA_MAX_BYTES: Final = 64 * 1024


class RateLimits(Check):
    """Configured windows (``proxy.model.parse_rate_limits``: ``[{"limit", "window"}]`` or
    Runtara's ``{"requestsPerSecond", "burstSize"}``); problems are named ``<at>[i]``."""

    message = "must be a list"

    def __init__(self, *, as_dicts: bool = False) -> None:
        self.as_dicts = as_dicts

    def read(self, value: Any, at: str, problems: Problems) -> Any:
        try:
            windows = parse_rate_limits(value, at)
        except ValidationError as exc:
            problems.update(exc.fields)
            return value
        return [w.to_dict() for w in windows] if self.as_dicts else windows

    def to_json_schema(self) -> dict[str, Any]:
        return {
            "description": 'windows like [{"limit": 100, "window": "1m"}] or Runtara\'s '
            '{"requestsPerSecond": 10, "burstSize": 20}; windows from 1ms to 31d',
            "anyOf": [{"type": "null"}, _WINDOW_SCHEMA, {"type": "array", "items": _WINDOW_SCHEMA}],
        }


_DURATION: Final = {
    "anyOf": [
        {"type": "number", "minimum": 0.001, "maximum": 31 * 86400},
        {"type": "string", "pattern": r"^\s*\d+(?:\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
    ]
}
_BURST: Final = {"type": ["integer", "null"], "minimum": 1}
# proxy.model.RateWindow.parse, said in JSON Schema (other keys of a window are ignored).
_WINDOW_SCHEMA: Final = {
    "anyOf": [
        {
            "type": "object",
            "required": ["requestsPerSecond"],
            "properties": {
                "requestsPerSecond": {"type": "number", "exclusiveMinimum": 0},
                "burstSize": _BURST,
            },
        },
        {
            "type": "object",
            "required": ["limit"],
            "not": {"required": ["requestsPerSecond"]},
            "anyOf": [{"required": ["window"]}, {"required": ["window_s"]}],
            "properties": {
                "limit": {"type": "integer", "minimum": 1},
                "window": _DURATION,
                "window_s": _DURATION,
                "burst": _BURST,
            },
        },
    ]
}


_SIMPLE_OPTIONS: Final[dict[str, Check]] = {
    "max_wait_ms": Int(0),
    "retries": Int(0, 5),
    "quota_key": Ident(),
    "quota_weight": Number(gt=0),
    "proxy_only": Bool(),
    # Lets this default's runtime users pick their own destination, within its host binding.
    USERS_CHOOSE_OPTION: Bool(),
    "reserve": Int(0),
}
_OPTION_FIELDS: Final[dict[str, Check]] = {
    **{name: NullOmits(check) for name, check in _SIMPLE_OPTIONS.items()},
    "timeouts": Obj(
        {k: Number(gt=0, message="must be a number of seconds > 0") for k in TIMEOUT_KEYS},
        unknown=f"unknown; use {', '.join(TIMEOUT_KEYS)}",
    ),
    # The budget a quota group shares (e.g. one OAuth app's limit across tenants).
    "quota_rate_limits": RateLimits(as_dicts=True),
}
# The proxy knobs of a connection (README: "Proxy knobs per connection").
OPTIONS: Final = Obj(_OPTION_FIELDS, unknown=f"unknown option; known: {', '.join(sorted(_OPTION_FIELDS))}")

_SETTINGS: Final[dict[str, Check]] = {
    "connection_subtype": Nullable(Text(1, 200)),
    "runtime_user_id": Nullable(Ident()),
    "default_connection_id": Nullable(Ident()),
    "rate_limits": RateLimits(),
    "allowed_hosts": Nullable(
        ListOf(Text(1, 255, stripped=True), 100),
        message="must be null or a list of up to 100 host names or patterns",
    ),
    "metadata": NullMeans(JsonObject(METADATA_MAX_BYTES), dict),
    "options": NullMeans(OPTIONS, dict),
}
# Names and values are the integration's to judge (the service checks them against the catalogue).
_PARAMETERS: Final = NullMeans(JsonObject(), dict)
_PUT: Final = Obj(
    {
        **_SETTINGS,
        "integration_id": Ident("required: an integration id such as http_bearer (GET /admin/integrations)"),
        "parameters": _PARAMETERS,
    },
    required=("integration_id",),
)
# The same keys: PATCH compares integration_id with the stored one (it cannot change).
_PATCH: Final = Obj({**_SETTINGS, "integration_id": Raw(), "parameters": _PARAMETERS})
SETTING_NAMES: Final = tuple(_SETTINGS)
# The declarations themselves, for the OpenAPI document (proxy.web.openapi).
PUT_SHAPE: Final = _PUT
PATCH_SHAPE: Final = _PATCH


@dataclass(frozen=True, slots=True)
class ConnectionBody:
    """A PUT or PATCH body, as declared. Each key the body did not send is ``UNSET`` (PUT takes
    the integration's default rate limits, PATCH keeps what is stored).

    ``problems`` is what the body's shape got wrong; the service adds its own and answers them
    all in one 422, so nothing here is used while it is not empty (a value under a problem is
    the raw value sent, kept so that cross-field rules still see it was sent).
    """

    integration_id: Any = UNSET  # PUT: an id; PATCH: whatever was sent, compared with the stored one
    parameters: Mapping[str, Any] | Unset = UNSET  # names and values checked against the integration
    connection_subtype: str | Unset | None = UNSET
    runtime_user_id: str | Unset | None = UNSET
    default_connection_id: str | Unset | None = UNSET
    rate_limits: tuple[RateWindow, ...] | Unset = UNSET
    allowed_hosts: tuple[str, ...] | Unset | None = UNSET
    metadata: dict[str, Any] | Unset = UNSET
    options: dict[str, Any] | Unset = UNSET
    problems: Mapping[str, str] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """The record fields the body sets (every key but integration_id and parameters)."""
        return {n: v for n in SETTING_NAMES if (v := getattr(self, n)) is not UNSET}

    def sent(self) -> list[str]:
        """The keys the body carried, sorted (the audit trail names them)."""
        return sorted(
            f.name for f in fields(self) if f.name != "problems" and getattr(self, f.name) is not UNSET
        )

    def params(self) -> Mapping[str, Any]:
        """The parameters sent: {} when none (or when not an object, which is a problem)."""
        return self.parameters if isinstance(self.parameters, dict) else {}


def _body(shape: Obj, raw: Mapping[str, Any]) -> ConnectionBody:
    values, problems = shape.parse(dict(raw))
    return ConnectionBody(**values, problems=problems)


def put_body(raw: Mapping[str, Any]) -> ConnectionBody:
    """A PUT body (create or replace): ``integration_id`` required, everything else optional."""
    return _body(_PUT, raw)


def patch_body(raw: Mapping[str, Any]) -> ConnectionBody:
    """A PATCH body (merge): the same keys; none required."""
    return _body(_PATCH, raw)
