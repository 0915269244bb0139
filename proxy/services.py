"""The composition root: settings in, the running services out, outside any web framework.

Why it exists: every part of a call (vault, limiter, token manager, audit, egress guard, upstream
client) is built, started and stopped here, once per process, and each part is handed only the
few objects it uses. The web layer (``proxy.web``) takes a built ``Services`` and translates HTTP
to calls of it; nothing in the core imports the web layer.

Start-up order matters and is the same for every front end: open the store, prove the master key
ring opens every stored tenant key (a wrong or missing key stops start-up before listening), start
the limiter, the audit writer and cross-replica cache invalidation, then serve. Shutdown runs the
reverse and flushes the audit buffer so nothing recorded is lost on a graceful stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from proxy.catalogue import Catalogue
from proxy.oauth.tokens import TokenManager
from proxy.observe import logs
from proxy.observe.audit import AuditLog
from proxy.observe.metrics import STORE_DEGRADED, gauge_from
from proxy.pipeline.upstream.client import make_session
from proxy.ratelimit.limiter import Limiter, LocalLimiter
from proxy.ratelimit.redis import RedisLimiter
from proxy.ratelimit.targets import connection_of_scope
from proxy.security.auth import Authenticator
from proxy.security.bootstrap import Secrets, load_secrets, ring_reader
from proxy.security.egress import EgressPolicy
from proxy.settings import Settings
from proxy.stale import StaleWindow
from proxy.store import open_store
from proxy.store.base import Store
from proxy.vault.tenants import TenantFlags
from proxy.vault.vault import Vault

if TYPE_CHECKING:
    from proxy.ratelimit.redis import Client

log = logging.getLogger("proxy.app")


def make_limiter(settings: Settings, redis_client_or_url: Client | str | None = None) -> Limiter:
    """The Redis limiter when a client or URL (or ``settings.redis_url``) is given, else local."""
    source = redis_client_or_url if redis_client_or_url is not None else settings.redis_url
    if source is None:
        return LocalLimiter()
    return RedisLimiter.create(
        source, fail_mode=settings.ratelimit_fail_mode, timeout_s=settings.redis_timeout_s
    )


@dataclass
class Services:
    """Everything a handler needs, built once per process."""

    settings: Settings
    secrets: Secrets
    store: Store
    catalogue: Catalogue
    vault: Vault
    limiter: Limiter
    audit: AuditLog
    auth: Authenticator
    egress: EgressPolicy
    tokens: TokenManager
    tenant_flags: TenantFlags
    stale: StaleWindow  # the store's health as reads see it, shared by the caches and /readyz
    http: aiohttp.ClientSession | None = None

    @property
    def client(self) -> aiohttp.ClientSession:
        assert self.http is not None, "upstream client used before start-up"
        return self.http


def build_services(settings: Settings, secrets: Secrets | None = None) -> Services:
    secrets = secrets or load_secrets(settings)
    # This process's own secrets are masked verbatim in every log record from now on.
    logs.install([secrets.admin_token, settings.jwt_hs256_secret])
    store = open_store(settings)
    catalogue = Catalogue.load(settings.integrations_dirs)
    stale = StaleWindow(settings.stale_if_error_s, store.name)
    gauge_from(STORE_DEGRADED, lambda: 1.0 if stale.down else 0.0)
    vault = Vault(
        store, secrets.ring, catalogue, settings.credential_cache_ttl_s, ring_reader(settings), stale=stale
    )
    return Services(
        settings=settings,
        secrets=secrets,
        store=store,
        catalogue=catalogue,
        vault=vault,
        limiter=make_limiter(settings),
        audit=AuditLog(store, settings),
        auth=Authenticator(settings, store, secrets.admin_token, stale=stale),
        egress=EgressPolicy(settings.egress_allow),
        tokens=TokenManager(vault, store, settings),
        tenant_flags=TenantFlags(
            store, settings.proxy_only_tenants, settings.credential_cache_ttl_s, stale=stale
        ),
        stale=stale,
    )


async def start(svc: Services) -> None:
    """Start-up, in the order every front end needs (see the module docstring)."""
    await svc.store.open()
    tenants = await svc.vault.verify_keys()
    log.info(
        "store %s open; master key ring %s (versions %s) opens %d tenant key records",
        svc.store.name,
        svc.secrets.key_source,
        list(svc.secrets.ring.versions),
        tenants,
    )
    await svc.store.subscribe_invalidations(svc.vault.invalidate)
    await svc.store.subscribe_invalidations(svc.auth.on_invalidation)
    await svc.store.subscribe_invalidations(svc.tenant_flags.on_invalidation)
    # A replica that learns a scope's first upstream limit tells the others on the same channel.
    await svc.store.subscribe_invalidations(svc.limiter.on_invalidation)
    svc.limiter.use_invalidations(_announcer(svc.store))
    # Caller-key last-used times ride on the audit writer's flushes: no extra timer, no write per call.
    svc.audit.add_flush_hook(svc.auth.flush_usage)
    await svc.audit.start()
    # The token manager shares the upstream client (and so the egress guard) once it exists.
    svc.http = make_session(svc.settings, svc.egress)
    svc.tokens.bind_client(svc.http)


def _announcer(store: Store) -> Callable[[str], Awaitable[None]]:
    async def announce(scope: str) -> None:
        await store.publish_invalidation(*connection_of_scope(scope))

    return announce


async def stop(svc: Services) -> None:
    """Shutdown in reverse order, each step bounded: a stuck dependency must not keep the
    process from exiting (the audit flush goes first among the store users and gets the most).
    With aiohttp's 10 s grace for in-flight requests, a stop takes at most ~22 s."""
    steps: list[tuple[str, float, Awaitable[None]]] = []
    if svc.http is not None:
        steps.append(("upstream client", 2.0, svc.http.close()))
    steps += [
        ("audit flush", 5.0, svc.audit.stop()),
        ("limiter", 2.0, svc.limiter.close()),
        ("store", 3.0, svc.store.close()),
    ]
    for name, limit, step in steps:
        try:
            await asyncio.wait_for(step, limit)
        except TimeoutError:
            log.error("shutdown: %s did not finish within %.0f s; exiting anyway", name, limit)
        except Exception as exc:  # keep closing the rest; type only, messages may quote values
            log.error("shutdown: %s failed (%s); continuing", name, type(exc).__name__)
