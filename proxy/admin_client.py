"""``connection-proxy admin ...``: a command-line client of the admin API.

Operators managed connections and keys with hand-written curl. This client makes the same calls
(``connections put|get|list|delete``, ``api-keys mint|list|revoke``, ``connect-sessions
create``, ``tenants list``), prints readable tables (or the service's JSON with ``--json``) and
turns the service's error answer into one line and an exit status:

- 0: done; 1: the service refused (its ``error`` code and ``message`` are printed);
- 2: bad usage or no admin token; 3: the service could not be reached.

Where it talks to: ``--url``, else ``PROXY_URL``, else ``PROXY_PUBLIC_URL``, else ``http://`` +
``PROXY_LISTEN`` (a wildcard host becoming loopback), else ``http://127.0.0.1:8080``. The token:
``PROXY_ADMIN_TOKEN``, else the dev-mode token file ``$PROXY_DATA_DIR/admin.token`` (default
``./var``). A token is never taken from the command line (process lists show arguments), and
secret parameters are best given with ``--body -`` on stdin for the same reason.

Standard library only (``urllib``): no dependency beyond the service's own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from proxy.security.bootstrap import DEV_TOKEN_FILE
from proxy.settings import check_environment
from proxy.settings_values import default_public_url

__all__ = ["EXIT_REFUSED", "EXIT_UNREACHABLE", "EXIT_USAGE", "add_parser", "run"]

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
TIMEOUT_S = 30.0


class ClientError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def service_url(env: Mapping[str, str], given: str | None = None) -> str:
    for value in (given, env.get("PROXY_URL"), env.get("PROXY_PUBLIC_URL")):
        if value:
            return value.rstrip("/")
    listen = env.get("PROXY_LISTEN")
    if listen and ":" in listen:
        host, _, port = listen.rpartition(":")
        if port.isdigit():
            return default_public_url(host.strip("[]"), int(port))
    return "http://127.0.0.1:8080"


def admin_token(env: Mapping[str, str]) -> str:
    token = env.get("PROXY_ADMIN_TOKEN")
    if token:
        return token
    path = Path(env.get("PROXY_DATA_DIR") or "./var") / DEV_TOKEN_FILE
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if not token:
        raise ClientError(
            f"no admin token: set PROXY_ADMIN_TOKEN, or run where the dev-mode token file {path} is "
            "(PROXY_DATA_DIR names its folder)",
            EXIT_USAGE,
        )
    return token


class Client:
    def __init__(self, url: str, token: str) -> None:
        if not url.startswith(("http://", "https://")):
            raise ClientError(f"the service URL must start with http:// or https://, got {url!r}", EXIT_USAGE)
        self.url = url
        self._token = token

    def call(self, method: str, path: str, body: Any = None, query: Mapping[str, Any] | None = None) -> Any:
        """One admin call; the parsed JSON answer (None for an empty one). Raises ClientError."""
        q = {k: v for k, v in (query or {}).items() if v is not None}
        target = self.url + path + (("?" + urllib.parse.urlencode(q)) if q else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        # The scheme is http(s), checked in __init__.
        req = urllib.request.Request(target, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ClientError(_refusal(exc.code, exc.read()), EXIT_REFUSED) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(
                f"cannot reach the service at {self.url} ({reason}); set PROXY_URL to where it listens",
                EXIT_UNREACHABLE,
            ) from None
        return json.loads(raw) if raw.strip() else None

    def pages(self, path: str, query: Mapping[str, Any], limit: int | None) -> list[Any]:
        """Every item of a paged list (``items`` and ``next_cursor``), or the first ``limit``."""
        items: list[Any] = []
        cursor = None
        while True:
            page = self.call(
                "GET", path, query={**query, "cursor": cursor, "limit": 1000 if limit is None else limit}
            )
            items.extend(page.get("items", []))
            cursor = page.get("next_cursor")
            if not cursor or (limit is not None and len(items) >= limit):
                return items if limit is None else items[:limit]


def _refusal(status: int, raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        text = f"{body['error']} (HTTP {status}): {body.get('message', '')}"
        fields = body.get("fields")
        if isinstance(fields, dict) and fields:
            text += "; " + ", ".join(f"{k}: {v}" for k, v in fields.items())
        return text
    return f"HTTP {status} from the service"


# --- output ------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":")) if value else "-"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain text table: a header line and one line per row, columns padded."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def record(obj: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """One object as ``key: value`` lines."""
    keys = list(keys or obj.keys())
    width = max((len(k) for k in keys), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(obj.get(k))}" for k in keys)


CONNECTION_COLUMNS = ("connection_id", "integration_id", "status", "runtime_user_id", "default_connection_id")
KEY_COLUMNS = ("key_id", "name", "created_at", "revoked_at", "last_used_at")
TENANT_COLUMNS = ("tenant_id", "proxy_only", "proxy_only_effective", "data_key_version", "created_at")


# --- commands ----------------------------------------------------------------------------------


def _params(pairs: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClientError(f"--param takes KEY=VALUE, got {pair!r}", EXIT_USAGE)
        out[key] = value
    return out


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.body:
        try:
            text = sys.stdin.read() if args.body == "-" else Path(args.body).read_text()
            loaded = json.loads(text)
        except OSError as exc:
            raise ClientError(f"cannot read --body {args.body}: {exc.strerror}", EXIT_USAGE) from None
        except ValueError as exc:
            raise ClientError(f"--body {args.body} is not JSON: {exc}", EXIT_USAGE) from None
        if not isinstance(loaded, dict):
            raise ClientError("--body must hold a JSON object", EXIT_USAGE)
        body.update(loaded)
    if args.integration:
        body["integration_id"] = args.integration
    params = _params(args.param)
    if params:
        body["parameters"] = {**(body.get("parameters") or {}), **params}
    if "integration_id" not in body:
        raise ClientError("name the integration: --integration ID, or integration_id in --body", EXIT_USAGE)
    return body


def _conn_path(args: argparse.Namespace) -> str:
    q = urllib.parse.quote
    return f"/admin/tenants/{q(args.tenant, safe='')}/connections/{q(args.connection, safe='')}"


def _tenant_path(args: argparse.Namespace, tail: str) -> str:
    return f"/admin/tenants/{urllib.parse.quote(args.tenant, safe='')}/{tail}"


def _show(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _dispatch(args: argparse.Namespace, client: Client) -> int:
    group, action = args.admin_group, args.admin_cmd
    if group == "connections":
        if action == "put":
            view = client.call("PUT", _conn_path(args), _body(args))
            _show(
                args,
                view,
                record(
                    view,
                    (
                        "tenant_id",
                        "connection_id",
                        "integration_id",
                        "status",
                        "parameters",
                        "missing_fields",
                        "notice",
                    ),
                ),
            )
        elif action == "get":
            view = client.call("GET", _conn_path(args))
            _show(args, view, record(view))
        elif action == "list":
            query = {"integration_id": args.integration_id, "runtime_user_id": args.runtime_user_id}
            items = client.pages(_tenant_path(args, "connections"), query, args.limit)
            _show(args, items, table(items, CONNECTION_COLUMNS))
        elif action == "delete":
            client.call("DELETE", _conn_path(args), query={"cascade": "true" if args.cascade else None})
            _show(args, {"deleted": True}, f"deleted connection {args.tenant}/{args.connection}")
    elif group == "api-keys":
        if action == "mint":
            minted = client.call(
                "POST", _tenant_path(args, "api-keys"), {"name": args.name} if args.name else {}
            )
            _show(
                args,
                minted,
                record(minted, ("key_id", "tenant_id", "name", "api_key"))
                + "\n(the key is shown once; the service keeps only its hash)",
            )
        elif action == "list":
            items = client.call("GET", _tenant_path(args, "api-keys"))["items"]
            _show(args, items, table(items, KEY_COLUMNS))
        elif action == "revoke":
            q = urllib.parse.quote(args.key_id, safe="")
            client.call("DELETE", _tenant_path(args, f"api-keys/{q}"))
            _show(args, {"revoked": args.key_id}, f"revoked API key {args.key_id}")
    elif group == "connect-sessions":
        body: dict[str, Any] = {"integration_id": args.integration}
        for key in ("connection_id", "runtime_user_id", "default_connection_id", "return_url"):
            if getattr(args, key):
                body[key] = getattr(args, key)
        if args.allowed_origin:
            body["allowed_origins"] = args.allowed_origin
        params = _params(args.param)
        if params:
            body["parameters"] = params
        made = client.call("POST", _tenant_path(args, "connect-sessions"), body)
        _show(args, made, record(made, ("url", "expires_at")))
    elif group == "tenants":
        items = client.pages("/admin/tenants", {}, args.limit)
        _show(args, items, table(items, TENANT_COLUMNS))
    return 0


def run(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    check_environment(env)  # a typo such as PROXY_ULR must not silently fall back to a default
    try:
        client = Client(service_url(env, args.url), admin_token(env))
        return _dispatch(args, client)
    except ClientError as exc:
        print(f"connection-proxy admin: {exc.message}", file=sys.stderr)
        return exc.exit_code


def add_parser(sub: Any) -> None:
    """The ``admin`` command and its sub-commands, on the main parser's sub-parsers."""
    admin = sub.add_parser(
        "admin",
        help="manage connections, API keys, connect sessions and tenants through the admin API",
        description=(
            "Calls the admin API: the URL from --url, PROXY_URL, PROXY_PUBLIC_URL or PROXY_LISTEN; "
            "the token from PROXY_ADMIN_TOKEN, else dev mode's $PROXY_DATA_DIR/admin.token. Prints "
            "tables, or the service's JSON with --json. Exit status: 0 done, 1 the service refused "
            "(its error code and message are printed), 2 bad usage or no token, 3 unreachable."
        ),
    )
    groups = admin.add_subparsers(dest="admin_group", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--url", help="the service's base URL (default: PROXY_URL, PROXY_PUBLIC_URL, PROXY_LISTEN)"
        )
        p.add_argument("--json", action="store_true", help="print the service's JSON instead of a table")
        return p

    conns = groups.add_parser("connections", help="connections of a tenant").add_subparsers(
        dest="admin_cmd", required=True
    )
    put = common(conns.add_parser("put", help="create or replace a connection"))
    put.add_argument("tenant")
    put.add_argument("connection")
    put.add_argument("--body", metavar="FILE", help="the connection as JSON (a file, or - for stdin)")
    put.add_argument("--integration", metavar="ID", help="integration_id (overrides the body's)")
    put.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="a parameter (repeatable); process lists show arguments, so pass secrets in --body -",
    )
    for name, text in (("get", "a connection's redacted view"), ("delete", "revoke and remove a connection")):
        p = common(conns.add_parser(name, help=text))
        p.add_argument("tenant")
        p.add_argument("connection")
        if name == "delete":
            p.add_argument(
                "--cascade", action="store_true", help="also delete runtime user connections of it"
            )
    lst = common(conns.add_parser("list", help="a tenant's connections"))
    lst.add_argument("tenant")
    lst.add_argument("--integration-id")
    lst.add_argument("--runtime-user-id")
    lst.add_argument("--limit", type=int, help="at most this many (default: all)")

    keys = groups.add_parser("api-keys", help="caller API keys of a tenant").add_subparsers(
        dest="admin_cmd", required=True
    )
    mint = common(keys.add_parser("mint", help="mint a key (shown once)"))
    mint.add_argument("tenant")
    mint.add_argument("--name")
    klist = common(keys.add_parser("list", help="a tenant's keys (never the keys themselves)"))
    klist.add_argument("tenant")
    revoke = common(keys.add_parser("revoke", help="revoke a key"))
    revoke.add_argument("tenant")
    revoke.add_argument("key_id")

    sessions = groups.add_parser("connect-sessions", help="hosted connect pages").add_subparsers(
        dest="admin_cmd", required=True
    )
    create = common(sessions.add_parser("create", help="a connect page URL for an end user"))
    create.add_argument("tenant")
    create.add_argument("--integration", required=True, metavar="ID")
    create.add_argument("--connection-id")
    create.add_argument("--runtime-user-id")
    create.add_argument("--default-connection-id")
    create.add_argument("--return-url")
    create.add_argument(
        "--allowed-origin", action="append", help="an origin that may frame the page (repeatable)"
    )
    create.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="a preset, locked parameter (repeatable)"
    )

    tenants = groups.add_parser("tenants", help="tenants").add_subparsers(dest="admin_cmd", required=True)
    tlist = common(tenants.add_parser("list", help="every tenant the store knows"))
    tlist.add_argument("--limit", type=int, help="at most this many (default: all)")
