"""The one pipeline every proxy front end runs: resolve, bind, limit, inject, forward, record.

Path mode, the Runtara envelope, forward-proxy mode and the admin connection test all call
``Pipeline.prepare`` (which connection, where the call may go, may it go now, with which
credential) and ``Pipeline.open`` (send it, with opt-in retries, per-host cap and timeouts), and
``Pipeline.finish`` (audit, metrics). Only how the request arrives and how the answer is written
back differs, and that lives in ``proxy.web.proxy_routes``.

Security invariants kept here:
- the upstream host is checked against the connection's allowed hosts (default: the base URL's
  host) and the egress guard *before* anything is sent; a refused call never reaches the network;
- credentials travel over https only, except to hosts the operator allowed with egress_allow;
- redirects are passed back to the caller, never followed, and only safe calls are retried
  (``proxy.pipeline.send``);
- ``TRACE`` is refused on every front end: an upstream answers it by echoing the request, and
  with it the injected credential;
- an absolute target (forward-proxy mode, an absolute envelope URL) stays under the base URL's
  path exactly as a path-mode call does: a credential scoped to ``https://h/api`` never reaches
  ``https://h/other``;
- for proxy-only connections (the connection's option, its tenant's flag) the injected secret is
  redacted from the response headers (``Exchange.scrub``): an upstream that echoes it in a
  ``Location`` or a header must not hand it to the caller. Bodies are relayed as they are.

Hot path: everything derived from a connection's decrypted ``Credentials`` (base URL, host
binding, limit target, timeouts, injection) is computed once per ``Credentials`` object and
cached by identity; the vault replaces that object whenever the connection changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import ClientResponse, ClientTimeout
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.cache import BoundedCache, IdentityCache
from proxy.errors import (
    HostNotAllowed,
    RateLimited,
)
from proxy.model import Caller, not_authorized
from proxy.observe import trace
from proxy.observe.metrics import (
    RATELIMIT_DECISIONS_TALLY,
    REQUESTS_TALLY,
    UPSTREAM_INFLIGHT,
    UPSTREAM_RESPONSES_TALLY,
    gauge_from,
)
from proxy.pipeline.exchange import Admit, Body, Exchange, Pair, refuse_trace
from proxy.pipeline.headers import clean_request_headers
from proxy.pipeline.inject import Injection, apply, build_injection, not_proxyable
from proxy.pipeline.plan import Plan, check_destination
from proxy.pipeline.send import limit_kind, send
from proxy.pipeline.urls import escape_error, join_upstream, split_absolute
from proxy.ratelimit.limiter import Decision
from proxy.ratelimit.signals.core import parse_response
from proxy.security import egress as egress_mod
from proxy.vault.records import Credentials

if TYPE_CHECKING:
    from proxy.oauth.tokens import TokenManager
    from proxy.observe.audit import AuditLog
    from proxy.ratelimit.limiter import Limiter
    from proxy.settings import Settings
    from proxy.vault.tenants import TenantFlags
    from proxy.vault.vault import Vault

log = logging.getLogger("proxy.pipeline")

__all__ = ["Admit", "Body", "Exchange", "Pipeline"]

MAX_REPLAY_BODY = 1 << 20
URL_CACHE_SIZE = 4096
_STATUS_CLASS = {n: f"{n}xx" for n in range(1, 6)}


# --- one call ---------------------------------------------------------------------------------


class Pipeline:
    """The stages, wired to exactly the services they use (built by ``proxy.services``)."""

    def __init__(
        self,
        *,
        vault: Vault,
        limiter: Limiter,
        tokens: TokenManager,
        tenant_flags: TenantFlags,
        egress: egress_mod.EgressPolicy,
        settings: Settings,
        audit: AuditLog,
        client: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self.vault = vault
        self.limiter = limiter
        self.tokens = tokens
        self.tenant_flags = tenant_flags
        self.egress = egress
        self.settings = settings
        self.audit = audit
        # The upstream client exists only once the services started; looked up per call.
        self.client = client
        self._plans: IdentityCache[Credentials, Plan] = IdentityCache()
        # Tagged with the access token: a refreshed token is a new injection.
        self._oauth_injections: IdentityCache[Credentials, Injection] = IdentityCache()
        self._inflight: dict[str, int] = {}
        # Read from state, not updated on every call (see metrics.gauge_from).
        gauge_from(UPSTREAM_INFLIGHT, lambda: sum(self._inflight.values()))
        self._tasks: set[asyncio.Task[Any]] = set()
        # Joined and checked upstream URLs: APIs see the same paths again and again.
        self._urls: BoundedCache[tuple[str, str, str], URL] = BoundedCache(URL_CACHE_SIZE)

    # --- resolving ----------------------------------------------------------------------------

    def plan_for(self, creds: Credentials) -> Plan:
        plan = self._plans.get(creds)
        if plan is None:
            plan = self._plans.put(creds, Plan(creds, self.egress, self.settings))
        return plan

    async def credentials(
        self, tenant_id: str, connection_id: str, runtime_user_id: str | None
    ) -> Credentials:
        vault = self.vault
        if runtime_user_id:
            connection_id = await vault.resolve(tenant_id, connection_id, runtime_user_id)
        creds = await vault.credentials(tenant_id, connection_id)
        if creds.record.needs_connecting:
            raise not_authorized(creds.record)
        if not creds.integration.proxyable:
            raise not_proxyable(creds.integration)
        return creds

    async def prepare(
        self,
        *,
        caller: Caller,
        tenant_id: str,
        connection_id: str,
        runtime_user_id: str | None,
        method: str,
        caller_headers: Iterable[Pair],
        path: str = "",
        query: str = "",
        absolute_url: str | None = None,
        upgrade_scheme: bool = False,
        request_id: str,
        max_wait_ms: int | None = None,
        retries: int | None = None,
        total_timeout_s: float | None = None,
        admit: Admit | None = None,
    ) -> Exchange:
        """Resolve the connection and build the upstream request; raises before any I/O upstream.

        ``path``/``query`` are raw (percent-encoded) and relative to the base URL. With
        ``absolute_url`` the host must be one of the connection's allowed hosts; ``upgrade_scheme``
        (forward-proxy mode) sends to https when the base URL is https. ``admit`` (the nginx
        decision) sees the plan and the cleaned caller headers before any quota is spent and may
        raise to stop the call there.
        """
        refuse_trace(method)
        ctx = trace.current()
        if ctx is not None:
            ctx.tenant, ctx.connection = tenant_id, connection_id
        creds = await self.credentials(tenant_id, connection_id, runtime_user_id)
        plan = self.plan_for(creds)
        if ctx is not None:
            ctx.connection, ctx.integration, ctx.upstream_host = (
                creds.record.connection_id,
                plan.integration.id,
                plan.host,
            )
        if absolute_url is None:
            if plan.refusal is not None:
                raise plan.refusal
            base_url = plan.base_url
            host_key = plan.host_key
        else:
            base_url, host_key, path, query = self._absolute(plan, absolute_url, upgrade_scheme)
            if ctx is not None:
                ctx.upstream_host = host_key.rpartition(":")[0]

        # The caller's own input is checked before anything is spent on the call: a malformed
        # request must not use rate-limit quota, wait for it, or refresh a token.
        headers = clean_request_headers(caller_headers)
        if ctx is not None:
            headers.extend(ctx.upstream_headers())  # W3C trace context, this service's span
        url = self._url(base_url, path, query)
        if admit is not None:
            await admit(plan, tenant_id, headers)

        decision = await self.limiter.acquire(plan.target)
        if ctx is not None:
            ctx.limit, ctx.limit_source = ("allowed" if decision.allowed else "denied"), decision.source
        if not decision.allowed:
            await self._wait_for_limit(plan, decision, max_wait_ms, ctx)

        injection = plan.injection
        token: str | None = None
        if injection is None:
            injection, token = await self._oauth_injection(plan)
        headers, injected_query = apply(injection, headers, query)
        if injected_query != query:  # a credential carried in the query string
            url = self._url(base_url, path, injected_query)
        scrub: tuple[str, ...] = ()
        if plan.proxy_only or await self.tenant_flags.proxy_only(tenant_id):
            scrub = injection.scrub

        timeout = plan.timeout
        if total_timeout_s is not None:
            timeout = ClientTimeout(
                total=total_timeout_s, sock_connect=timeout.sock_connect, sock_read=timeout.sock_read
            )
        return Exchange(
            caller=caller,
            tenant_id=tenant_id,
            connection_id=creds.record.connection_id,
            request_id=request_id,
            method=method,
            plan=plan,
            url=url,
            headers=headers,
            timeout=timeout,
            retries=plan.retries if retries is None else retries,
            host_key=host_key,
            token=token,
            scrub=scrub,
            limit_source=decision.state.source,
        )

    def _url(self, base_url: str, path: str, query: str) -> URL:
        """The joined and checked upstream URL (APIs see the same paths again and again)."""
        key = (base_url, path, query)
        url = self._urls.get(key)
        if url is None:
            url = self._urls.put(key, URL(join_upstream(base_url, path, query), encoded=True))
        return url

    def _absolute(self, plan: Plan, url: str, upgrade: bool) -> tuple[str, str, str, str]:
        """(base URL, host key, path, query) of an absolute target, in path mode's terms.

        The target's path must lie under the base URL's path; the rest of it is then joined
        under that path by ``join_upstream`` like a path-mode path (same ``..`` checks, same
        refusal), so both modes reach exactly the same URLs.
        """
        scheme, host, port, target = split_absolute(url)
        if upgrade and plan.base_scheme == "https" and scheme == "http":
            scheme = "https"
            explicit_port = urlsplit_port(url)
            port = explicit_port if explicit_port not in (None, 80) else 443
        check_destination(self.egress, plan, scheme, host)
        if port != plan.base_port:
            # Another port of a bound host is another service: the caller may not pick it.
            raise HostNotAllowed(
                f"port {port} is not the port of connection {plan.record.connection_id!r} "
                f"({plan.base_port}, from its base URL); send the call to that port"
            )
        path, _, query = target.partition("?")
        prefix = plan.base_path.rstrip("/")
        if prefix:
            # Compared raw and case-sensitively, at a segment boundary: "/API", "/%61pi" and
            # "/apix" are not under "/api".
            if path != prefix and not path.startswith(prefix + "/"):
                raise escape_error(outside=True)
            path = path[len(prefix) :]
        netloc = f"[{host}]" if ":" in host else host
        default = 443 if scheme == "https" else 80
        base = f"{scheme}://{netloc}{'' if port == default else f':{port}'}{plan.base_tail}"
        return base, f"{host}:{port}", path, query

    async def _wait_for_limit(
        self, plan: Plan, decision: Decision, max_wait_ms: int | None, ctx: trace.CallContext | None = None
    ) -> None:
        """Wait for the limit when the caller (or the connection) allows it, else 429."""
        limiter = self.limiter
        cap = self.settings.max_wait_ms_cap
        wait_ms = min(plan.max_wait_ms if max_wait_ms is None else max_wait_ms, cap)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + wait_ms / 1000
        while True:
            left_ms = (deadline - loop.time()) * 1000
            if decision.retry_after_ms > left_ms:
                raise RateLimited(
                    f"connection {plan.record.connection_id!r} is rate limited by its "
                    f"{limit_kind(decision)} limit; retry after {decision.retry_after_ms} ms, or send "
                    f"X-Proxy-Max-Wait-Ms to let the proxy wait",
                    retry_after_ms=decision.retry_after_ms,
                    source=limit_kind(decision),
                )
            await asyncio.sleep(decision.retry_after_ms / 1000)
            decision = await limiter.acquire(plan.target)
            if decision.allowed:
                RATELIMIT_DECISIONS_TALLY.inc(("waited", decision.source))
                if ctx is not None:
                    ctx.limit, ctx.limit_source = "waited", decision.source
                    ctx.limit_wait_ms = round((loop.time() - started) * 1000, 2)
                return

    async def _oauth_injection(self, plan: Plan) -> tuple[Injection, str | None]:
        token = await self.tokens.access_token(plan.creds)
        cached = self._oauth_injections.get(plan.creds, token)
        if cached is None:
            cached = build_injection(plan.integration, plan.creds.params, access_token=token)
            self._oauth_injections.put(plan.creds, cached, token)
        return cached, token

    # --- sending ------------------------------------------------------------------------------

    async def open(self, ex: Exchange, body: Body, *, idempotency_key: bool = False) -> ClientResponse:
        """Send the call; returns the upstream response with its body unread (``proxy.pipeline.send``).

        The per-host slot is held until ``finish``. Retries only when allowed (see module doc).
        """
        return await send(
            ex,
            body,
            idempotency_key=idempotency_key,
            session=self.client(),
            limiter=self.limiter,
            observe=self.observe,
            inflight=self._inflight,
            cap=self.settings.upstream_max_per_host,
        )

    # --- after the response -------------------------------------------------------------------

    def observe(
        self,
        plan: Plan,
        status: int,
        headers: CIMultiDictProxy[str] | Iterable[Pair],
        token: str | None,
    ) -> None:
        """Learn from the response's rate-limit signals; a response without any (the common
        case) costs one pass over its header names. Merging into shared state runs as a task.
        Path mode calls it per response; the nginx front end per reported access-log line."""
        obs = parse_response(status, headers, now=time.time(), styles=plan.styles)
        if not obs.is_empty():
            self._spawn(self.limiter.observe(plan.scope, obs, quota_key=plan.target.quota_key))
        if status == 401 and plan.oauth:
            self._spawn(self.tokens.on_unauthorized(plan.creds, token))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Type only: an exception message may quote a value, and logs never hold secrets.
            log.warning("background rate-limit/token update failed: %s", type(task.exception()).__name__)

    def finish(self, ex: Exchange | None, front: str, outcome: str, status: int | None = None) -> None:
        """Release the host slot, count the request, audit the use (buffered, O(1)) and note the
        outcome for the call's access line (written by the error middleware once answered)."""
        ctx = trace.current()
        if ctx is not None:
            ctx.front, ctx.outcome, ctx.upstream_status = front, outcome, status
            if ex is not None and status is not None:
                ctx.upstream_ms = round(ex.latency_s * 1000, 2)
        if ex is not None:
            if ex.holds_slot:
                ex.holds_slot = False
                left = self._inflight.get(ex.host_key, 1) - 1
                if left > 0:
                    self._inflight[ex.host_key] = left
                else:
                    self._inflight.pop(ex.host_key, None)
            if status is not None:
                UPSTREAM_RESPONSES_TALLY.inc(
                    (ex.plan.integration.id, _STATUS_CLASS.get(status // 100, "other"))
                )
            self.audit.record_use(
                ex.caller.actor, ex.tenant_id, ex.connection_id, "proxy.use", outcome, ex.request_id
            )
        REQUESTS_TALLY.inc((front, outcome))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def urlsplit_port(url: str) -> int | None:
    try:
        return urlsplit(url).port
    except ValueError:
        return None
