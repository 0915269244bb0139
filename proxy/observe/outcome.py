"""One vocabulary for what happened: the ``outcome`` label of the request metrics and the
``outcome`` field of audit events.

Why it exists: the metrics (``proxy_requests_total``, ``proxy_connection_service_requests_total``)
and the audit trail describe the same requests, so an operator who sees a spike of one outcome
in a dashboard finds the same word in the audit trail. Every outcome is one of:

- ``ok``: served (a proxied call whose upstream answered below 400 included);
- ``upstream_4xx`` / ``upstream_5xx``: the upstream's own error answer was relayed (``of_status``);
- an error code (``RATE_LIMITED``, ``CONNECTION_NOT_FOUND``, ...): the ``ProxyError`` the caller
  got, spelled exactly as in its ``X-Proxy-Error`` header (``of_error``);
- ``tls_handshake_failed``: a ``CONNECT`` tunnel was granted but the client refused the minted
  certificate (it does not trust the proxy's CA, or pins certificates);
- ``client_disconnected``: the caller left before the answer was written; ``error``: the
  request ended without a known outcome (an unexpected failure).

The audit trail refines two of them, since it is per-tenant evidence that metrics (without
tenant labels) cannot hold; the metric counts them under the coarser outcome:

- ``denied``: a caller authenticated for another tenant asked for this tenant's connection
  (answered, and counted, as ``CONNECTION_NOT_FOUND``, so the caller learns nothing);
- ``ok_public_only``: served, but only the non-secret parameters of a proxy-only connection
  (counted as ``ok``).

Connect pages record audit events only (no request metric): ``refused`` (a form or callback
that failed its CSRF, state, binding or issuer check), ``invalid`` (a form with field problems),
``denied`` (the user or provider declined the sign-in) and ``failed`` (the code exchange failed).

Pure module: no I/O.
"""

from __future__ import annotations

from enum import StrEnum

from proxy.errors import ProxyError


class Outcome(StrEnum):
    OK = "ok"
    OK_PUBLIC_ONLY = "ok_public_only"
    DENIED = "denied"
    REFUSED = "refused"
    INVALID = "invalid"
    FAILED = "failed"
    CLIENT_DISCONNECTED = "client_disconnected"
    ERROR = "error"
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"


def of_error(exc: ProxyError) -> str:
    """The outcome of a request that ended with ``exc``: its code, as the caller saw it."""
    return exc.code


def of_status(status: int) -> str:
    """The outcome of a proxied call whose upstream answered ``status``."""
    return Outcome.OK.value if status < 400 else f"upstream_{status // 100}xx"
