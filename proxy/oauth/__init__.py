"""OAuth 2.0 for connections: authorization-code with PKCE, refresh, client credentials, revocation.

Layout (the pure parts import neither aiohttp nor redis, so they are unit-tested in isolation):

- ``flows``: client configuration, authorization URLs, token/revocation request building and
  token response parsing into typed outcomes (RFC 6749, RFC 7009).
- ``state``: PKCE (RFC 7636), one-time ``state`` values bound to a connect session and a browser.
- ``endpoint``: the token and revocation endpoint HTTP calls (https-only, egress-guarded,
  bounded) and their typed failures.
- ``minting``: client-credentials tokens, minted on demand and cached per process.
- ``tokens``: ``TokenManager``, the orchestration: which token a call uses, refreshing
  (single-flight across replicas), the connect callback's code exchange, revocation, and what
  each failure does to the connection's status.

Connect sessions and the connect flow, which serve API-key forms as much as OAuth, live in
``proxy.connect``. This package deliberately imports nothing at package level, so importing a pure module does not
pull in aiohttp.
"""
