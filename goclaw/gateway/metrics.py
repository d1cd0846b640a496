"""Placeholder: being written (``/metrics``, prometheus_client)."""

from __future__ import annotations

from aiohttp import web


class GatewayMetrics:
    def ws_connected(self) -> None: ...
    def ws_disconnected(self) -> None: ...
    def ws_dropped(self, count: int = 1) -> None: ...
    def ws_backpressured(self) -> None: ...


async def metrics_handler(request: web.Request) -> web.Response:
    raise web.HTTPNotImplemented()
