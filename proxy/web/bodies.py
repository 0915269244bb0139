"""Reading a JSON object body, the same way (and with the same 422) on every JSON endpoint."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy import jsonin
from proxy.errors import ValidationError

__all__ = ["read_json_object"]


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; an empty, malformed, too deeply nested or non-object body is a
    ValidationError (``proxy.jsonin`` says what is refused and why)."""
    raw = await request.read()
    try:
        body = jsonin.loads(raw) if raw.strip() else None
    except jsonin.JsonInputError as exc:
        raise ValidationError(
            f"the request body is refused: {exc.reason}; send a plain JSON object",
            fields={"body": exc.reason},
        ) from None
    except ValueError:  # UnicodeDecodeError included
        raise ValidationError(
            "the request body is not valid JSON; send a JSON object", fields={"body": "invalid JSON"}
        ) from None
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object", fields={"body": "must be an object"})
    return body
