"""``GET /healthz``: is the database reachable, which workers are alive, how deep the queue is.

Any database error answers 503, so a load balancer or systemd watchdog takes
the gateway out.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from goclaw.broker import Broker
from goclaw.errors import GoclawError
from goclaw.gateway.state import STATE


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        report = await state.db(_check, state.broker, state.config.worker.queue)
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
