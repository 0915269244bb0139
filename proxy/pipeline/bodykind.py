"""What an upstream body is, for the envelope's ``body`` field: JSON, text or binary.

Pure and import-light on purpose: for large bodies it runs in a spawned helper process (see
``proxy.web.envelope_answer``), which imports only this module.
"""

from __future__ import annotations

import json

JSON = "json"
TEXT = "text"
BINARY = "binary"


def _reject_constant(name: str) -> None:
    # NaN and Infinity are Python extensions, not JSON: a client's parser would refuse them.
    raise ValueError(name)


def classify(data: bytes | bytearray) -> str:
    """``JSON`` when the bytes are one UTF-8 JSON document (so they can be spliced verbatim
    into the envelope), ``TEXT`` when UTF-8 without NUL, else ``BINARY``."""
    try:
        text = data.decode("utf-8")  # strict: a lone surrogate or a bad byte is binary
    except UnicodeDecodeError:
        return BINARY
    try:
        json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return BINARY if "\0" in text else TEXT
    return JSON
