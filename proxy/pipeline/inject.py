"""Turning a connection's decrypted parameters into the credential an upstream call carries.

The integration catalogue says *how* a credential travels (bearer, API key in a header, query
parameter or cookie, basic auth, OAuth2 bearer, or operator templates); this module builds the
exact header/query/cookie pairs once per decrypted ``Credentials`` and applies them to each call.

Security invariants:
- exactly one credential reaches the upstream: any caller-supplied header, cookie or query
  parameter of the same name is removed before the injected one is added, so a caller can neither
  override the stored credential nor smuggle a second one past the upstream's checks;
- a credential is never injected into a header that frames or routes the request, and a
  rendered value holding any control character (or ``;`` in a cookie) is refused, never sent
  (``proxy.pipeline.headers`` holds that one rule; connection writes and the catalogue apply it too, this
  is the last line for values that reached the store some other way);
- ``Injection.scrub`` lists the secret as it may come back in a response header (raw and
  percent-encoded), so proxy-only connections can redact it before the answer is relayed;
- messages name integrations, parameters and header names only, never a value.

Pure module: no aiohttp, no redis. ``apply`` runs on every proxied call, so the per-call work is
a single pass over the caller's headers with precomputed name sets.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus

from proxy.catalogue import AuthKind, Integration
from proxy.errors import ConnectionNotAuthorized, IntegrationNotProxyable, ValidationError
from proxy.pipeline.headers import (
    cookie_name_problem,
    cookie_value_problem,
    injected_header_problem,
    query_name_problem,
    value_problem,
)

__all__ = ["Injection", "apply", "build_injection", "not_proxyable"]

Pair = tuple[str, str]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUERY_VALUE_SAFE = "-._~"
_MIN_SCRUB = 4


@dataclass(frozen=True, slots=True)
class Injection:
    """The credential of one connection: header, query and cookie pairs, already rendered.

    Derived fields are computed once here so ``apply`` does no per-call string work beyond
    filtering the caller's own headers.
    """

    headers: tuple[Pair, ...] = ()
    query: tuple[Pair, ...] = ()
    cookies: tuple[Pair, ...] = ()
    # Lower-case header names the caller may not send (including "cookie" when cookies are set).
    drop_headers: frozenset[str] = field(init=False, repr=False, compare=False)
    query_names: frozenset[str] = field(init=False, repr=False, compare=False)
    query_suffix: str = field(init=False, repr=False, compare=False)
    cookie_names: frozenset[str] = field(init=False, repr=False, compare=False)
    cookie_suffix: str = field(init=False, repr=False, compare=False)
    # The rendered values that carry a secret (and the secrets inside them); None: all values do.
    # Templates set it, so a static companion header (an API version) is not redacted.
    secret_values: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    # The forms of the secret to redact from response headers, longest first.
    scrub: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        drop = {name.lower() for name, _ in self.headers}
        if self.cookies:
            drop.add("cookie")
        object.__setattr__(self, "drop_headers", frozenset(drop))
        object.__setattr__(self, "query_names", frozenset(name for name, _ in self.query))
        object.__setattr__(
            self,
            "query_suffix",
            "&".join(
                f"{quote(n, safe=_QUERY_VALUE_SAFE)}={quote(v, safe=_QUERY_VALUE_SAFE)}"
                for n, v in self.query
            ),
        )
        object.__setattr__(self, "cookie_names", frozenset(name for name, _ in self.cookies))
        object.__setattr__(self, "cookie_suffix", "; ".join(f"{n}={v}" for n, v in self.cookies))
        object.__setattr__(self, "scrub", _scrub_forms(self))

    def __repr__(self) -> str:
        # Values are credentials: only the names are shown.
        return (
            f"Injection(headers={[n for n, _ in self.headers]}, query={[n for n, _ in self.query]}, "
            f"cookies={[n for n, _ in self.cookies]})"
        )


def _scrub_forms(injection: Injection) -> tuple[str, ...]:
    """What of ``injection`` must never come back to the caller, in the forms it may come back in.

    The credential part of an ``Authorization`` value (``tok`` of ``Bearer tok``), the whole value, and secret
    parameters found inside a value (``secret_values``); only the shortest of nested candidates is kept (redacting
    ``tok`` redacts ``Bearer tok``). Each is listed raw and percent-encoded (as a query string or
    a ``Location`` would carry it).
    """
    values = injection.secret_values
    if values is None:
        values = tuple(v for _, v in (*injection.headers, *injection.query, *injection.cookies))
    candidates: set[str] = set(values)
    for name, value in injection.headers:
        scheme, sep, rest = value.partition(" ")
        if name.lower() == "authorization" and sep and _TOKEN.fullmatch(scheme):
            candidates.add(rest.strip())
    # Shorter strings are ordinary header text ("1", "en"): redacting them would mangle answers,
    # and the whole value they came from still is redacted.
    candidates = {c for c in candidates if len(c) >= _MIN_SCRUB}
    kept = [c for c in candidates if not any(o != c and o in c for o in candidates)]
    forms = {f for c in kept for f in (c, quote(c, safe=""), quote_plus(c, safe=""))}
    return tuple(sorted(forms, key=len, reverse=True))


def not_proxyable(integration: Integration) -> IntegrationNotProxyable:
    if not integration.catalogued:
        why = (
            "it is not in the integration catalogue, so its connections are served to the Connection "
            "Service only; GET /admin/integrations lists the integrations the proxy serves (operators "
            "add their own with integrations_dirs)"
        )
    else:
        why = "its agents speak another protocol; read its parameters from the Connection Service instead"
    return IntegrationNotProxyable(
        f"integration {integration.id!r} is not proxied: {why}",
        fields={"connection_id": f"integration {integration.id!r} is not proxied"},
    )


def _param(integration: Integration, params: Mapping[str, Any], name: str) -> str:
    value = params.get(name)
    if value is None or value == "":
        raise ConnectionNotAuthorized(
            f"the connection's {integration.id!r} parameter {name!r} is not set; "
            "complete the connection (PUT /admin/tenants/{tenant_id}/connections/{connection_id} "
            "or a connect session)"
        )
    return str(value)


def _check_header(integration: Integration, name: str, value: str) -> Pair:
    problem = injected_header_problem(name)
    if problem is not None:
        # A header name is not a secret, but a non-token one may be garbage: shown only if valid.
        shown = f" {name[:64]!r}" if _TOKEN.fullmatch(name) else ""
        raise ValidationError(
            f"integration {integration.id!r} would inject its credential into header{shown}, which "
            f"{problem}; fix the integration or the connection's header_name",
            fields={"header_name": problem},
        )
    problem = value_problem(value)
    if problem is not None:
        raise ValidationError(
            f"the credential integration {integration.id!r} injects into header {name!r} {problem}; "
            "fix the connection's parameters",
            fields={name: f"the rendered value {problem}"},
        )
    return name, value


def _check_query(integration: Integration, name: str, value: str) -> Pair:
    problem = query_name_problem(name) or value_problem(value)
    if problem is not None:
        raise ValidationError(
            f"integration {integration.id!r} injects a query parameter that {problem}; "
            "fix the connection's parameters",
            fields={"query_param": problem},
        )
    return name, value


def _check_cookie(integration: Integration, name: str, value: str) -> Pair:
    problem = cookie_name_problem(name) or cookie_value_problem(value)
    if problem is not None:
        raise ValidationError(
            f"integration {integration.id!r} injects a cookie whose name or value {problem}; "
            "fix the connection's parameters",
            fields={"cookie_name" if cookie_name_problem(name) else name: problem},
        )
    return name, value


def _render_pairs(
    integration: Integration, templates: Sequence[Pair], params: Mapping[str, Any]
) -> list[Pair]:
    out = []
    for name_tpl, value_tpl in templates:
        name = integration.render(name_tpl, params) if "{" in name_tpl else name_tpl
        out.append((name.strip(), integration.render(value_tpl, params)))
    return out


def _secret_values(
    integration: Integration, params: Mapping[str, Any], templates: Sequence[Pair], rendered: Sequence[Pair]
) -> tuple[str, ...]:
    """The rendered values whose templates use a secret parameter, and those secrets' values."""
    secret = integration.secret_names
    carried = [
        value
        for (name_tpl, value_tpl), (_, value) in zip(templates, rendered, strict=True)
        if integration.template_params(name_tpl, value_tpl) & secret
    ]
    raw = [str(params[n]) for n in secret if params.get(n) not in (None, "")]
    return (*carried, *(r for r in raw if any(r in v for v in carried)))


def build_injection(
    integration: Integration, params: Mapping[str, Any], *, access_token: str | None = None
) -> Injection:
    """The credential ``integration`` injects, built from decrypted ``params``.

    OAuth2 kinds use ``access_token`` (from the token manager) and fall back to the stored
    ``access_token`` parameter. Raises ``ValidationError`` for opaque integrations and for values
    that would corrupt the request, ``ConnectionNotAuthorized`` when a needed secret is missing.
    """
    kind = integration.auth
    if kind == AuthKind.BEARER:
        token = _param(integration, params, "token")
        return Injection(headers=(_check_header(integration, "Authorization", f"Bearer {token}"),))
    if kind == AuthKind.API_KEY:
        key = _param(integration, params, "api_key")
        location = str(params.get("location") or "header")
        if location == "header":
            name = str(params.get("header_name") or "X-API-Key").strip()
            return Injection(headers=(_check_header(integration, name, key),))
        if location == "query":
            name = str(params.get("query_param") or "api_key")
            return Injection(query=(_check_query(integration, name, key),))
        if location == "cookie":
            name = str(params.get("cookie_name") or "api_key").strip()
            return Injection(cookies=(_check_cookie(integration, name, key),))
        raise ValidationError(
            f"integration {integration.id!r}: location must be header, query or cookie",
            fields={"location": "must be header, query or cookie"},
        )
    if kind == AuthKind.BASIC:
        user = _param(integration, params, "username")
        password = str(params.get("password") or "")
        if ":" in user:
            raise ValidationError(
                "a basic-auth username cannot contain ':'; fix the connection's username",
                fields={"username": "contains ':'"},
            )
        encoded = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return Injection(headers=(_check_header(integration, "Authorization", f"Basic {encoded}"),))
    if kind.is_oauth2:
        token = access_token if access_token else _param(integration, params, "access_token")
        return Injection(headers=(_check_header(integration, "Authorization", f"Bearer {token}"),))
    if kind == AuthKind.TEMPLATE:
        headers = _render_pairs(integration, integration.inject_headers, params)
        query = _render_pairs(integration, integration.inject_query, params)
        cookies = _render_pairs(integration, integration.inject_cookies, params)
        return Injection(
            headers=tuple(_check_header(integration, n, v) for n, v in headers),
            query=tuple(_check_query(integration, n, v) for n, v in query),
            cookies=tuple(_check_cookie(integration, n, v) for n, v in cookies),
            secret_values=_secret_values(
                integration,
                params,
                (*integration.inject_headers, *integration.inject_query, *integration.inject_cookies),
                (*headers, *query, *cookies),
            ),
        )
    raise not_proxyable(integration)


def _filter_cookies(values: list[str], drop: frozenset[str]) -> list[str]:
    kept = []
    for value in values:
        for part in value.split(";"):
            part = part.strip()
            if part and part.partition("=")[0].strip() not in drop:
                kept.append(part)
    return kept


def _filter_query(query: str, drop: frozenset[str]) -> str:
    kept = []
    for part in query.split("&"):
        if not part:
            continue
        # Compared decoded, so "api%5Fkey=" or "api_key" with '+' tricks cannot sneak past.
        if unquote_plus(part.partition("=")[0]) in drop:
            continue
        kept.append(part)
    return "&".join(kept)


def apply(injection: Injection, headers: list[Pair], query: str) -> tuple[list[Pair], str]:
    """The caller's (already cleaned) ``headers`` and raw ``query`` with the credential added.

    Same-named caller headers, cookies and query parameters are removed first, so exactly one
    credential reaches the upstream; the caller's other cookies are merged with the injected
    ones into a single ``Cookie`` header.
    """
    drop = injection.drop_headers
    if drop:
        out: list[Pair] = []
        caller_cookies: list[str] = []
        for pair in headers:
            lname = pair[0].lower()
            if lname in drop:
                if lname == "cookie":
                    caller_cookies.append(pair[1])
                continue
            out.append(pair)
        out.extend(injection.headers)
        if injection.cookies:
            kept = _filter_cookies(caller_cookies, injection.cookie_names)
            kept.append(injection.cookie_suffix)
            out.append(("Cookie", "; ".join(kept)))
        headers = out
    if injection.query:
        query = _filter_query(query, injection.query_names) if query else ""
        query = f"{query}&{injection.query_suffix}" if query else injection.query_suffix
    return headers, query
