"""What one client may ask of the gateway: request rate, body size, origins.

Rate limits are token buckets, one per bearer token and one per client IP;
a request (or an ACP frame) spends one unit from both. A client over either
gets 429 with ``Retry-After`` (a JSON-RPC ``rate_limited`` error on ACP),
and the rest of the gateway is unaffected. Buckets live in this process:
behind several gateways each enforces its own.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable

from aiohttp import web

from goclaw.gateway.auth import PUBLIC_PATHS, Handler, presented_token
from goclaw.gateway.responses import openai_error

#: Buckets untouched this long are forgotten (a full bucket is the same as none).
IDLE_FORGET_SECONDS = 300.0


class RateLimiter:
    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._last_sweep = clock()

    def spend(self, *keys: str) -> float:
        """Spend one unit from each key's bucket; 0.0 if allowed, else seconds to wait."""
        now = self.clock()
        self._sweep(now)
        levels = {}
        for key in keys:
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            levels[key] = min(float(self.burst), tokens + (now - at) * self.rate)
        short = [key for key, tokens in levels.items() if tokens < 1.0]
        if short:
            return max((1.0 - levels[key]) / self.rate for key in short)
        for key, tokens in levels.items():
            self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < IDLE_FORGET_SECONDS:
            return
        self._last_sweep = now
        stale = [k for k, (_, at) in self._buckets.items() if now - at > IDLE_FORGET_SECONDS]
        for key in stale:
            del self._buckets[key]


def client_keys(request: web.Request) -> tuple[str, str]:
    """The two buckets a request spends from: its token's and its IP's."""
    token = presented_token(request) or ""
    digest = hashlib.sha256(token.encode()).hexdigest()[:16]
    return f"token:{digest}", f"ip:{request.remote or '?'}"


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def rate_limit(limiter: RateLimiter) -> Callable:
    """aiohttp middleware (after auth): 429 in the OpenAI error shape when over the rate."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        wait = limiter.spend(*client_keys(request))
        if wait:
            return openai_error(
                429,
                f"rate limit exceeded: retry after {wait:.2f}s",
                "rate_limit_exceeded",
                code="rate_limited",
                headers={"Retry-After": retry_after_header(wait)},
            )
        return await handler(request)

    return middleware


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """Programs send no Origin; a browser's must be on the allowlist."""
    origin = request.headers.get("Origin")
    return origin is None or origin.rstrip("/") in allowed
