"""What the gateway accepts as JSON from a client, on every surface (ACP frames, HTTP bodies).

Strict JSON: ``NaN`` and ``Infinity`` are not JSON and are refused. And text a
database can store: a NUL or an unpaired UTF-16 surrogate (both reachable only
through ``\\u`` escapes) in any string would later break a PostgreSQL query or
another client's UTF-8 reply, so a value holding one is refused before anything
is stored.
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes) -> Any:
    """``json.loads`` without the non-JSON constants (raises ``ValueError``)."""
    return json.loads(text, parse_constant=_no_constants)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def storable(value: Any) -> bool:
    """No NUL and no lone surrogate in any string (keys included) of a decoded JSON value.

    Iterative: a message nested as deep as the JSON parser allows must not overflow the
    stack here.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return False
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True
