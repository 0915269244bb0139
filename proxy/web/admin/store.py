"""``/admin/store/accept-loss``: the operator's way out of a detected store loss without a backup.

Why it exists: carrying on with a store that lost its data is a decision with a cost (what it
lost stays lost), so it takes an explicit ``{"confirm": true}``; the store gets a new identity
that every replica adopts, and the key ring's fingerprints are recorded again.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import ValidationError
from proxy.web.admin.common import admin_actor
from proxy.web.authn import services_of
from proxy.web.bodies import read_json_object

__all__ = ["accept_store_loss"]


async def accept_store_loss(request: web.Request) -> web.Response:
    """Carry on with the store as it is now. Every replica that opened the lost store adopts the
    new identity."""
    await admin_actor(request)
    body = await read_json_object(request)
    if body.get("confirm") is not True:
        raise ValidationError(
            "accepting the store as it is now makes every replica serve from it again, and what it "
            "lost stays lost: connections, API keys and tenant keys must be created anew. Restore "
            'the backup instead if there is one; otherwise send {"confirm": true}',
            fields={"confirm": "required: true"},
        )
    svc = services_of(request.app)
    identity = await svc.store.accept_loss()
    # Re-records the key ring's fingerprints (lost with the rest) and proves it opens what is left.
    tenants = await svc.vault.verify_keys()
    return web.json_response({"status": "accepted", "store_id": identity, "tenants": tenants})
