"""The admin API: connections, tenant API keys, tenant settings, the audit trail, the catalogue.

Admin-token only (401 without a valid credential, 403 for tenant keys and JWTs). Secrets are
write-only: every answer, list and error carries the redacted view (``vault.redacted_view``),
and validation errors name fields, never values. Every change is audited. Writes are
compare-and-set on the record version: ``If-Match: <version>`` makes a lost race a 409 instead
of a silent overwrite.

Why a package of thin modules: each handler authenticates, parses the path, query and body into
the declared input, calls the core (``proxy.vault.connections``, ``proxy.vault.tenants``,
``proxy.security.api_keys``, the store's audit query) and renders the answer; the rules live in
the core, where they need no HTTP to be used or tested. One module per resource, and ``setup``
mounts them all.
"""

from __future__ import annotations

from aiohttp import web

from proxy.web.admin import api_keys, audit, connections, integrations, store, tenants

__all__ = ["setup"]


def setup(app: web.Application) -> None:
    conn = "/admin/tenants/{tenant_id}/connections/{connection_id}"
    r = app.router
    r.add_put(conn, connections.put_connection)
    r.add_patch(conn, connections.patch_connection)
    r.add_get(conn, connections.get_connection)
    r.add_delete(conn, connections.delete_connection)
    r.add_get("/admin/tenants/{tenant_id}/connections", connections.list_connections)
    r.add_post("/admin/tenants/{tenant_id}/api-keys", api_keys.create_api_key)
    r.add_get("/admin/tenants/{tenant_id}/api-keys", api_keys.list_api_keys)
    r.add_delete("/admin/tenants/{tenant_id}/api-keys/{key_id}", api_keys.revoke_api_key)
    r.add_get("/admin/tenants/{tenant_id}/audit", audit.query_audit)
    r.add_put("/admin/tenants/{tenant_id}", tenants.put_tenant)
    r.add_get("/admin/tenants/{tenant_id}", tenants.get_tenant)
    r.add_get("/admin/integrations", integrations.list_integrations)
    r.add_post("/admin/store/accept-loss", store.accept_store_loss)
