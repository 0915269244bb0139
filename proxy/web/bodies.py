"""Reading a JSON object body, the same way (and with the same 422) on every JSON endpoint."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from proxy.errors import ValidationError

__all__ = ["read_json_object"]


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; an empty, malformed or non-object body is a ValidationError."""
    raw = await request.read()
    try:
        body = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError):
        raise ValidationError(
            "the request body is not valid JSON; send a JSON object", fields={"body": "invalid JSON"}
        ) from None
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object", fields={"body": "must be an object"})
    return body
