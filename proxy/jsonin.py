"""Parsing JSON that comes from outside (callers, connect forms, OAuth providers).

``json.loads`` accepts input the rest of the service cannot live with: nesting deep enough to
raise ``RecursionError`` (in the parser, or later in any recursive walk or ``json.dumps`` of the
value), and ``NaN``/``Infinity``/``1e400``, which are not JSON (RFC 8259) and turn into floats
that break arithmetic, comparisons and re-serialisation further in. ``loads`` refuses both with
``JsonInputError`` (a ``ValueError``, so existing ``except ValueError`` handlers keep working)
whose ``reason`` is safe to show: it never quotes the input.

Pure module: no aiohttp, no redis.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

__all__ = ["MAX_DEPTH", "JsonInputError", "loads"]

# Deep enough for any real API payload or stored metadata, shallow enough that every recursive
# consumer (json.dumps, deep copies, templates) stays far from the interpreter's recursion limit.
MAX_DEPTH: Final = 64


class JsonInputError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 overflows to inf
        raise JsonInputError("a number is out of range (finite numbers only)")
    return value


def _no_constant(name: str) -> Any:
    raise JsonInputError(f"{name} is not valid JSON (finite numbers only)")


_DECODER: Final = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)


def _too_deep(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def loads(raw: str | bytes | bytearray, *, max_depth: int = MAX_DEPTH) -> Any:
    """Like ``json.loads``, refusing non-finite numbers and nesting deeper than ``max_depth``."""
    try:
        text = raw if isinstance(raw, str) else bytes(raw).decode(json.detect_encoding(raw), "surrogatepass")
        value = _DECODER.decode(text)
    except RecursionError:
        raise JsonInputError(f"nested deeper than {max_depth} levels") from None
    # Fast path: fewer opening brackets than the limit cannot nest deeper than it, whatever
    # their order; only bodies with many containers pay for the walk.
    if isinstance(value, dict | list) and (
        (raw.count("[") + raw.count("{") if isinstance(raw, str) else raw.count(b"[") + raw.count(b"{"))
        > max_depth
        and _too_deep(value, max_depth)
    ):
        raise JsonInputError(f"nested deeper than {max_depth} levels")
    return value
