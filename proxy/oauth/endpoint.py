"""The HTTP side of OAuth: posting to a token or revocation endpoint and reading its answer.

Why it exists: every token the service holds comes from one of these calls (code exchange,
refresh, client-credentials mint, revocation), and each must obey the same rules, kept here once:

- the endpoint is an absolute http(s) URL; plain http only to hosts in ``PROXY_EGRESS_ALLOW``
  (client secrets and tokens travel over https), and IP literals pass the egress guard (names
  are checked by the guarded resolver of the service's upstream client);
- redirects are never followed (a redirect could carry the client secret elsewhere);
- the answer is bounded (``MAX_TOKEN_RESPONSE``) and the call times out;
- failures are typed: a timeout is ``UpstreamTimeout``, an unreachable server
  ``UpstreamUnreachable`` (both counted in ``proxy_oauth_token_refresh_total``), and an answer
  that is not a token set ``TokenEndpointError`` (``flows.parse_token_response``), whose ``kind``
  tells the caller whether the grant, the client or nothing at all is to blame.

No decision about connections is made here: ``proxy.oauth.tokens`` decides what a failure means
for the connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from proxy.errors import HostNotAllowed, ServiceUnavailable, UpstreamTimeout, UpstreamUnreachable
from proxy.oauth import flows
from proxy.oauth.flows import TokenEndpointError, TokenRequest, TokenSet
from proxy.observe.metrics import OAUTH_REFRESH
from proxy.security.egress import EgressPolicy
from proxy.settings import Settings

MAX_TOKEN_RESPONSE = 256 * 1024
USER_AGENT = "connection-proxy"


class TokenEndpoint:
    """Token and revocation endpoint calls over the service's (egress-guarded) HTTP client."""

    def __init__(self, settings: Settings) -> None:
        self.egress = EgressPolicy(settings.egress_allow)
        total = min(30.0, settings.upstream_total_timeout_s)
        self.timeout = aiohttp.ClientTimeout(
            total=total, sock_connect=min(total, settings.upstream_connect_timeout_s)
        )
        self._http: aiohttp.ClientSession | None = None

    def bind_client(self, session: aiohttp.ClientSession) -> None:
        self._http = session

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise ServiceUnavailable("the token manager is not started yet; retry in a moment")
        return self._http

    def check(self, url: str) -> None:
        """Refuses an endpoint credentials must not be sent to (see the module docstring)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme not in ("https", "http") or not host:
            # Scheme only: the URL may come from connection parameters and carry a key.
            raise HostNotAllowed(
                f"OAuth endpoint (scheme {parts.scheme[:10]!r}) is not an absolute http(s) URL"
            )
        if parts.scheme == "http" and not self.egress.is_allowed_host(host):
            raise HostNotAllowed(
                f"OAuth endpoint host {host!r} uses plain http; client secrets and tokens only travel "
                "over https unless the host is in PROXY_EGRESS_ALLOW"
            )
        # IP literals never reach the resolver, so the guard is applied to them here.
        self.egress.check_literal(host)

    async def post(self, req: TokenRequest) -> tuple[int, str, bytes]:
        """(status, content type, body) of one bounded POST; raises on timeout or no answer."""
        self.check(req.url)
        host = urlsplit(req.url).hostname
        headers = {**req.headers, "User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        try:
            async with self.http.post(
                req.url, data=req.body(), headers=headers, timeout=self.timeout, allow_redirects=False
            ) as resp:
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_TOKEN_RESPONSE:
                        raise TokenEndpointError(
                            "protocol",
                            resp.status,
                            None,
                            f"the OAuth endpoint at {host!r} sent an oversized answer",
                        )
                return resp.status, resp.headers.get("Content-Type", ""), bytes(body)
        except TimeoutError:
            OAUTH_REFRESH.labels(outcome="timeout").inc()
            raise UpstreamTimeout(
                f"the OAuth endpoint at {host!r} did not answer within {self.timeout.total:g}s; try again"
            ) from None
        except aiohttp.ClientError as exc:
            OAUTH_REFRESH.labels(outcome="unreachable").inc()
            raise UpstreamUnreachable(
                f"cannot reach the OAuth endpoint at {host!r} ({type(exc).__name__}); try again"
            ) from None

    async def tokens(
        self,
        req: TokenRequest,
        *,
        clock: Callable[[], float],
        previous_refresh_token: str | None = None,
        requested_scope: Any = None,
    ) -> TokenSet:
        """A token request's answer as a ``TokenSet``, or ``TokenEndpointError``; ``clock`` is
        read when the answer arrives (token lifetimes count from then)."""
        status, ctype, body = await self.post(req)
        return flows.parse_token_response(
            status,
            ctype,
            body,
            now=clock(),
            previous_refresh_token=previous_refresh_token,
            requested_scope=str(requested_scope) if requested_scope else None,
        )

    async def revoke(self, req: TokenRequest) -> None:
        """An RFC 7009 revocation; raises ``TokenEndpointError`` unless the server said 200."""
        status, ctype, body = await self.post(req)
        flows.check_revocation_response(status, ctype, body)
