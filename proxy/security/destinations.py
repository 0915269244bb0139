"""Who may decide where a stored secret goes: the rules, written once.

A vault's first promise is that a secret reaches only the destination someone with authority over
it chose. The destination of a connection is its *destination fields* (the catalogue derives them:
base URL, OAuth endpoints, header/query/cookie names, shop domain, region, ...), its
``allowed_hosts`` and, for a runtime user connection, the default connection it inherits from.
Three rules follow, and every write path and read path goes through them here:

- **A destination never changes under a kept secret** (``check_write``). A write that changes a
  destination of a connection holding secrets must carry every secret again; "blank means keep"
  holds only while the destination stays. Kept secrets are recognised by their ciphertext: a
  secret written anew is sealed with a fresh nonce, so an unchanged ciphertext is a kept secret,
  whichever handler (admin PUT/PATCH, connect form, OAuth callback, token refresh) made the write.
- **Runtime user connections inherit their default's destination** (``inherit``): an end user's
  connection is sent where the operator's default connection goes, and is bound to the default's
  hosts, unless the operator opted the default into ``options.users_choose_destination``; even
  then the default's host binding applies.
- **An end user sets a destination only within bounds** (``check_user_destination``): a field the
  integration declares user-settable (a fixed list, or host patterns) or one the operator's
  connect session allows with host patterns; the chosen host then becomes the connection's binding.

Pure module: no aiohttp, no redis. Messages name fields, never values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from proxy.catalogue import Integration
from proxy.errors import ValidationError
from proxy.model import ConnectionRecord
from proxy.security.egress import host_matches

__all__ = [
    "USERS_CHOOSE_OPTION",
    "changed_destinations",
    "check_user_destination",
    "check_write",
    "destination_host",
    "inherit",
    "inherited_binding",
    "user_settable_fields",
    "users_choose",
]

# The default connection's opt-in that lets its runtime users pick their own destination.
USERS_CHOOSE_OPTION = "users_choose_destination"


def users_choose(default: ConnectionRecord) -> bool:
    """Whether a default connection lets its runtime users pick their own destination."""
    return default.options.get(USERS_CHOOSE_OPTION) is True


def _norm(value: Any) -> Any:
    return value.rstrip("/") if isinstance(value, str) else value


def changed_destinations(integration: Integration, old: ConnectionRecord, new: ConnectionRecord) -> list[str]:
    """The destination fields (as ``parameters.X`` or record keys) whose effective value differs."""
    if old.integration_id != new.integration_id:
        return ["integration_id"]
    before = integration.destination_values({**old.public_params})
    after = integration.destination_values({**new.public_params})
    out = [f"parameters.{n}" for n in sorted(before) if _norm(before[n]) != _norm(after[n])]
    # A secret-typed destination field compares by ciphertext below; its change is a re-send.
    if old.allowed_hosts != new.allowed_hosts:
        out.append("allowed_hosts")
    if old.default_connection_id != new.default_connection_id:
        out.append("default_connection_id")
    return out


def check_write(integration: Integration, old: ConnectionRecord | None, new: ConnectionRecord) -> None:
    """Refuses a write that would send a kept secret to a destination nobody re-authorised.

    A secret is *kept* when its ciphertext is the stored one; any secret that moves to a new
    destination must be sent again in the same write (or removed).
    """
    if old is None or not old.secret_params:
        return
    kept = sorted(n for n, token in new.secret_params.items() if old.secret_params.get(n) == token)
    if not kept:
        return
    changed = changed_destinations(integration, old, new)
    if not changed:
        return
    fields = {name: "changes where the stored secrets go" for name in changed}
    fields.update({f"parameters.{n}": "must be sent again with the new destination" for n in kept})
    raise ValidationError(
        f"changing {', '.join(changed)} of connection {new.connection_id!r} would send its stored "
        f"secrets ({', '.join(kept)}) somewhere new; send every secret again in the same write, "
        "or leave the destination as it is",
        fields=fields,
    )


def inherit(integration: Integration, params: Mapping[str, Any], default: ConnectionRecord) -> dict[str, Any]:
    """A runtime user connection's parameters with its default connection's destination.

    With the default's ``users_choose_destination`` option the user's own destination stays
    (``inherited_binding`` still bounds it).
    """
    out = dict(params)
    if users_choose(default):
        return out
    for name in integration.destination_names:
        if name in default.public_params:
            out[name] = default.public_params[name]
        else:
            spec = integration.field(name)
            if spec is not None and spec.default is not None:
                out[name] = spec.default
            else:
                out.pop(name, None)
    return out


def destination_host(integration: Integration, params: Mapping[str, Any]) -> str | None:
    """The host a connection's credentials go to, if its base URL can be built (shown on pages)."""
    try:
        base = integration.resolve_base_url(params)
    except ValidationError:
        return None
    if not base:
        return None
    try:
        return (urlsplit(base).hostname or "").lower() or None
    except ValueError:
        return None


def inherited_binding(integration: Integration, default: ConnectionRecord) -> tuple[str, ...]:
    """The hosts a default connection binds its runtime users' calls to: its allowed hosts, else
    the integration's, else its own base URL's host. Empty when nothing can be derived, which
    refuses every call rather than trusting the user's own destination."""
    if default.allowed_hosts is not None:
        return default.allowed_hosts
    if integration.allowed_hosts is not None:
        return integration.allowed_hosts
    defaults = {f.name: f.default for f in integration.fields if f.default is not None}
    host = destination_host(integration, {**defaults, **default.public_params})
    return (host,) if host else ()


def check_user_destination(
    integration: Integration, name: str, value: Any, session_hosts: tuple[str, ...] | None
) -> str | None:
    """Why an end user may not set destination ``name`` to ``value`` (None when allowed).

    ``session_hosts`` are the host patterns the operator's connect session allows for it.
    """
    spec = integration.field(name)
    patterns: tuple[str, ...] | None = session_hosts
    if patterns is None and spec is not None and spec.user_settable:
        if spec.choices:
            return None if value in spec.choices else f"must be one of {', '.join(spec.choices)}"
        patterns = spec.user_hosts
    if not patterns:
        return "is set by the administrator, not on this page"
    host = _host_of(value)
    if host is None or not host_matches(host, patterns):
        return f"must be a host under {', '.join(patterns)}"
    return None


def _host_of(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    text = value if "://" in value else f"https://{value}"
    try:
        parts = urlsplit(text)
        host = parts.hostname
        _ = parts.port
    except ValueError:
        return None
    if not host or parts.username is not None or parts.password is not None:
        return None
    if "://" not in value and (parts.path or parts.query or parts.fragment):
        return None  # a bare host field such as shop_domain holds a host and nothing else
    return host.lower()


def user_settable_fields(
    integration: Integration,
    session_allows: Mapping[str, tuple[str, ...]],
    default: ConnectionRecord | None,
    runtime_user: bool,
) -> dict[str, tuple[str, ...] | None]:
    """Destination fields an end user may enter on a connect page, each with the host patterns
    that bound it (None: the field's own ``choices`` / ``user_hosts`` do).

    A runtime user takes every destination from the default connection, unless the default opted
    into ``users_choose_destination``; then URL fields are bounded by the default's binding.
    """
    fields = [f for f in integration.fields if f.name in integration.destination_names]
    out: dict[str, tuple[str, ...] | None] = {}
    if runtime_user:
        if default is None or not users_choose(default):
            return {}
        binding = inherited_binding(integration, default)
        out.update({f.name: binding for f in fields if f.type == "url" and binding})
    out.update({f.name: None for f in fields if f.user_settable})
    out.update({n: p for n, p in session_allows.items() if integration.is_destination(n)})
    return out
