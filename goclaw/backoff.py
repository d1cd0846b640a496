"""Retry delays: exponential, capped, with jitter.

Jitter spreads retries of tasks that failed together (a provider outage) so
they do not return as one wave. "Equal jitter" keeps at least half of the
exponential delay, so a retry never comes back almost at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def retry_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    exponential = min(cap, base * (2 ** max(attempt - 1, 0)))
    return exponential / 2 + rand() * exponential / 2
