"""The pipeline's decision half, answered as data for a proxy in front (nginx ``auth_request``,
Envoy ``ext_authz``): which upstream, which address, which credential, for how long.

``Decider.decide`` runs exactly ``Pipeline.prepare`` (caller's connection and runtime user, status,
URL building under the base path, host binding, https-only credentials, limits, injection) and then
resolves the upstream host through the same egress guard the service's own client uses, so the
proxy in front is told the *checked IP address* to connect to and, separately, the name for
``Host``, SNI and certificate verification: it never resolves a name itself (no rebinding window).

nginx asks again for every call, mostly the same question: a verdict is remembered (``_memo``)
per caller, connection, request target and the caller headers that can change it, and replayed
while it is still what ``prepare`` would build. A replay is not a cache of the *answer*: on every
call it still loads the connection's credentials through the vault (a revoked, deleted or
changed connection is a new ``Credentials`` object or an error, as on the full path), checks the
tenant's proxy-only flag, asks the limiter (a denial takes the full path, which waits or refuses)
and computes the lifetime afresh; the caller was authenticated before. Only static credentials
are replayed (an OAuth token may need refreshing) and never past the checked address's DNS TTL.

Security invariants kept here:
- nginx can only set header names known when its configuration was generated
  (``injectable_headers``); a call whose credential travels in any other header or in the query
  (nginx's error log writes the upstream URI), whose connection
  redacts secrets from answers (proxy-only), or whose caller sent a control header nginx cannot
  strip is routed to this service's own path mode (``route == "service"``) before any quota is
  spent: the credential is never silently dropped and nothing the pipeline would strip leaks;
- a decision may be cached by the proxy in front only when that is safe (``_lifetime``): no
  configured window, nothing learned in force, a credential that does not expire meanwhile, and
  never longer than the in-process caches already honour a revoked key or a changed connection;
- the access-log report that teaches the limiter (``observation``) is authenticated with an HMAC
  under a key derived from the master key: a forged datagram cannot teach a limit to a connection.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from proxy.cache import BoundedCache, IdentityCache
from proxy.errors import UpstreamUnreachable
from proxy.model import Caller
from proxy.observe import trace
from proxy.observe.outcome import of_status
from proxy.pipeline.exchange import Exchange, parse_control_int
from proxy.pipeline.pipeline import Pipeline
from proxy.pipeline.plan import MAX_RETRIES, Plan
from proxy.pipeline.upstream.resolver import GuardedResolver
from proxy.security.auth import KEY_CACHE_TTL_S
from proxy.security.egress import parse_ip_literal

if TYPE_CHECKING:
    from proxy.catalogue import Catalogue
    from proxy.vault.records import Credentials

__all__ = [
    "CONTROL_SET",
    "NGINX_STRIPS",
    "Decider",
    "ServeByService",
    "Verdict",
    "injectable_headers",
    "observation_key",
]

Pair = tuple[str, str]

# Headers the decision always sets (empty: removed), whatever the caller sent. (Trace context
# passes through nginx as the caller sent it: nginx takes no part in the trace, and a cached
# decision would otherwise hand every call the same span.)
CONTROL_SET: tuple[str, ...] = ("authorization",)
# Caller headers the generated config always removes (nginx itself drops Connection, Keep-Alive,
# TE, Upgrade, Expect and re-frames the body); for the service route it passes the caller's.
NGINX_STRIPS: tuple[str, ...] = (
    "proxy-authorization",
    "proxy-connection",
    "trailer",
    "x-connection-id",
    "x-tenant-id",
    "x-runtime-user-id",
    "x-org-id",
    "x-proxy-max-wait-ms",
    "x-proxy-retries",
)
_NGINX_OWN = frozenset({"connection", "keep-alive", "te", "upgrade", "expect", "transfer-encoding", "host"})
_DEFAULT_INJECTABLE = ("authorization", "cookie", "x-api-key")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
DNS_TTL_S = 10.0  # as the service's own client (aiohttp's ttl_dns_cache)
OBSERVATION_TTL_S = 120
# Caller headers that differ on every call and that no verdict depends on: left out of the memo
# key so that tracing callers are replayed too (a value with CR, LF or NUL stays in the key, so
# such a call takes the full path and its header check).
_PER_CALL = frozenset({"x-request-id", "traceparent", "tracestate"})
MEMO_SIZE = 4096
# The memos hold callers' requests, their credentials included (the auth cache keeps only key
# hashes): nothing stays in them longer than this after it was put there (``forget``).
MEMO_S = 10.0
# (actor, tenant, connection as resolved) of a decision, for its audit record.
Who = tuple[str, str, str]


def injectable_headers(catalogue: Catalogue, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The header names a generated nginx config can set from a decision (lower case, sorted).

    The defaults, every static header name the catalogue's templates inject and the operator's
    ``nginx_inject_headers``; names nginx cannot map to a variable unambiguously are left out
    (their connections are served by the service route).
    """
    names = set(_DEFAULT_INJECTABLE)
    for integration in catalogue:
        for name, _ in integration.inject_headers:
            if "{" not in name:
                names.add(name.strip().lower())
    names.update(n.strip().lower() for n in extra if n.strip())
    return tuple(sorted(n for n in names if n and set(n) <= _NAME_CHARS and n not in _NGINX_OWN))


def observation_key(master_key: bytes) -> bytes:
    """The HMAC key of observation tokens: every replica derives the same one."""
    return hmac.new(master_key, b"connection-proxy nginx observation v1", hashlib.sha256).digest()


class ServeByService(Exception):
    """Raised inside ``prepare`` (before the limiter): this call must go through path mode."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where and how the proxy in front sends one call."""

    route: str  # "upstream", or "service": the caller's request goes to this service's path mode
    scheme: str = ""
    addr: str = ""  # the checked "IP:port" ("[v6]:port") to connect to
    host: str = ""  # the Host header (port included when not the scheme's default)
    server_name: str = ""  # SNI and the certificate name to verify
    uri: str = ""  # path and query (a query-carried credential included)
    # Lower-case header name -> value to send (empty: the header is removed).
    set_headers: dict[str, str] = field(default_factory=dict, repr=False)
    lifetime_s: int = 0
    observation: str = field(default="", repr=False)


@dataclass(slots=True)
class _Memo:
    """A verdict and what it was built from; valid while ``creds`` is the vault's current object."""

    creds: Credentials
    plan: Plan
    verdict: Verdict
    who: Who
    until: float  # monotonic: the checked address's DNS TTL


def _memo_headers(caller_headers: Sequence[Pair]) -> tuple[Pair, ...]:
    return tuple(
        p
        for p in caller_headers
        if p[0].lower() not in _PER_CALL or "\r" in p[1] or "\n" in p[1] or "\x00" in p[1]
    )


class Decider:
    """The decision half of the pipeline for a proxy in front."""

    def __init__(self, pipeline: Pipeline, names: Sequence[str], obs_key: bytes, cache_s: int) -> None:
        self.pipeline = pipeline
        self.names = tuple(names)
        self._names = frozenset(names)
        self._strips = frozenset(NGINX_STRIPS) | frozenset(CONTROL_SET)
        self._key = obs_key
        self._resolver = GuardedResolver(pipeline.egress)
        self._addrs: BoundedCache[tuple[str, int], tuple[float, str]] = BoundedCache(4096)
        self._signed: BoundedCache[tuple[str, str, str], tuple[float, str]] = BoundedCache(4096)
        # Tokens already verified (nginx reports the same token for every call of a decision).
        self._verified: BoundedCache[str, tuple[int, tuple[str, str, str]]] = BoundedCache(4096)
        # The plan of each connection's latest decision, for as long as the vault's own cache
        # may serve it: a report is learned from at once (``observed_now``), before the next
        # decision is made, so a learned Retry-After is not raced by a decision nginx caches.
        self._plans: BoundedCache[tuple[str, str], tuple[float, Plan]] = BoundedCache(4096)
        self._memo: BoundedCache[tuple[object, ...], _Memo] = BoundedCache(MEMO_SIZE)
        # The answer headers of a verdict, for the web layer (read, never mutated, by both
        # listeners): a replayed verdict is the same object, rendered once.
        self.rendered: IdentityCache[Verdict, dict[str, str]] = IdentityCache(MEMO_SIZE)
        s = pipeline.settings
        self._plan_ttl = s.credential_cache_ttl_s
        # nginx holds an entry up to one second past its lifetime (whole-second clock).
        bound = min(s.credential_cache_ttl_s, KEY_CACHE_TTL_S) - 1
        self.max_lifetime = max(0, min(cache_s, math.floor(bound)))

    async def close(self) -> None:
        await self._resolver.close()

    def forget(self) -> None:
        """Drop every remembered verdict (called every ``MEMO_S`` by the web layer)."""
        self._memo.clear()
        self.rendered.clear()

    # --- the decision ---------------------------------------------------------------------------

    async def decide(
        self,
        *,
        caller: Caller,
        tenant_id: str,
        connection_id: str,
        runtime_user_id: str | None,
        method: str,
        path: str,
        query: str,
        caller_headers: Sequence[Pair],
        nominated: str,
        request_id: str,
    ) -> tuple[Verdict, Who | None]:
        """The verdict for one call and whose call it was (None for the service route); raises
        the pipeline's ``ProxyError`` on refusal."""
        key: tuple[object, ...] = (caller, tenant_id, connection_id, runtime_user_id, method, path, query)
        key += (nominated, *_memo_headers(caller_headers))
        memo = self._memo.get(key)
        if memo is not None and memo.until > time.monotonic():
            verdict = await self._replay(memo, caller, tenant_id, connection_id, runtime_user_id)
            if verdict is not None:
                return verdict, memo.who
        h = {k.lower(): v for k, v in caller_headers}
        if self._needs_service(h, nominated):
            return self._service(caller_headers, nominated), None

        async def admit(plan: Plan, tenant: str, _headers: list[Pair]) -> None:
            injected = plan.injection.drop_headers if plan.injection is not None else {"authorization"}
            # A query-carried credential would be in nginx's upstream URI, which its error log
            # writes to disk on every failed call: the service carries those calls.
            if not injected <= self._names or plan.proxy_only or (plan.injection and plan.injection.query):
                raise ServeByService
            if await self.pipeline.tenant_flags.proxy_only(tenant):
                raise ServeByService

        try:
            ex = await self.pipeline.prepare(
                caller=caller,
                tenant_id=tenant_id,
                connection_id=connection_id,
                runtime_user_id=runtime_user_id,
                method=method,
                caller_headers=caller_headers,
                path=path,
                query=query,
                request_id=request_id,
                max_wait_ms=parse_control_int(h.get("x-proxy-max-wait-ms"), "X-Proxy-Max-Wait-Ms", 1 << 31),
                retries=parse_control_int(h.get("x-proxy-retries"), "X-Proxy-Retries", MAX_RETRIES),
                admit=admit,
            )
        except ServeByService:
            return self._service(caller_headers, nominated), None
        plan = ex.plan
        self._plans.put((ex.tenant_id, ex.connection_id), (time.monotonic() + self._plan_ttl, plan))
        url = ex.url
        scheme, host, port = url.scheme, url.raw_host or "", url.explicit_port or url.port or 0
        addr, until = await self._address(host, port)
        default = 443 if scheme == "https" else 80
        netloc = f"[{host}]" if ":" in host else host
        verdict = Verdict(
            route="upstream",
            scheme=scheme,
            addr=addr,
            host=netloc if port == default else f"{netloc}:{port}",
            server_name=host,
            uri=url.raw_path_qs,
            set_headers=self._headers(ex),
            lifetime_s=self._lifetime(plan, ex.limit_source),
            observation=self.sign(caller.actor, ex.tenant_id, ex.connection_id),
        )
        who = (caller.actor, ex.tenant_id, ex.connection_id)
        if plan.injection is not None:  # static credentials (OAuth: see the module doc)
            self._memo.put(key, _Memo(plan.creds, plan, verdict, who, until))
        return verdict, who

    async def _replay(
        self,
        memo: _Memo,
        caller: Caller,
        tenant_id: str,
        connection_id: str,
        runtime_user_id: str | None,
    ) -> Verdict | None:
        """``memo``'s verdict if ``prepare`` would build it now (None: take the full path).
        Raises as ``prepare`` would when the connection is gone or not usable any more."""
        pipeline = self.pipeline
        ctx = trace.current()
        if ctx is not None:
            ctx.tenant, ctx.connection = tenant_id, connection_id
        creds = await pipeline.credentials(tenant_id, connection_id, runtime_user_id)
        if creds is not memo.creds or await pipeline.tenant_flags.proxy_only(tenant_id):
            return None
        plan = memo.plan
        decision = await pipeline.limiter.acquire(plan.target)
        if not decision.allowed:
            return None  # a denial spends nothing; the full path waits or refuses
        if ctx is not None:
            ctx.connection, ctx.integration, ctx.upstream_host = memo.who[2], plan.integration.id, plan.host
            ctx.limit, ctx.limit_source = "allowed", decision.source
        self._plans.put((memo.who[1], memo.who[2]), (time.monotonic() + self._plan_ttl, plan))
        verdict = memo.verdict
        lifetime = self._lifetime(plan, decision.state.source)
        observation = self.sign(caller.actor, memo.who[1], memo.who[2])
        if lifetime != verdict.lifetime_s or observation != verdict.observation:
            verdict = memo.verdict = replace(verdict, lifetime_s=lifetime, observation=observation)
        return verdict

    def _needs_service(self, h: Mapping[str, str], nominated: str) -> bool:
        """Caller headers the pipeline drops that the generated config would forward."""
        for name in h:
            if name.startswith("x-proxy-") and name not in self._strips:
                return True
        for token in nominated.split(","):
            token = token.strip().lower()
            # A header the caller's Connection names is dropped by path mode, forwarded by nginx.
            if token in h and token not in ("close", "keep-alive") and token not in self._strips:
                return True
        return False

    def _service(self, caller_headers: Sequence[Pair], nominated: str) -> Verdict:
        """Path mode of this service carries the call: the caller's own control headers go there,
        and its ``Connection`` (so path mode drops the headers it names, as for a direct call)."""
        mine: dict[str, list[str]] = {}
        for name, value in caller_headers:
            lname = name.lower()
            if lname in self._strips or lname in self._names:
                mine.setdefault(lname, []).append(value)
        values = {n: ("; " if n == "cookie" else ", ").join(v) for n, v in mine.items()}
        if nominated:
            values["connection"] = nominated
        return Verdict(route="service", set_headers=values)

    def _headers(self, ex: Exchange) -> dict[str, str]:
        plan = ex.plan
        injection = plan.injection
        touched = set(CONTROL_SET)
        if injection is not None:
            touched |= injection.drop_headers
        out: dict[str, list[str]] = {n: [] for n in touched}
        for name, value in ex.headers:
            lname = name.lower()
            if lname in out:
                out[lname].append(value)
        return {n: ("; " if n == "cookie" else ", ").join(v) for n, v in out.items()}

    async def _address(self, host: str, port: int) -> tuple[str, float]:
        """The address nginx connects to, checked by the egress guard (``check_destination``
        already refused non-public literals; names are resolved and every address checked), and
        until when (monotonic) it may be used."""
        now = time.monotonic()
        cached = self._addrs.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1], cached[0]
        if parse_ip_literal(host) is not None:
            literal = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self._addrs.put((host, port), (math.inf, literal))
            return literal, math.inf
        try:
            try:
                results = await self._resolver.resolve(host, port, socket.AF_INET)
            except OSError:
                results = await self._resolver.resolve(host, port, socket.AF_INET6)
        except OSError:
            raise UpstreamUnreachable(
                f"the call to upstream {host!r} could not be resolved; check the connection's "
                "base URL, or retry if the upstream is restarting"
            ) from None
        if not results:
            raise UpstreamUnreachable(
                f"upstream {host!r} resolved to no address; check the connection's base URL"
            )
        ip = str(results[0]["host"])
        addr = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        self._addrs.put((host, port), (now + DNS_TTL_S, addr))
        return addr, now + DNS_TTL_S

    def _lifetime(self, plan: Plan, limit_source: str | None) -> int:
        """Seconds the proxy in front may reuse this decision (0: ask again every call);
        ``limit_source``: the kind of limit state the limiter reported for the call."""
        n = self.max_lifetime
        target = plan.target
        if n <= 0 or target.windows or target.quota_windows or limit_source is not None:
            return 0
        if plan.oauth:
            expires = plan.creds.params.get("expires_at")
            if not isinstance(expires, int | float) or isinstance(expires, bool):
                return 0
            if expires - time.time() <= n + 1:
                return 0
        return n

    # --- observations ---------------------------------------------------------------------------

    def sign(self, actor: str, tenant_id: str, connection_id: str) -> str:
        """The observation token of a decision; one per caller and connection is reused until
        half its lifetime is gone (signing is per decision, on the hot path)."""
        key = (actor, tenant_id, connection_id)
        now = time.time()
        cached = self._signed.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        token = self._sign(actor, tenant_id, connection_id, int(now) + OBSERVATION_TTL_S)
        self._signed.put(key, (now + OBSERVATION_TTL_S / 2, token))
        return token

    def _sign(self, actor: str, tenant_id: str, connection_id: str, expires: int) -> str:
        payload = json.dumps([actor, tenant_id, connection_id, expires])
        body = base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).digest()[:18]
        return f"{body}.{base64.urlsafe_b64encode(mac).decode()}"

    def verify(self, token: str) -> tuple[str, str, str] | None:
        """(actor, tenant, connection) of a token this service signed and that has not expired."""
        known = self._verified.get(token)
        if known is not None and known[0] >= time.time():
            return known[1]
        who = self._verify(token)
        if who is not None:
            self._verified.put(token, who)
        return None if who is None else who[1]

    def _verify(self, token: str) -> tuple[int, tuple[str, str, str]] | None:
        body, _, mac = token.partition(".")
        try:  # body.encode() too: a forged token may hold a lone surrogate
            want = hmac.new(self._key, body.encode(), hashlib.sha256).digest()[:18]
            if not hmac.compare_digest(base64.urlsafe_b64decode(mac), want):
                return None
            actor, tenant, cid, exp = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (ValueError, TypeError):
            return None
        if not (isinstance(exp, int) and exp >= time.time()):
            return None
        return exp, (str(actor), str(tenant), str(cid))

    def observed_now(
        self, who: tuple[str, str, str], status: int, headers: Sequence[Pair], request_id: str
    ) -> bool:
        """``observed`` without waiting, when the connection's plan is at hand (False: it is not,
        call ``observed``). ``who``: what ``verify`` said of the report's token."""
        known = self._plans.get((who[1], who[2]))
        if known is None or known[0] <= time.monotonic():
            return False
        self._learn(who, known[1], status, headers, request_id)
        return True

    async def observed(
        self, who: tuple[str, str, str], status: int, headers: Sequence[Pair], request_id: str
    ) -> bool:
        """One response nginx relayed (its token verified to ``who``): learn from its rate-limit
        headers, audit the outcome."""
        pipeline = self.pipeline
        try:
            creds = await pipeline.vault.credentials(who[1], who[2])
            plan = pipeline.plan_for(creds)
        except Exception:  # a report of a since-deleted or broken connection is dropped
            return False
        self._learn(who, plan, status, headers, request_id)
        return True

    def _learn(
        self, who: tuple[str, str, str], plan: Plan, status: int, headers: Sequence[Pair], request_id: str
    ) -> None:
        actor, tenant, cid = who
        self.pipeline.observe(plan, status, list(headers), None)
        self.pipeline.audit.record_use(actor, tenant, cid, "proxy.use", of_status(status), request_id)
