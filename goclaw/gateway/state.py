"""What every gateway handler shares, under one application key.

The broker's database is blocking (sqlite3, psycopg), so every call to it
runs on one dedicated thread that owns the gateway's connection: a busy
SQLite lock stalls that thread, never the event loop serving every other
client. ``GatewayState.db`` is the one way handlers reach it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from goclaw.agent.definitions import AgentCatalog
from goclaw.approvals import Approvals
from goclaw.audit import AuditLog, audit_path
from goclaw.broker import Broker
from goclaw.config import Config
from goclaw.gateway.limits import RateLimiter
from goclaw.gateway.metrics import GatewayMetrics
from goclaw.gateway.pump import EventPump
from goclaw.policy import policy_path, watch_policy

T = TypeVar("T")


class GatewayState:
    def __init__(self, config: Config, broker: Broker, agents: AgentCatalog) -> None:
        self.config = config
        self.settings = config.gateway
        self.broker = broker
        self.agents = agents
        self.audit = AuditLog(broker.db, audit_path(config.home))
        #: Raises PolicyError for an invalid policy.yaml: the gateway does not start.
        self.policy = watch_policy(policy_path(config.home), self.audit)
        self.approvals = Approvals(broker, self.audit)
        self.metrics = GatewayMetrics()
        self.limiter = RateLimiter(
            self.settings.rate_limit_per_second, self.settings.rate_limit_burst
        )
        self.pump = EventPump(
            broker.db,
            self.db,
            poll_seconds=self.settings.poll_seconds,
            page_size=self.settings.replay_page_size,
            doorbell=broker.doorbell,
        )
        #: Open WebSocket connections.
        self.connections = 0
        self.started_at = time.time()
        self._db_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gateway-db")

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking database call on the database thread."""
        call = functools.partial(fn, *args, **kwargs) if kwargs else fn
        return await asyncio.get_running_loop().run_in_executor(
            self._db_thread, call, *(() if kwargs else args)
        )

    async def close(self) -> None:
        """Stop the pump, close the database thread's own connection, then the thread."""
        await self.pump.stop()
        await self.db(self.broker.db.close)
        self._db_thread.shutdown()


STATE = web.AppKey("goclaw_state", GatewayState)
