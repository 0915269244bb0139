"""The one HTTP client the service uses to reach upstream APIs, and why it is not stock aiohttp.

Every proxied call, OAuth token request and connection test goes through the session built by
``make_session``. Its security properties come from ``proxy.pipeline.upstream.resolver`` (egress guard in
the resolver and for IP literals), a dummy cookie jar (one tenant's cookies never ride along on
another's call), no proxy environment variables, no automatic decompression and no headers of
aiohttp's own.

Its request class and response protocol override aiohttp internals for speed; they live in
``proxy.pipeline.upstream.aiohttp_internals``, which says what they rely on.
"""

from __future__ import annotations

import asyncio
import ssl

import aiohttp

from proxy.errors import ConfigError
from proxy.pipeline.upstream.aiohttp_internals import (
    SKIP_AUTO_HEADERS,
    UpstreamRequest,
    install_lazy_read_timeout,
)
from proxy.pipeline.upstream.resolver import GuardedResolver, literal_guard_middleware
from proxy.security.egress import EgressPolicy
from proxy.settings import Settings

__all__ = ["make_session"]


def upstream_ssl_context(settings: Settings) -> ssl.SSLContext:
    """Full verification against the system roots (OpenSSL honours ``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR``) plus ``upstream_ca_file``, if set, for private upstream CAs."""
    ctx = ssl.create_default_context()
    if settings.upstream_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(settings.upstream_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "upstream_ca_file", f"cannot load {settings.upstream_ca_file}: {type(exc).__name__}"
            ) from None
    return ctx


def make_session(settings: Settings, egress: EgressPolicy) -> aiohttp.ClientSession:
    """The upstream session; must be called with the event loop running."""
    asyncio.get_running_loop()  # fail here, not on first use, when called outside the loop
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(egress),
        limit=0,
        limit_per_host=0,  # the per-host cap is enforced by the pipeline with a fast 503
        ttl_dns_cache=10,
        enable_cleanup_closed=True,
        ssl=upstream_ssl_context(settings),
    )
    install_lazy_read_timeout(connector)
    return aiohttp.ClientSession(
        connector=connector,
        # aiohttp connects to IP literals without asking the resolver; this guard covers them.
        middlewares=(literal_guard_middleware(egress),),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one tenant's cookies to another call
        timeout=aiohttp.ClientTimeout(
            total=settings.upstream_total_timeout_s,
            sock_connect=settings.upstream_connect_timeout_s,
            sock_read=settings.upstream_read_timeout_s,
        ),
        trust_env=False,
        skip_auto_headers=SKIP_AUTO_HEADERS,
        request_class=UpstreamRequest,
    )
