"""A small ACP client for tests: a real aiohttp WebSocket over loopback.

It keeps replies and notifications apart: ``call`` sends a request and waits
for the reply with its id, while every notification read on the way is kept,
in order, in ``notifications``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from typing import Any

import aiohttp


def small_window_connector(receive_buffer: int = 8192) -> aiohttp.TCPConnector:
    """Sockets with a small, fixed receive buffer (no autotuning): a client that stops
    reading stalls the gateway's sends after kilobytes, not megabytes, so a slow-client
    test does not depend on how large the kernel lets loopback buffers grow."""

    def make(addr_info: Any) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        return sock

    return aiohttp.TCPConnector(socket_factory=make)


class AcpError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error['code']}: {error['message']}")
        self.code = error["code"]
        self.data = error.get("data") or {}
        self.error = error


class AcpClient:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.notifications: list[dict[str, Any]] = []
        self.replies: dict[Any, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    @classmethod
    async def connect(
        cls, session: aiohttp.ClientSession, url: str, token: str, **kw: Any
    ) -> AcpClient:
        ws = await session.ws_connect(
            url.replace("http://", "ws://") + "/ws",
            headers={"Authorization": f"Bearer {token}"},
            **kw,
        )
        return cls(ws)

    async def hello(self) -> dict[str, Any]:
        return await self.call("system.hello", min_version=1, max_version=1)

    async def send_raw(self, text: str) -> None:
        await self.ws.send_str(text)

    async def read(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next message, whatever it is (and file it)."""
        frame = await self.ws.receive(timeout)
        if frame.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"expected a text frame, got {frame.type!r} {frame.data!r}")
        message = json.loads(frame.data)
        if "id" in message:
            self.replies[message["id"]] = message
        else:
            self.notifications.append(message)
        return message

    async def reply(self, id: Any, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while id not in self.replies:
                await self.read(timeout)
        return self.replies.pop(id)

    async def request(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a request; return the raw reply (result or error)."""
        id = next(self._ids)
        await self.ws.send_str(
            json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
        )
        return await self.reply(id)

    async def call(self, method: str, **params: Any) -> Any:
        reply = await self.request(method, **params)
        if "error" in reply:
            raise AcpError(reply["error"])
        return reply["result"]

    async def events_until(self, predicate: Any, *, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Read until a ``session.event`` matching ``predicate`` arrives; return all events."""
        async with asyncio.timeout(timeout):
            while True:
                for note in self.notifications:
                    if note["method"] == "session.event" and predicate(note["params"]):
                        return self.events()
                await self.read(timeout)

    def events(self, subscription: str | None = None) -> list[dict[str, Any]]:
        return [
            n["params"]
            for n in self.notifications
            if n["method"] == "session.event"
            and (subscription is None or n["params"]["subscription"] == subscription)
        ]

    async def close(self) -> None:
        await self.ws.close()
