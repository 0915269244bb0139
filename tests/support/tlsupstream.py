"""A TLS upstream with its own private CA (trustme) and a service configured to trust that CA.

For the CONNECT interception tests: the upstream listens on 127.0.0.2 (not "localhost" or
127.0.0.1, which ``connection-proxy run`` puts in NO_PROXY), serving a certificate from a test
CA that only the *service* trusts (``upstream_ca_file``). Clients trust only the service's own CA
(``/ca.pem``), so a call that succeeds proves the tunnel was intercepted, not passed through.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from tests.support.app import RunningService, running_service
from tests.support.upstream import Upstream, running_upstream

UPSTREAM_HOST = "127.0.0.2"
UNBOUND_HOST = "127.0.0.3"  # no connection is bound to it


@dataclass
class TlsSetup:
    svc: RunningService
    up: Upstream
    key: str  # a tenant API key of t1
    client_ca: Path  # the service's CA bundle, as a client gets it from /ca.pem
    tmp: Path

    @property
    def proxy_port(self) -> int:
        return int(self.svc.url.rsplit(":", 1)[1])

    @property
    def proxy_scheme(self) -> str:
        return self.svc.url.split(":", 1)[0]  # https when the listener speaks TLS

    def proxy_url(self, user: str = "c1", key: str | None = None) -> str:
        return f"{self.proxy_scheme}://{user}:{key or self.key}@127.0.0.1:{self.proxy_port}"

    def client_env(self, user: str = "c1", key: str | None = None) -> dict[str, str]:
        """Only what an operator sets: the proxy URL and the CA bundle variables."""
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("PROXY_")}
        url = self.proxy_url(user, key)
        ca = str(self.client_ca)
        env.update(
            HTTPS_PROXY=url,
            https_proxy=url,
            NO_PROXY="",
            no_proxy="",
            SSL_CERT_FILE=ca,
            REQUESTS_CA_BUNDLE=ca,
            CURL_CA_BUNDLE=ca,
            NODE_EXTRA_CA_CERTS=ca,
        )
        return env


@contextlib.asynccontextmanager
async def tls_setup(
    tmp_path: Path,
    connections: Mapping[str, Mapping[str, Any]] | None = None,
    listener_ca: Path | None = None,
    **settings: Any,
) -> AsyncIterator[TlsSetup]:
    """``settings`` go to the service (``listen_tls_hostnames=["127.0.0.1"]`` for an https
    listener minted from the service's CA); ``listener_ca`` is added to the clients' bundle
    (an https listener whose certificate comes from files)."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(UPSTREAM_HOST).configure_cert(server_ctx)
    up_ca = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(up_ca))
    async with (
        running_upstream(UPSTREAM_HOST, server_ctx) as up,
        running_service(
            tmp_path,
            egress_allow=["127.0.0.0/8"],
            upstream_ca_file=str(up_ca),
            listener_ca=listener_ca,
            **settings,
        ) as svc,
    ):
        base = {"integration_id": "http_bearer", "parameters": {"token": "tok", "base_url": up.url + "/"}}
        for cid, extra in (connections or {"c1": {}}).items():
            await svc.put_connection("t1", cid, {**base, **extra})
        key = await svc.mint_key("t1")
        async with svc.session.get(svc.url + "/ca.pem") as r:
            assert r.status == 200
            pem = await r.text()
        client_ca = tmp_path / "client-ca.pem"
        client_ca.write_text(pem + (listener_ca.read_text() if listener_ca is not None else ""))
        yield TlsSetup(svc, up, key, client_ca, tmp_path)
