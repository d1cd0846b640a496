"""``goclaw gateway``: one aiohttp process in front of the broker.

Routes: ``/healthz`` (public), ``/metrics``, ``/ws`` (ACP), ``/v1/models`` and
``/v1/chat/completions``. Middlewares run in order: the bearer token (401
before any work), then the rate limit (429). The event pump starts with the
app and feeds every subscriber; the one database thread serves every handler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource

from aiohttp import web

from goclaw.agent.definitions import AgentCatalog
from goclaw.broker import Broker
from goclaw.config import Config
from goclaw.gateway.acp import websocket_handler
from goclaw.gateway.auth import RedactSubprotocolTokens, bearer_auth, read_token
from goclaw.gateway.health import healthz
from goclaw.gateway.limits import rate_limit
from goclaw.gateway.metrics import metrics_handler
from goclaw.gateway.openai_api import chat_completions, list_models
from goclaw.gateway.state import STATE, GatewayState
from goclaw.skills.discovery import KnownTools

log = logging.getLogger(__name__)
# Whoever starts the app, aiohttp's WebSocket warnings never carry a subprotocol token.
logging.getLogger("aiohttp.websocket").addFilter(RedactSubprotocolTokens())


def create_app(config: Config, broker: Broker) -> web.Application:
    """The gateway's routes over ``broker``; fails closed without an auth token."""
    agents = AgentCatalog.from_config(config, os.environ, KnownTools(config))
    state = GatewayState(config, broker, agents)
    app = web.Application(
        middlewares=[bearer_auth(read_token(config.home)), rate_limit(state.limiter)],
        client_max_size=config.gateway.max_body_bytes,
    )
    app[STATE] = state
    app.on_startup.append(_start)
    app.on_cleanup.append(_close)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


async def _start(app: web.Application) -> None:
    await app[STATE].pump.start()


async def _close(app: web.Application) -> None:
    await app[STATE].close()


def raise_file_limit() -> int:
    """Lift the soft open-files limit to the hard one: each WebSocket is a descriptor, and
    the usual soft default (1,024) is below ``gateway.max_connections`` (2,000)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run_gateway(config: Config, *, host: str | None = None, port: int | None = None) -> None:
    from goclaw.worker import open_broker

    files = raise_file_limit()
    if files < config.gateway.max_connections + 64:
        log.warning(
            "open-files limit %d is below gateway.max_connections (%d) plus headroom: "
            "connections beyond it will fail; raise LimitNOFILE / ulimit -n",
            files,
            config.gateway.max_connections,
        )
    broker = open_broker(config)
    try:
        app = create_app(config, broker)
        web.run_app(
            app,
            host=host or config.gateway.host,
            port=config.gateway.port if port is None else port,
            print=None,
            access_log=None,
            shutdown_timeout=5.0,
        )
    finally:
        broker.close()
