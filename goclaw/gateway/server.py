"""``goclaw gateway``: one aiohttp process in front of the broker."""

from __future__ import annotations

import os

from aiohttp import web

from goclaw.agent.definitions import AgentCatalog
from goclaw.agent.tools import BUILTIN_TOOLS
from goclaw.broker import Broker
from goclaw.config import Config
from goclaw.gateway.auth import bearer_auth, read_token
from goclaw.gateway.health import healthz
from goclaw.gateway.metrics import metrics_handler
from goclaw.gateway.state import STATE, GatewayState


def create_app(config: Config, broker: Broker) -> web.Application:
    """The gateway's routes over ``broker``; fails closed without an auth token."""
    app = web.Application(middlewares=[bearer_auth(read_token(config.home))])
    agents = AgentCatalog.from_config(config, os.environ, BUILTIN_TOOLS)
    state = GatewayState(config, broker, agents)
    app[STATE] = state
    app.on_cleanup.append(_close)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    return app


async def _close(app: web.Application) -> None:
    await app[STATE].close()


def run_gateway(config: Config, *, host: str | None = None, port: int | None = None) -> None:
    from goclaw.worker import open_broker

    broker = open_broker(config)
    try:
        app = create_app(config, broker)
        web.run_app(
            app,
            host=host or config.gateway.host,
            port=config.gateway.port if port is None else port,
            print=None,
            access_log=None,
        )
    finally:
        broker.close()
