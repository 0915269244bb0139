"""Connect sessions: the short-lived links an end user opens to connect one integration.

Why it exists: an admin (the partner's backend) creates a session for one tenant, connection
and optionally a runtime user; the end user gets only a link. The link's token is
``<session_id>.<secret>``: the session is stored under its id, with only a hash of the secret,
so the OAuth ``state`` can refer to a session by id without carrying a usable token, and a store
dump yields no working link. Sessions end when used (a short tombstone remembers that, so a
second visit says "already used" instead of "unknown").

Also here, pure and unit-tested: validation of the create request (origins, return URL,
identifiers), per-page CSRF values bound to the session, and the end-user form (which fields it
shows and how posted values become connection parameters).

Pure module: no aiohttp, no redis.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from proxy import jsonin
from proxy.catalogue import AuthKind, FieldSpec, Integration
from proxy.errors import ValidationError
from proxy.model import check_id
from proxy.oauth.flows import TOKEN_PARAMS
from proxy.security import destinations

SESSION_NAMESPACE = "connect"
USED_NAMESPACE = "connect-used"
USED_TTL_S = 24 * 3600
CSRF_MAX_AGE_S = 6 * 3600
MAX_VALUE_CHARS = 16384
_SID_RE = re.compile(r"[A-Za-z0-9_-]{16}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


# --- tokens ------------------------------------------------------------------------------------


def new_session_token() -> tuple[str, str]:
    """(session_id, full link token)."""
    sid = secrets.token_urlsafe(12)
    return sid, f"{sid}.{secrets.token_urlsafe(32)}"


def split_session_token(token: str) -> tuple[str, str] | None:
    sid, dot, secret = token.partition(".")
    if not dot or not _SID_RE.fullmatch(sid) or not _SECRET_RE.fullmatch(secret):
        return None
    return sid, secret


def secret_hash(secret: str) -> str:
    return hashlib.sha256(b"connection-proxy connect link\x00" + secret.encode()).hexdigest()


# --- the session ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectSession:
    session_id: str
    secret_hash: str
    tenant_id: str
    integration_id: str
    connection_id: str
    created_at: float
    expires_at: float
    created_by: str
    runtime_user_id: str | None = None
    default_connection_id: str | None = None
    return_url: str | None = None
    allowed_origins: tuple[str, ...] = ()
    csrf_key: str = field(default="", repr=False)
    # The operator's preset (non-secret, locked on the page) and what the page calls the app.
    parameters: Mapping[str, Any] = field(default_factory=dict)
    display_name: str | None = None
    logo_url: str | None = None
    # Destination fields the operator lets the end user enter, each bounded by host patterns.
    user_settable: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["allowed_origins"] = list(self.allowed_origins)
        d["parameters"] = dict(self.parameters)
        d["user_settable"] = {k: list(v) for k, v in self.user_settable.items()}
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConnectSession:
        known = set(cls.__dataclass_fields__)
        d = {k: v for k, v in data.items() if k in known}
        d["allowed_origins"] = tuple(d.get("allowed_origins") or ())
        d["parameters"] = dict(d.get("parameters") or {})
        d["user_settable"] = {k: tuple(v) for k, v in (d.get("user_settable") or {}).items()}
        return cls(**d)

    def opens_with(self, secret: str) -> bool:
        return hmac.compare_digest(secret_hash(secret), self.secret_hash)

    # Per-page CSRF: "<issued>.<mac>" under a key that lives only in this session, so a value
    # is worthless for any other session and expires on its own.
    def csrf_value(self, now: float) -> str:
        issued = str(int(now))
        return f"{issued}.{self._csrf_mac(issued)}"

    def csrf_ok(self, value: str | None, now: float) -> bool:
        if not value or not self.csrf_key:
            return False
        issued, dot, mac = value.partition(".")
        if not dot or not issued.isdigit():
            return False
        if not 0 <= now - int(issued) <= CSRF_MAX_AGE_S:
            return False
        return hmac.compare_digest(mac, self._csrf_mac(issued))

    def _csrf_mac(self, issued: str) -> str:
        msg = f"connect-form|{self.session_id}|{issued}".encode()
        return hmac.new(self.csrf_key.encode(), msg, hashlib.sha256).hexdigest()


def new_csrf_key() -> str:
    return secrets.token_urlsafe(32)


# --- the create request --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionRequest:
    integration_id: str
    connection_id: str | None
    runtime_user_id: str | None
    default_connection_id: str | None
    return_url: str | None
    allowed_origins: tuple[str, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    display_name: str | None = None
    logo_url: str | None = None
    user_settable: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def normalize_origin(value: Any) -> str | None:
    """``scheme://host[:port]`` in the form browsers serialise origins, or None if it is not one.

    Exact origins only (no wildcards): the same list feeds CSP ``frame-ancestors`` and the
    ``postMessage`` target, and postMessage has no wildcard matching.
    """
    if not isinstance(value, str) or len(value) > 300:
        return None
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host or parts.username is not None or parts.password is not None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    if ":" in host:
        host = f"[{host}]"
    if not _HOST_RE.fullmatch(host):
        return None
    suffix = f":{port}" if port is not None and port != _DEFAULT_PORTS[scheme] else ""
    return f"{scheme}://{host}{suffix}"


def check_return_url(value: Any) -> str | None:
    """An absolute http(s) URL without credentials or control characters, else None."""
    if not isinstance(value, str) or not 0 < len(value) <= 2000:
        return None
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None:
        return None
    return value


def _opt_id(body: Mapping[str, Any], name: str, problems: dict[str, str]) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    try:
        return check_id(name, value)
    except ValidationError:
        problems[name] = "must be 1-200 characters of letters, digits and . _ : @ + = ~ -"
        return None


def parse_session_request(body: Any) -> SessionRequest:
    """Validates the admin's create request; every problem is reported at once, by field."""
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object", fields={"body": "must be a JSON object"})
    problems: dict[str, str] = {}
    unknown = sorted(set(body) - set(SessionRequest.__dataclass_fields__))
    for name in unknown:
        problems[name] = "unknown field"
    integration_id = _opt_id(body, "integration_id", problems)
    if integration_id is None and "integration_id" not in problems:
        problems["integration_id"] = "is required"
    connection_id = _opt_id(body, "connection_id", problems)
    runtime_user_id = _opt_id(body, "runtime_user_id", problems)
    default_id = _opt_id(body, "default_connection_id", problems)
    if runtime_user_id and not default_id and "default_connection_id" not in problems:
        problems["default_connection_id"] = (
            "is required with runtime_user_id: a runtime user connection overrides a default connection"
        )
    if default_id and not runtime_user_id and "runtime_user_id" not in problems:
        problems["runtime_user_id"] = "is required with default_connection_id"
    if default_id and connection_id and default_id == connection_id:
        problems["connection_id"] = "must differ from default_connection_id"
    return_url = None
    if body.get("return_url") not in (None, ""):
        return_url = check_return_url(body["return_url"])
        if return_url is None:
            problems["return_url"] = "must be an absolute http(s) URL without spaces or credentials"
    origins: list[str] = []
    raw_origins = body.get("allowed_origins")
    if raw_origins is not None:
        if not isinstance(raw_origins, list) or len(raw_origins) > 20:
            problems["allowed_origins"] = "must be a list of at most 20 origins like https://app.example.com"
        else:
            for i, raw in enumerate(raw_origins):
                origin = normalize_origin(raw)
                if origin is None:
                    problems[f"allowed_origins[{i}]"] = (
                        "must be an origin: scheme, host and optional port, e.g. https://app.example.com"
                    )
                elif origin not in origins:
                    origins.append(origin)
    preset = body.get("parameters")
    if preset is None:
        preset = {}
    elif not isinstance(preset, dict) or len(preset) > 50:
        problems["parameters"] = "must be an object of at most 50 non-secret parameters"
        preset = {}
    display_name = body.get("display_name")
    if display_name is not None and (
        not isinstance(display_name, str)
        or not 0 < len(display_name.strip()) <= 100
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in display_name)
    ):
        problems["display_name"] = "must be a name of 1-100 printable characters"
        display_name = None
    logo_url = None
    if body.get("logo_url") not in (None, ""):
        logo_url = check_return_url(body["logo_url"])
        if logo_url is None or not logo_url.lower().startswith("https://"):
            problems["logo_url"] = "must be an absolute https URL without spaces or credentials"
            logo_url = None
    user_settable = _user_settable(body.get("user_settable"), problems)
    if problems:
        raise ValidationError(
            "the connect session request is invalid: " + "; ".join(f"{k} {v}" for k, v in problems.items()),
            fields=problems,
        )
    assert integration_id is not None
    return SessionRequest(
        integration_id,
        connection_id,
        runtime_user_id,
        default_id,
        return_url,
        tuple(origins),
        parameters=dict(preset),
        display_name=display_name.strip() if display_name else None,
        logo_url=logo_url,
        user_settable=user_settable,
    )


def _user_settable(raw: Any, problems: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """``{"base_url": ["*.example.com"]}``: fields an end user may enter, each within host patterns."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > 20:
        problems["user_settable"] = 'must be an object like {"base_url": ["*.example.com"]}'
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for name, patterns in raw.items():
        if not (
            isinstance(patterns, list)
            and 0 < len(patterns) <= 20
            and all(isinstance(p, str) and _pattern_ok(p) for p in patterns)
        ):
            problems[f"user_settable.{name}"] = (
                "must be a non-empty list of host names or *.suffix patterns (no bare '*')"
            )
            continue
        out[str(name)] = tuple(p.strip().lower() for p in patterns)
    return out


def _pattern_ok(pattern: str) -> bool:
    # A bound that admits everything is no bound: "*" or "*.com"-style single labels are refused.
    body = pattern.strip().lower().removeprefix("*.")
    return bool(_HOST_RE.fullmatch(body)) and "." in body and len(pattern) <= 255


def return_url_with(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query (replacing same-named ones)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query += list(params.items())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


# --- the end-user form ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FormField:
    """One input of the connect form, ready for the template (never holds a secret value)."""

    name: str
    label: str
    widget: str  # text | password | url | number | select | checkbox | textarea
    required: bool
    help: str | None = None
    choices: tuple[str, ...] = ()
    value: str = ""
    is_set: bool = False  # a secret already stored: leaving the input blank keeps it
    error: str | None = None
    advanced: bool = False
    reenter: bool = False  # the user typed it, the page does not send it back


def user_fields(integration: Integration) -> tuple[FieldSpec, ...]:
    """The fields an end user fills in. OAuth token fields are the flow's output, not input."""
    if integration.auth == AuthKind.OAUTH2_AUTHORIZATION_CODE:
        return tuple(f for f in integration.fields if f.name not in TOKEN_PARAMS)
    return integration.fields


def uses_oauth_redirect(integration: Integration) -> bool:
    return integration.auth == AuthKind.OAUTH2_AUTHORIZATION_CODE


def _label(spec: FieldSpec) -> str:
    return spec.label or spec.name.replace("_", " ").capitalize()


def _widget(spec: FieldSpec) -> str:
    if spec.secret:
        return "password"
    if spec.choices:
        return "select"
    return {"url": "url", "integer": "number", "boolean": "checkbox", "object": "textarea"}.get(
        spec.type, "text"
    )


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else ""
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def build_form(
    integration: Integration,
    *,
    values: Mapping[str, Any],
    secrets_set: frozenset[str] | set[str] = frozenset(),
    errors: Mapping[str, str] | None = None,
    reenter: frozenset[str] | set[str] = frozenset(),
    hidden: frozenset[str] | set[str] = frozenset(),
    settable: Mapping[str, tuple[str, ...] | None] | None = None,
) -> list[FormField]:
    """Form fields with current public values; secret inputs are always rendered empty
    (``reenter`` names secrets the user had typed, so the page can ask for them again).
    ``hidden`` fields (the operator's: destinations, session presets) are not inputs at all."""
    errors = errors or {}
    settable = settable or {}
    out = []
    for spec in user_fields(integration):
        if spec.name in hidden or (spec.name in integration.destination_names and spec.name not in settable):
            continue
        value = "" if spec.secret else _shown(values.get(spec.name, spec.default))
        bound = settable.get(spec.name) or (spec.user_hosts if spec.name in settable else None)
        out.append(
            FormField(
                name=spec.name,
                label=_label(spec),
                widget=_widget(spec),
                required=spec.required and not (spec.secret and spec.name in secrets_set),
                help=f"Must be under {', '.join(bound)}." if bound else spec.help,
                choices=spec.choices or (),
                value=value,
                is_set=spec.secret and spec.name in secrets_set,
                error=errors.get(spec.name),
                # Optional fields that come with a default rarely need changing: fold them away.
                advanced=not spec.required and spec.default is not None,
                reenter=spec.secret and spec.name in reenter,
            )
        )
    return out


def _convert(spec: FieldSpec, raw: str) -> tuple[Any, str | None]:
    if spec.type == "integer":
        try:
            return int(raw), None
        except ValueError:
            return None, "must be a whole number"
    if spec.type == "url":
        parts = urlsplit(raw)
        if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.netloc or " " in raw:
            return None, "must be a full URL starting with https://"
        return raw, None
    if spec.type == "object":
        try:
            value = jsonin.loads(raw)
        except jsonin.JsonInputError as exc:
            return None, f"must be a plain JSON object ({exc.reason})"
        except ValueError:
            return None, "must be a JSON object"
        return (value, None) if isinstance(value, dict) else (None, "must be a JSON object")
    if spec.choices and raw not in spec.choices:
        return None, f"must be one of {', '.join(spec.choices)}"
    return raw, None


def parse_form(
    integration: Integration,
    form: Mapping[str, str],
    *,
    present: frozenset[str] | set[str] = frozenset(),
    hidden: frozenset[str] | set[str] = frozenset(),
    settable: Mapping[str, tuple[str, ...] | None] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """(parameters to write, field -> problem). ``present`` names parameters already stored:
    a blank secret input keeps the stored secret instead of failing "required". ``hidden``
    fields are never read from the form, whatever was posted; a user-settable destination
    (``settable``) is checked against its bounds."""
    params: dict[str, Any] = {}
    problems: dict[str, str] = {}
    settable = settable or {}
    for spec in user_fields(integration):
        if spec.name in hidden:
            continue
        if spec.name in integration.destination_names and spec.name not in settable:
            continue  # the operator's: a value posted for it is ignored, never stored
        if spec.type == "boolean":
            params[spec.name] = form.get(spec.name, "").lower() in ("on", "true", "1", "yes")
            continue
        raw = form.get(spec.name, "")
        if len(raw) > MAX_VALUE_CHARS:
            problems[spec.name] = f"is longer than {MAX_VALUE_CHARS} characters"
            continue
        raw = raw.strip()
        if not raw:
            if spec.required and not (spec.secret and spec.name in present):
                problems[spec.name] = "is required"
            elif not spec.secret:
                params[spec.name] = None  # cleared by the user
            continue
        value, problem = _convert(spec, raw)
        if problem is None and spec.name in settable:
            problem = destinations.check_user_destination(integration, spec.name, value, settable[spec.name])
        if problem:
            problems[spec.name] = problem
        else:
            params[spec.name] = value
    for key, problem in integration.validate_params(params).items():
        problems.setdefault(key.removeprefix("parameters."), problem)
    return params, problems
