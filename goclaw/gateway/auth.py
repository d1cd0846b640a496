"""Bearer-token authentication, checked before any handler runs.

The token is read once at start-up from ``$GOCLAW_HOME/auth.token`` (written
by ``goclaw init``, mode 0600). A gateway without a token does not start: an
open gateway would hand anyone on the host the queue. Comparison is in
constant time, so response timing says nothing about how much of a guess
was right.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

from aiohttp import web

from goclaw.errors import ConfigError
from goclaw.gateway.responses import openai_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Routes anyone may call: liveness probes carry no credentials.
PUBLIC_PATHS = frozenset({"/healthz"})


def read_token(home: Path) -> str:
    path = home / "auth.token"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no auth token; run `goclaw init` to create one") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the auth token: {exc.strerror}") from exc
    if len(token) < 16:
        raise ConfigError(f"{path}: the auth token must be at least 16 characters")
    return token


def presented_token(request: web.Request) -> str | None:
    """The token from ``Authorization: Bearer``, or, on a WebSocket upgrade (browsers
    cannot set headers there), from a ``bearer.<token>`` entry of Sec-WebSocket-Protocol."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return given.strip()
    if request.headers.get("Upgrade", "").lower() == "websocket":
        for protocol in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
            name, _, value = protocol.strip().partition(".")
            if name == "bearer" and value:
                return value
    return None


_SUBPROTOCOL_TOKEN = re.compile(r"bearer\.[^\s,'\"\]]+")


class RedactSubprotocolTokens(logging.Filter):
    """aiohttp logs a client's subprotocol list when none matches ours; a list holding
    ``bearer.<token>`` must not put the token in a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "bearer." in message:
            record.msg = _SUBPROTOCOL_TOKEN.sub("bearer.[REDACTED]", message)
            record.args = None
        return True


def bearer_auth(token: str, public: Collection[str] = PUBLIC_PATHS) -> Callable:
    """aiohttp middleware: 401 unless ``Authorization: Bearer <token>`` matches."""
    expected = token.encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public:
            return await handler(request)
        given = presented_token(request)
        if given is None or not hmac.compare_digest(given.encode(), expected):
            return openai_error(
                401,
                "missing or wrong bearer token",
                "unauthorized",
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="goclaw"'},
            )
        return await handler(request)

    return middleware
