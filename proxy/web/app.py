"""Assembles the service: settings in, a runnable aiohttp application out.

Start-up order matters and is the same for every front end: open the store, prove the master key
ring opens every stored tenant key (a wrong or missing key stops start-up before listening), start
the limiter, the audit writer and cross-replica cache invalidation, then serve. Shutdown runs the
reverse and flushes the audit buffer so nothing recorded is lost on a graceful stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.catalogue import Catalogue
from proxy.oauth.tokens import TokenManager
from proxy.observe import logs
from proxy.observe.audit import AuditLog
from proxy.pipeline.upstream.client import make_session
from proxy.ratelimit.limiter import Limiter, make_limiter
from proxy.ratelimit.targets import connection_of_scope
from proxy.security.auth import Authenticator
from proxy.security.bootstrap import Secrets, load_secrets, ring_reader
from proxy.security.egress import EgressPolicy
from proxy.settings import Settings
from proxy.store import open_store
from proxy.store.base import Store
from proxy.vault.vault import TenantFlags, Vault
from proxy.web import admin, connect, connsvc, ops, proxy_routes, ratelimits
from proxy.web.authn import SERVICES as SERVICES
from proxy.web.errors import error_middleware

log = logging.getLogger("proxy.app")

# Admin/JSON bodies are small; the proxy streams its bodies and is not bound by this.
ADMIN_BODY_MAX = 10 * 1024 * 1024


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
    http: aiohttp.ClientSession | None = None
    extras: dict[str, object] = field(default_factory=dict)

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
    vault = Vault(store, secrets.ring, catalogue, settings.credential_cache_ttl_s, ring_reader(settings))
    return Services(
        settings=settings,
        secrets=secrets,
        store=store,
        catalogue=catalogue,
        vault=vault,
        limiter=make_limiter(settings),
        audit=AuditLog(store, settings),
        auth=Authenticator(settings, store, secrets.admin_token),
        egress=EgressPolicy(settings.egress_allow),
        tokens=TokenManager(vault, store, settings),
        tenant_flags=TenantFlags(store, settings.proxy_only_tenants, settings.credential_cache_ttl_s),
    )


async def _startup(app: web.Application) -> None:
    svc = app[SERVICES]
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


async def _cleanup(app: web.Application) -> None:
    """Shutdown in reverse order, each step bounded: a stuck dependency must not keep the
    process from exiting (the audit flush goes first among the store users and gets the most).
    With aiohttp's 10 s grace for in-flight requests, a stop takes at most ~22 s."""
    svc = app[SERVICES]
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


def build_app(settings: Settings, services: Services | None = None) -> web.Application:
    svc = services or build_services(settings)
    app = web.Application(middlewares=[error_middleware], client_max_size=ADMIN_BODY_MAX)
    app[SERVICES] = svc
    # The forward-proxy front end inspects absolute-form targets before routing.
    proxy_routes.setup(app)
    ops.setup(app)
    admin.setup(app)
    ratelimits.setup(app)
    connsvc.setup(app)
    connect.setup(app)
    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)
    return app
