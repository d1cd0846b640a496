"""Durations as people write them in config and on the command line: ``90s``, ``10m``, ``1d``."""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``1.5h`` or ``1d``; must be positive."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a duration (90s, 10m, 1h)")
    match = _DURATION.match(str(value).strip().lower())
    if match is None:
        raise ValueError(f"{value!r} is not a duration (90s, 10m, 1h)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{value!r} must be more than zero")
    return seconds
