"""A real OAuth 2.0 authorization server, run as its own process, for the OAuth and connect tests.

Run it with ``python -m tests.support.authserver --port 0``; it prints ``LISTENING <url>`` once
it accepts connections. It implements just enough of RFC 6749 / 7636 / 7009 to be strict where
the proxy can get things wrong:

- ``GET /authorize``: auto-approves (302 back with ``code`` and ``state``) unless told to deny;
  requires an S256 PKCE challenge.
- ``POST /token``: ``authorization_code`` (PKCE verified, codes single use, redirect_uri must
  match), ``refresh_token`` (rotates by default: a used refresh token is dead), and
  ``client_credentials``; client auth by HTTP Basic (form-urlencoded parts, RFC 6749 §2.3.1) or
  in the body, never both.
- ``POST /revoke``: records what was revoked.
- ``GET /api/me``: a protected resource; 401 for unknown, revoked or expired tokens.
- ``GET /control`` (counters, revocations, last requests) and ``POST /control`` (settings:
  ``deny``, ``expires_in``, ``iss`` (RFC 9207: ``"self"`` sends this server's URL, any other
  string is sent as is), ``rotate``, ``delay_s``, ``fail_next`` (a queue of ``invalid_grant``,
  ``invalid_client``, ``500``...), ``fail_always``, ``clients``, ``expire_access_tokens``,
  ``reset``).

``AuthServer`` starts/stops the process and talks to ``/control``; ``authserver`` is a pytest
fixture (one process per test session, reset before each test).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlencode, urlsplit, urlunsplit

from aiohttp import web

DEFAULT_CLIENT_ID = "test-client"
# Every character RFC 6749 §2.3.1 says must be form-encoded before base64 in Basic auth.
DEFAULT_CLIENT_SECRET = "s3cr:et/+&=% é"
PUBLIC_CLIENT_ID = "public-client"

STATE = web.AppKey("state", dict)


def _fresh_state() -> dict[str, Any]:
    return {
        "clients": {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET, PUBLIC_CLIENT_ID: None},
        "config": {
            "deny": False,
            "expires_in": 3600,
            "rotate": True,
            "delay_s": 0.0,
            "fail_next": [],
            "fail_always": None,
            "issue_refresh": True,
            "token_content_type": "json",
            "iss": None,
        },
        "codes": {},
        "access": {},
        "refresh": {},
        "counts": {
            "authorize": 0,
            "token_requests": 0,
            "code_exchanges": 0,
            "refreshes": 0,
            "client_credentials": 0,
            "revocations": 0,
            "api_calls": 0,
        },
        "revoked": [],
        "last_authorize": None,
        "last_token": None,
    }


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def _redirect(uri: str, **params: str) -> web.HTTPFound:
    parts = urlsplit(uri)
    query = (parts.query + "&" if parts.query else "") + urlencode(params)
    return web.HTTPFound(urlunsplit((parts.scheme, parts.netloc, parts.path, query, "")))


def _oauth_error(error: str, status: int = 400) -> web.Response:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="test"'
    return web.json_response(
        {"error": error, "error_description": f"test server says {error}"}, status=status, headers=headers
    )


async def authorize(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    st["counts"]["authorize"] += 1
    iss = st["config"]["iss"]
    # RFC 9207: "self" is this server's own issuer identifier (its base URL); else sent as given.
    ident = {"iss": f"{request.scheme}://{request.host}" if iss == "self" else str(iss)} if iss else {}
    q = dict(request.query)
    st["last_authorize"] = q
    client_id, redirect_uri = q.get("client_id"), q.get("redirect_uri")
    if client_id not in st["clients"] or not redirect_uri:
        return web.Response(status=400, text="unknown client_id or missing redirect_uri")
    state = q.get("state", "")
    if st["config"]["deny"]:
        raise _redirect(redirect_uri, error="access_denied", state=state, **ident)
    if q.get("response_type") != "code":
        raise _redirect(redirect_uri, error="unsupported_response_type", state=state, **ident)
    if not q.get("code_challenge") or q.get("code_challenge_method") != "S256":
        raise _redirect(redirect_uri, error="invalid_request", state=state, **ident)
    code = "code_" + secrets.token_urlsafe(16)
    st["codes"][code] = {
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "challenge": q["code_challenge"],
        "scope": q.get("scope"),
        "exp": time.time() + 60,
    }
    raise _redirect(redirect_uri, code=code, state=state, **ident)


def _client_auth(request: web.Request, form: dict[str, str], st: dict[str, Any]) -> tuple[str | None, str]:
    """(authenticated client id or None, method used)."""
    header = request.headers.get("Authorization", "")
    in_body = "client_secret" in form
    if header.startswith("Basic "):
        if in_body:
            return None, "both"  # RFC 6749 §2.3: one method only
        try:
            raw = base64.b64decode(header[6:], validate=True).decode("ascii")
        except (ValueError, UnicodeDecodeError):
            return None, "basic"
        cid, _, secret = raw.partition(":")
        cid, secret = unquote_plus(cid), unquote_plus(secret)
        ok = cid in st["clients"] and st["clients"][cid] is not None and st["clients"][cid] == secret
        return (cid if ok else None), "basic"
    cid = form.get("client_id")
    if cid is None or cid not in st["clients"]:
        return None, "post" if in_body else "none"
    expected = st["clients"][cid]
    if expected is None:
        return (cid if not in_body else None), "public"
    return (cid if form.get("client_secret") == expected else None), "post"


def _issue(st: dict[str, Any], client_id: str, scope: str | None, with_refresh: bool) -> dict[str, Any]:
    cfg = st["config"]
    access = "at_" + secrets.token_urlsafe(16)
    expires_in = cfg["expires_in"]
    st["access"][access] = {
        "client_id": client_id,
        "scope": scope,
        "exp": time.time() + expires_in,
        "active": True,
    }
    body: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": expires_in}
    if scope:
        body["scope"] = scope
    if with_refresh and cfg["issue_refresh"]:
        refresh = "rt_" + secrets.token_urlsafe(16)
        st["refresh"][refresh] = {"client_id": client_id, "scope": scope, "active": True}
        body["refresh_token"] = refresh
    return body


def _answer(st: dict[str, Any], body: dict[str, Any]) -> web.Response:
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if st["config"]["token_content_type"] == "form":
        return web.Response(
            text=urlencode(body), content_type="application/x-www-form-urlencoded", headers=headers
        )
    return web.json_response(body, headers=headers)


async def token(request: web.Request) -> web.Response:
    st = request.app[STATE]
    cfg = st["config"]
    st["counts"]["token_requests"] += 1
    if cfg["delay_s"]:
        await asyncio.sleep(cfg["delay_s"])
    form = {k: str(v) for k, v in (await request.post()).items()}
    grant = form.get("grant_type")
    client_id, method = _client_auth(request, form, st)
    st["last_token"] = {"grant_type": grant, "client_auth": method, "fields": sorted(form)}
    failure = cfg["fail_next"].pop(0) if cfg["fail_next"] else cfg["fail_always"]
    if failure == "500":
        return web.Response(status=500, text="<html>upstream exploded</html>", content_type="text/html")
    if failure == "503":
        return web.Response(status=503, text="busy")
    if failure:
        return _oauth_error(failure, 401 if failure == "invalid_client" else 400)
    if client_id is None:
        return _oauth_error("invalid_client", 401)
    if grant == "authorization_code":
        code = st["codes"].pop(form.get("code", ""), None)
        if code is None or code["exp"] < time.time() or code["client_id"] != client_id:
            return _oauth_error("invalid_grant")
        if form.get("redirect_uri") != code["redirect_uri"]:
            return _oauth_error("invalid_grant")
        verifier = form.get("code_verifier")
        if verifier is None or _s256(verifier) != code["challenge"]:
            return _oauth_error("invalid_grant")
        st["counts"]["code_exchanges"] += 1
        return _answer(st, _issue(st, client_id, code["scope"], with_refresh=True))
    if grant == "refresh_token":
        rt = st["refresh"].get(form.get("refresh_token", ""))
        if rt is None or not rt["active"] or rt["client_id"] != client_id:
            return _oauth_error("invalid_grant")
        st["counts"]["refreshes"] += 1
        rotate = cfg["rotate"]
        if rotate:
            rt["active"] = False
        body = _issue(st, client_id, rt["scope"], with_refresh=rotate)
        return _answer(st, body)
    if grant == "client_credentials":
        if st["clients"].get(client_id) is None:
            return _oauth_error("unauthorized_client")
        st["counts"]["client_credentials"] += 1
        return _answer(st, _issue(st, client_id, form.get("scope"), with_refresh=False))
    return _oauth_error("unsupported_grant_type")


async def revoke(request: web.Request) -> web.Response:
    st = request.app[STATE]
    form = {k: str(v) for k, v in (await request.post()).items()}
    client_id, _ = _client_auth(request, form, st)
    if client_id is None:
        return _oauth_error("invalid_client", 401)
    st["counts"]["revocations"] += 1
    value = form.get("token", "")
    kind = "unknown"
    for name in ("access", "refresh"):
        if value in st[name]:
            st[name][value]["active"] = False
            kind = name
    st["revoked"].append({"token": value, "kind": kind, "hint": form.get("token_type_hint")})
    return web.Response(status=200)


async def api_me(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st["counts"]["api_calls"] += 1
    header = request.headers.get("Authorization", "")
    info = st["access"].get(header[7:]) if header.startswith("Bearer ") else None
    if info is None or not info["active"] or info["exp"] < time.time():
        return web.json_response(
            {"error": "invalid_token"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return web.json_response({"sub": "user-1", "client_id": info["client_id"], "scope": info["scope"]})


async def control_get(request: web.Request) -> web.Response:
    st = request.app[STATE]
    keys = ("config", "counts", "revoked", "last_authorize", "last_token")
    return web.json_response({k: st[k] for k in keys})


async def control_post(request: web.Request) -> web.Response:
    body = await request.json()
    if body.pop("reset", False):
        request.app[STATE] = _fresh_state()
    st = request.app[STATE]
    if body.pop("expire_access_tokens", False):
        for info in st["access"].values():
            info["exp"] = 0
    if "clients" in body:
        st["clients"].update(body.pop("clients"))
    st["config"].update(body)
    return await control_get(request)


def make_app() -> web.Application:
    app = web.Application()
    app[STATE] = _fresh_state()
    app.router.add_get("/authorize", authorize)
    app.router.add_post("/token", token)
    app.router.add_post("/revoke", revoke)
    app.router.add_get("/api/me", api_me)
    app.router.add_get("/control", control_get)
    app.router.add_post("/control", control_post)
    return app


async def _serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"LISTENING http://{host}:{bound}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port))


# --- test-side handle ----------------------------------------------------------------------------


class AuthServer:
    """The authorization server process, and a synchronous client of its control endpoint."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout_s: float = 15.0) -> None:
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.authserver", "--port", "0"],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("LISTENING "):
                self.url = line.split()[1]
                return
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError("the test authorization server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def control(self, **settings: Any) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url + "/control",
            data=json.dumps(settings).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            return dict(json.load(resp))

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/control", timeout=5) as resp:
            return dict(json.load(resp))

    def count(self, name: str) -> int:
        return int(self.state()["counts"][name])

    def endpoints(self) -> dict[str, str]:
        """Connection parameters pointing at this server."""
        return {
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
            "auth_url": self.url + "/authorize",
            "token_url": self.url + "/token",
            "revocation_url": self.url + "/revoke",
            "base_url": self.url,
        }


def _fixtures() -> tuple[Any, Any]:
    import pytest

    @pytest.fixture(scope="session", name="authserver_process")
    def authserver_process() -> Iterator[AuthServer]:
        server = AuthServer()
        server.start()
        yield server
        server.stop()

    @pytest.fixture(name="authserver")
    def authserver(authserver_process: AuthServer) -> AuthServer:
        if authserver_process.proc is None or authserver_process.proc.poll() is not None:
            authserver_process.start()
        authserver_process.control(reset=True)
        return authserver_process

    return authserver_process, authserver


if __name__ == "__main__":
    main()
else:
    # Test modules get the fixtures ``authserver`` (reset per test) and ``authserver_process`` with
    # `from tests.support.authserver import authserver_fixture, authserver_process_fixture` (noqa F401)
    authserver_process_fixture, authserver_fixture = _fixtures()
