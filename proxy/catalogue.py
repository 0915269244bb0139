"""The integration catalogue: what each ``integration_id`` means, as data.

Each integration is a TOML file (built-ins in ``proxy/builtin_integrations/``, package data, also
reached as ``config/integrations/``; operators add their own
directories with the ``integrations_dirs`` setting). A file says which parameters exist, which
are secret (encrypted at rest, never shown), which are required before the connection is
*active*, how credentials are injected, the base URL (fixed or templated), which rate-limit
header styles the upstream speaks, and OAuth2 endpoints. Everything is validated at start-up:
a bad file stops the process with an error naming the file and key, including a static inject
header, query or cookie name that ``proxy.pipeline.headers`` forbids (a credential must never frame or
route a request). ``validate_params`` is the one write-time check every connection write calls:
it applies the same rules to the parameters that become injected names and values.

Destination fields: some parameters decide where a secret goes or how it is framed (a base URL,
an OAuth endpoint, a header name, a shop domain, a region). They are the operator's to set: an end
user on a connect page may enter one only where the integration declares it ``user_settable``
within a fixed list (``choices``) or host patterns (``user_hosts``). Which fields are destinations
is derived here, once, from well-known names, explicit ``destination = true`` flags and every
variable the base-URL and injected-name templates read, so an operator's integration cannot
forget one.

Pure module: no aiohttp, no redis. Templates are Jinja2 in an immutable sandbox, compiled once.
"""

from __future__ import annotations

import base64
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import StrictUndefined, Template, TemplateError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from proxy.errors import ConfigError, ValidationError
from proxy.pipeline.headers import (
    cookie_name_problem,
    cookie_value_problem,
    injected_header_problem,
    query_name_problem,
    value_problem,
)


class AuthKind(StrEnum):
    """How an integration's credential travels (its file's ``auth``); a plain string in JSON."""

    BEARER = "bearer"
    API_KEY = "api_key"
    BASIC = "basic"
    OAUTH2_AUTHORIZATION_CODE = "oauth2_authorization_code"
    OAUTH2_CLIENT_CREDENTIALS = "oauth2_client_credentials"
    TEMPLATE = "template"  # the integration's own inject headers, query and cookies
    OPAQUE = "opaque"  # never proxied (SFTP, Postgres): handed out by the Connection Service only

    @property
    def is_oauth2(self) -> bool:
        """The token manager supplies the injected token."""
        return self in (AuthKind.OAUTH2_AUTHORIZATION_CODE, AuthKind.OAUTH2_CLIENT_CREDENTIALS)

    @classmethod
    def parse(cls, value: Any, where: str) -> AuthKind:
        """``value`` as a kind; ``ConfigError`` naming ``where`` and the kinds otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(where, f"must be one of {', '.join(AUTH_KINDS)}") from None


AUTH_KINDS = tuple(kind.value for kind in AuthKind)
FIELD_TYPES = ("string", "integer", "boolean", "url", "object", "any")
# The built-in api_key kind: which parameter names which kind of injected name.
API_KEY_NAME_PARAMS = {
    "header_name": injected_header_problem,
    "query_param": query_name_problem,
    "cookie_name": cookie_name_problem,
}
# Parameters each built-in kind renders into the request (templates: those their templates use).
_INJECTED_BY_KIND: dict[AuthKind, frozenset[str]] = {
    AuthKind.BEARER: frozenset({"token"}),
    AuthKind.API_KEY: frozenset({"api_key", *API_KEY_NAME_PARAMS}),
    AuthKind.BASIC: frozenset({"username"}),  # the password travels base64-encoded: any character is fine
    AuthKind.OAUTH2_AUTHORIZATION_CODE: frozenset({"access_token"}),
    AuthKind.OAUTH2_CLIENT_CREDENTIALS: frozenset({"access_token"}),
}
# The built-ins are package data, the one copy: a source checkout, an editable install and a wheel
# load the same files (config/integrations is a symlink to them for people browsing the tree).
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin_integrations"
# Parameters that decide where a secret goes or how it is framed, whatever an integration says.
DESTINATION_NAMES = frozenset(
    {
        "base_url",
        "token_url",
        "auth_url",
        "revocation_url",
        "header_name",
        "location",
        "query_param",
        "cookie_name",
        "shop_domain",
        "region",
        "allowed_hosts",
    }
)
IMPLICIT_SOURCE = "implicit"  # the source of an integration id that no file describes


def _b64(value: Any) -> str:
    return base64.b64encode(str(value).encode()).decode()


_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_ENV.filters["b64encode"] = _b64
_ENV.filters["urlencode"] = lambda v: quote(str(v), safe="")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    type: str = "string"
    secret: bool = False
    required: bool = False
    label: str | None = None
    help: str | None = None
    default: Any = None
    choices: tuple[str, ...] | None = None
    # Decides where a secret goes or how it is framed (see the module docstring).
    destination: bool = False
    # An end user may set this destination on a connect page, within ``choices`` or ``user_hosts``.
    user_settable: bool = False
    user_hosts: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class OAuth2Spec:
    auth_url: str | None = None
    token_url: str | None = None
    revocation_url: str | None = None
    scopes: tuple[str, ...] = ()
    token_auth: str = "basic"
    pkce: bool = True
    extra_auth_params: dict[str, str] = field(default_factory=dict)
    # RFC 9207: the issuer identifier the callback's ``iss`` must equal, and whether the server's
    # metadata says it always sends ``iss`` (then a callback without one is refused).
    issuer: str | None = None
    iss_parameter_supported: bool = False


@dataclass(frozen=True)
class Integration:
    id: str
    label: str
    auth: AuthKind
    fields: tuple[FieldSpec, ...]
    base_url: str | None = None  # fixed or Jinja template; None = the base_url parameter
    allowed_hosts: tuple[str, ...] | None = None
    ratelimit_styles: tuple[str, ...] | None = None  # None = generic fallback (all styles)
    default_rate_limits: tuple[dict[str, Any], ...] = ()
    inject_headers: tuple[tuple[str, str], ...] = ()
    inject_query: tuple[tuple[str, str], ...] = ()
    inject_cookies: tuple[tuple[str, str], ...] = ()
    oauth2: OAuth2Spec | None = None
    test_request: dict[str, Any] | None = None
    source: str = "builtin"
    # Every parameter that decides where a secret goes or how it is framed (derived at load).
    destination_names: frozenset[str] = frozenset()
    _compiled: dict[str, Template] = field(default_factory=dict, repr=False, compare=False)

    @property
    def proxyable(self) -> bool:
        return self.auth != AuthKind.OPAQUE

    @property
    def catalogued(self) -> bool:
        """False for an id nobody described (``opaque_integration``): stored, never proxied."""
        return self.source != IMPLICIT_SOURCE

    @property
    def secret_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields if f.secret)

    def field(self, name: str) -> FieldSpec | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None

    def is_secret(self, name: str) -> bool:
        spec = self.field(name)
        # Unknown parameters of a known integration are kept secret: safe by default.
        return spec.secret if spec is not None else True

    def is_destination(self, name: str) -> bool:
        return name in self.destination_names

    def destination_values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The effective value of every destination field (catalogue defaults applied)."""
        out: dict[str, Any] = {}
        for name in self.destination_names:
            value = params.get(name)
            if value is None or value == "":
                spec = self.field(name)
                value = spec.default if spec is not None else None
            out[name] = value
        return out

    def missing_required(self, present: set[str]) -> list[str]:
        return [f.name for f in self.fields if f.required and f.name not in present]

    @property
    def injected_params(self) -> frozenset[str]:
        """Parameters rendered into the proxied request (so: no control characters in them)."""
        if self.auth == AuthKind.TEMPLATE:
            return self.template_params(
                *(
                    t
                    for pairs in (self.inject_headers, self.inject_query, self.inject_cookies)
                    for p in pairs
                    for t in p
                )
            )
        return _INJECTED_BY_KIND.get(self.auth, frozenset())

    def template_params(self, *templates: str) -> frozenset[str]:
        """The parameter names ``templates`` refer to."""
        names: set[str] = set()
        for template in templates:
            names |= _template_vars(template)
        return frozenset(names)

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Returns field -> problem for values of the wrong shape (names only, never values).

        Every connection write (admin API, connect pages) calls this, so the injection rules of
        ``proxy.pipeline.headers`` hold for what gets stored: injected parameters carry no control
        character, and the api_key kind's header, query and cookie names are allowed names.
        """
        problems: dict[str, str] = {}
        injected = self.injected_params if self.proxyable else frozenset()
        for name, value in params.items():
            spec = self.field(name)
            if value is None:
                continue
            problem = _check_type(spec, value) if spec is not None else None
            if problem is None and name in injected and isinstance(value, str):
                problem = value_problem(value)
                if problem is None and self.auth == AuthKind.API_KEY and name in API_KEY_NAME_PARAMS:
                    problem = API_KEY_NAME_PARAMS[name](value.strip())
                elif (
                    problem is None
                    and self.auth == AuthKind.API_KEY
                    and name == "api_key"
                    and params.get("location") == "cookie"
                ):
                    problem = cookie_value_problem(value)
            if problem:
                problems[f"parameters.{name}"] = problem
        return problems

    def render(self, template: str, params: Mapping[str, Any]) -> str:
        compiled = self._compiled.get(template)
        if compiled is None:
            compiled = self._compiled[template] = _ENV.from_string(template)
        try:
            return str(compiled.render(**params))
        except TemplateError as exc:
            # StrictUndefined names the missing variable; never the values.
            raise ValidationError(
                f"integration {self.id!r} cannot build its request: {exc.message}",
                fields={"parameters": "missing or invalid value for this integration"},
            ) from None

    def resolve_base_url(self, params: Mapping[str, Any]) -> str | None:
        if self.base_url is None:
            value = params.get("base_url")
            return str(value) if value else None
        if "{" not in self.base_url:
            return self.base_url
        return self.render(self.base_url, params)


def _check_type(spec: FieldSpec, value: Any) -> str | None:
    t = spec.type
    if t in ("string", "url") and not isinstance(value, str):
        return "must be a string"
    if t == "url" and not value.startswith(("http://", "https://")):
        return "must be an absolute http(s) URL"
    if t == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        return "must be an integer"
    if t == "boolean" and not isinstance(value, bool):
        return "must be true or false"
    if t == "object" and not isinstance(value, dict):
        return "must be an object"
    if spec.choices and value not in spec.choices:
        return f"must be one of {', '.join(spec.choices)}"
    return None


def opaque_integration(integration_id: str) -> Integration:
    """A custom integration id nobody described: Connection Service only, every parameter secret."""
    return Integration(
        id=integration_id, label=integration_id, auth=AuthKind.OPAQUE, fields=(), source=IMPLICIT_SOURCE
    )


# --- loading -----------------------------------------------------------------------------------


_NAME_RULES = {
    "headers": injected_header_problem,
    "query": query_name_problem,
    "cookies": cookie_name_problem,
}


def _pairs(where: str, raw: Any, kind: str | None = None) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ConfigError(where, 'must be a table of name = "template" strings')
    for name, tpl in raw.items():
        try:
            _ENV.from_string(tpl)
            _ENV.from_string(name)
        except TemplateError as exc:
            raise ConfigError(f"{where}.{name}", f"bad template: {exc}") from None
        # Static names and values are checked here, once; templated ones when injected.
        rule = _NAME_RULES.get(kind or "")
        problem = rule(name.strip()) if rule is not None and "{" not in name else None
        if problem is None and "{" not in tpl:
            problem = cookie_value_problem(tpl) if kind == "cookies" else value_problem(tpl)
        if problem is not None:
            raise ConfigError(f"{where}.{name}", problem)
    return tuple(raw.items())


def parse_integration(data: Mapping[str, Any], source: str) -> Integration:
    where = source
    iid = data.get("id")
    if not isinstance(iid, str) or not iid:
        raise ConfigError(f"{where}: id", "every integration needs a string id")
    where = f"{source}: {iid}"
    auth = AuthKind.parse(data.get("auth", AuthKind.TEMPLATE), f"{where}.auth")
    specs = []
    for i, raw in enumerate(data.get("fields", [])):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ConfigError(f"{where}.fields[{i}]", "each field needs a name")
        ftype = raw.get("type", "string")
        if ftype not in FIELD_TYPES:
            raise ConfigError(f"{where}.fields[{i}].type", f"must be one of {', '.join(FIELD_TYPES)}")
        unknown = set(raw) - set(FieldSpec.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{where}.fields[{i}]", f"unknown keys {sorted(unknown)}")
        choices = raw.get("choices")
        user_hosts = raw.get("user_hosts")
        if user_hosts is not None and not (
            isinstance(user_hosts, list) and user_hosts and all(isinstance(h, str) and h for h in user_hosts)
        ):
            raise ConfigError(f"{where}.fields[{i}].user_hosts", "must be a non-empty list of host patterns")
        specs.append(
            FieldSpec(
                **{
                    **raw,
                    "choices": tuple(choices) if choices else None,
                    "user_hosts": tuple(user_hosts) if user_hosts is not None else None,
                }
            )
        )
    inject = data.get("inject", {})
    oauth_raw = data.get("oauth2")
    oauth = None
    if oauth_raw is not None:
        token_auth = oauth_raw.get("token_auth", "basic")
        if token_auth not in ("basic", "post"):
            raise ConfigError(f"{where}.oauth2.token_auth", "must be basic or post")
        issuer = oauth_raw.get("issuer")
        if issuer is not None and not (
            isinstance(issuer, str) and issuer.startswith(("https://", "http://"))
        ):
            raise ConfigError(f"{where}.oauth2.issuer", "must be the server's issuer URL (RFC 8414 metadata)")
        oauth = OAuth2Spec(
            auth_url=oauth_raw.get("auth_url"),
            token_url=oauth_raw.get("token_url"),
            revocation_url=oauth_raw.get("revocation_url"),
            scopes=tuple(oauth_raw.get("scopes", ())),
            token_auth=token_auth,
            pkce=bool(oauth_raw.get("pkce", True)),
            extra_auth_params=dict(oauth_raw.get("extra_auth_params", {})),
            issuer=issuer,
            # Named as in the server's RFC 8414 metadata, so it can be copied from there.
            iss_parameter_supported=bool(
                oauth_raw.get("authorization_response_iss_parameter_supported", False)
            ),
        )
    base_url = data.get("base_url")
    if base_url is not None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.base_url", "must be an absolute http(s) URL or template")
        _pairs(f"{where}.base_url", {"base_url": base_url})
    styles = data.get("ratelimit_styles")
    hosts = data.get("allowed_hosts")
    integration = Integration(
        id=iid,
        label=str(data.get("label", iid)),
        auth=auth,
        fields=tuple(specs),
        base_url=base_url,
        allowed_hosts=tuple(hosts) if hosts is not None else None,
        ratelimit_styles=tuple(styles) if styles is not None else None,
        default_rate_limits=tuple(data.get("default_rate_limits", ())),
        inject_headers=_pairs(f"{where}.inject.headers", inject.get("headers"), "headers"),
        inject_query=_pairs(f"{where}.inject.query", inject.get("query"), "query"),
        inject_cookies=_pairs(f"{where}.inject.cookies", inject.get("cookies"), "cookies"),
        oauth2=oauth,
        test_request=data.get("test"),
        source=source,
    )
    integration = _with_destinations(integration, where)
    if auth.is_oauth2:
        # Tokens land in parameters at run time: they must be declared secret or they would be
        # stored in the clear.
        needed = {"access_token", "refresh_token"} if auth == AuthKind.OAUTH2_AUTHORIZATION_CODE else set()
        needed |= {"client_secret"}
        declared = {f.name for f in specs if f.secret}
        if not needed <= declared:
            missing = ", ".join(sorted(needed - declared))
            raise ConfigError(
                f"{where}.fields", f"an {auth} integration must declare {missing} as secret fields"
            )
    if auth == AuthKind.TEMPLATE and not (
        integration.inject_headers or integration.inject_query or integration.inject_cookies
    ):
        raise ConfigError(f"{where}.inject", "a template integration needs headers, query or cookies")
    return integration


def _template_vars(template: str) -> set[str]:
    if "{" not in template:
        return set()
    return set(meta.find_undeclared_variables(_ENV.parse(template)))


def _with_destinations(integration: Integration, where: str) -> Integration:
    """``integration`` with its destination fields derived, and user-settable ones checked."""
    names = {f.name for f in integration.fields if f.destination or f.name in DESTINATION_NAMES}
    if integration.base_url is not None:
        names |= _template_vars(integration.base_url)
    for name_tpl, _ in (*integration.inject_headers, *integration.inject_query, *integration.inject_cookies):
        names |= _template_vars(name_tpl)
    for i, spec in enumerate(integration.fields):
        if not spec.user_settable:
            if spec.user_hosts is not None:
                raise ConfigError(f"{where}.fields[{i}].user_hosts", "only applies with user_settable = true")
            continue
        if spec.name not in names:
            raise ConfigError(
                f"{where}.fields[{i}].user_settable", "only destination fields are declared user-settable"
            )
        if spec.secret:
            raise ConfigError(f"{where}.fields[{i}].user_settable", "a secret field cannot be a destination")
        # An end user may only ever pick a destination from a bounded set.
        if not spec.choices and not spec.user_hosts:
            raise ConfigError(
                f"{where}.fields[{i}].user_settable",
                "a user-settable destination needs choices or user_hosts patterns that bound it",
            )
    return replace(integration, destination_names=frozenset(names))


class Catalogue:
    """All known integrations by id; unknown ids resolve to an opaque, all-secret integration."""

    def __init__(self, integrations: Mapping[str, Integration]) -> None:
        self._by_id = dict(integrations)

    def get(self, integration_id: str) -> Integration:
        found = self._by_id.get(integration_id)
        return found if found is not None else opaque_integration(integration_id)

    def known(self, integration_id: str) -> bool:
        return integration_id in self._by_id

    def __iter__(self) -> Any:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    @classmethod
    def load(cls, extra_dirs: tuple[Path, ...] = ()) -> Catalogue:
        found: dict[str, Integration] = {}
        for directory in (BUILTIN_DIR, *extra_dirs):
            if not directory.is_dir():
                raise ConfigError("integrations_dirs", f"{directory} is not a directory")
            for path in sorted(directory.glob("*.toml")):
                try:
                    data = tomllib.loads(path.read_text())
                except tomllib.TOMLDecodeError as exc:
                    raise ConfigError("integrations_dirs", f"{path} is not valid TOML: {exc}") from None
                for item in data.get("integration", []):
                    integration = parse_integration(item, str(path))
                    # Operator files override built-ins of the same id, deliberately.
                    found[integration.id] = integration
        return cls(found)
