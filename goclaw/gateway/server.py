"""``goclaw gateway``: one aiohttp process in front of the broker."""

from __future__ import annotations

import asyncio
import concurrent.futures

from aiohttp import web

from goclaw.broker import Broker
from goclaw.config import Config
from goclaw.gateway.auth import bearer_auth, read_token
from goclaw.gateway.health import BROKER, DB_THREAD, QUEUE, healthz

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18789


def create_app(config: Config, broker: Broker) -> web.Application:
    """The gateway's routes over ``broker``; fails closed without an auth token."""
    app = web.Application(middlewares=[bearer_auth(read_token(config.home))])
    app[BROKER] = broker
    app[QUEUE] = config.worker.queue
    app[DB_THREAD] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gateway-db")
    app.on_cleanup.append(_close_db_thread)
    app.router.add_get("/healthz", healthz)
    return app


async def _close_db_thread(app: web.Application) -> None:
    """Close the database thread's own connection, then the thread."""
    executor = app[DB_THREAD]
    await asyncio.get_running_loop().run_in_executor(executor, app[BROKER].db.close)
    executor.shutdown()


def run_gateway(config: Config, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    from goclaw.worker import open_broker

    broker = open_broker(config)
    try:
        app = create_app(config, broker)
        web.run_app(app, host=host, port=port, print=None, access_log=None)
    finally:
        broker.close()
