"""``GET /healthz``: is the database reachable, which workers are alive, how deep the queue is.

The database is read in a thread: a busy SQLite lock must stall this probe,
never the event loop that serves every other connection. Any database error
answers 503, so a load balancer or systemd watchdog takes the gateway out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

from aiohttp import web

from goclaw.broker import Broker
from goclaw.errors import GoclawError

BROKER = web.AppKey("broker", Broker)
#: The one thread that runs the gateway's blocking database calls (and owns its connection).
DB_THREAD = web.AppKey("db_thread", concurrent.futures.ThreadPoolExecutor)
#: The queue whose depth the probe reports (``worker.queue``).
QUEUE = web.AppKey("queue", str)


async def healthz(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    queue = request.app[QUEUE]
    try:
        report = await asyncio.get_running_loop().run_in_executor(
            request.app[DB_THREAD], _check, broker, queue
        )
    except GoclawError as exc:
        return web.json_response(
            {"status": "unavailable", "database": {"ok": False, "error": str(exc)}}, status=503
        )
    return web.json_response(report)


def _check(broker: Broker, queue: str) -> dict[str, Any]:
    broker.db.fetchone("SELECT 1")
    workers = broker.live_workers()
    return {
        "status": "ok",
        "database": {"ok": True, "url": broker.db.describe()},
        "workers": {"live": len(workers), "ids": [w.id for w in workers]},
        "queue": {"name": queue, "depth": broker.queue_depth(queue)},
    }
