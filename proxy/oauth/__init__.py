"""OAuth 2.0 for connections: authorization-code with PKCE, refresh, client credentials, revocation.

Layout (the pure parts import neither aiohttp nor redis, so they are unit-tested in isolation):

- ``flows``: client configuration, authorization URLs, token/revocation request building and
  token response parsing into typed outcomes (RFC 6749, RFC 7009).
- ``state``: PKCE (RFC 7636), one-time ``state`` values bound to a connect session and a browser.
- ``tokens``: ``TokenManager``, the I/O side: exchanging, refreshing (single-flight across
  replicas), minting, caching and revoking tokens.

Connect sessions and the connect flow, which serve API-key forms as much as OAuth, live in
``proxy.connect``. This package deliberately imports nothing at package level, so importing a pure module does not
pull in aiohttp.
"""
