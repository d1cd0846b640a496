"""ACP: JSON-RPC 2.0 over a WebSocket at ``/ws``, one message per text frame.

A connection is two coroutines. The reader parses each frame, answers it
(``goclaw.gateway.acp_methods`` holds the methods) and never lets a bad frame
end the connection: malformed JSON, wrong types, unknown methods and
oversized frames each get their JSON-RPC error, and the next frame is read.
The writer drains the connection's ``Outbox`` into the socket.

The outbox is the bounded send queue. Replies and control messages always
fit; events count against ``gateway.send_queue_size``. A replaying
subscriber waits for room, so a client far behind is paced, never dropped. A
live subscriber that finds no room is detached and the client is sent
``system.backpressure`` with the last id it was given, *after* the events it
already has, in order; it resubscribes from that id and loses nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import socket
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from goclaw.agent.definitions import UnknownAgent
from goclaw.errors import GoclawError, IllegalTransition, TaskNotFound
from goclaw.event_log import ReplayGap, SessionNotFound, Stream
from goclaw.gateway import jsonrpc
from goclaw.gateway.acp_methods import dispatch
from goclaw.gateway.chat import QueueSaturated
from goclaw.gateway.jsonrpc import RpcError
from goclaw.gateway.limits import client_keys, origin_allowed
from goclaw.gateway.pump import Encoded, Subscription
from goclaw.gateway.responses import openai_error
from goclaw.gateway.state import STATE, GatewayState

log = logging.getLogger(__name__)

#: WebSocket frames above ``max_frame_bytes`` get a JSON-RPC error; frames of this many
#: times it or more are refused by aiohttp itself (close code 1009), so none is unbounded.
HARD_FRAME_FACTOR = 4
#: Bytes aiohttp buffers for a socket before a send waits for the client to read.
WRITER_LIMIT = 64 * 1024
#: The kernel's send buffer per WebSocket, fixed: left to autotuning it grows to 4 MiB on
#: Linux, so 2,000 slow clients could pin gigabytes, and a stalled client would be noticed
#: (and told ``system.backpressure``) only megabytes late.
SOCKET_SEND_BUFFER = 256 * 1024
#: The WebSocket subprotocol name a client may ask for.
ACP_PROTOCOL = "acp.v1"


class Outbox:
    """A connection's send queue: FIFO; events bounded, replies and control always fit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queue: collections.deque[tuple[bool, str]] = collections.deque()
        self._events = 0
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    # -- the pump's side (goclaw.gateway.pump.Sink) ---------------------------

    def room(self) -> int:
        return self.limit - self._events

    def offer(self, subscription: Subscription, item: Encoded) -> None:
        self._push(True, _event_frame(subscription.id, item))

    async def put(self, subscription: Subscription, item: Encoded) -> None:
        while self.room() < 1:
            self._room.clear()
            await self._room.wait()
        self.offer(subscription, item)

    # -- replies and control ----------------------------------------------------

    def send(self, text: str) -> None:
        self._push(False, text)

    def send_after_events(self, text: str) -> None:
        """Queue a notice that must not overtake the events queued before it (it counts
        as an event, beyond the limit)."""
        self._push(True, text)

    async def wait_below(self, backlog: int) -> None:
        """Pause a client that sends requests faster than it reads their replies."""
        while len(self._queue) > backlog:
            self._room.clear()
            await self._room.wait()

    # -- the writer's side --------------------------------------------------------

    async def next(self) -> str:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        is_event, text = self._queue.popleft()
        if is_event:
            self._events -= 1
        self._room.set()
        return text

    def _push(self, is_event: bool, text: str) -> None:
        self._queue.append((is_event, text))
        if is_event:
            self._events += 1
        self._ready.set()


def _event_frame(subscription_id: str, item: Encoded) -> str:
    return (
        '{"jsonrpc":"2.0","method":"session.event","params":{"subscription":"'
        + subscription_id
        + '",'
        + item.members
        + "}}"
    )


class Connection:
    """One ACP client: protocol state, subscriptions, and the reader/writer pair."""

    _ids = itertools.count(1)

    def __init__(self, state: GatewayState, ws: web.WebSocketResponse, request: web.Request):
        self.state = state
        self.ws = ws
        self.keys = client_keys(request)
        self.number = next(self._ids)
        self.outbox = Outbox(state.settings.send_queue_size)
        self.version: int | None = None
        self.client: dict[str, Any] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self._sub_ids = itertools.count(1)

    async def serve(self) -> None:
        writer = asyncio.create_task(self._write(), name=f"acp-writer-{self.number}")
        try:
            async for frame in self.ws:
                if frame.type == WSMsgType.TEXT:
                    await self._handle(frame.data)
                elif frame.type == WSMsgType.BINARY:
                    self.outbox.send(
                        jsonrpc.error(
                            None,
                            RpcError(
                                jsonrpc.INVALID_REQUEST, "binary frames are not accepted: send text"
                            ),
                        )
                    )
                else:  # ERROR: the socket failed; CLOSE is handled by the iterator
                    break
        finally:
            for sub in list(self.subscriptions.values()):
                self.close_subscription(sub)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await writer

    async def _write(self) -> None:
        while True:
            text = await self.outbox.next()
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return  # the reader sees the close and cleans up
            except Exception:
                # Never a silent half-open connection: close it, and the reader cleans up.
                log.exception("ACP connection %d: cannot send; closing it", self.number)
                await self.ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"send failed")
                return

    async def _handle(self, text: str) -> None:
        limit = self.state.settings.max_frame_bytes
        if len(text) > limit or len(text.encode()) > limit:
            self.reply_error(
                None,
                RpcError(
                    jsonrpc.FRAME_TOO_LARGE,
                    f"frame is over gateway.max_frame_bytes ({limit:,} bytes)",
                    {"max_bytes": limit},
                ),
            )
            return
        try:
            message = jsonrpc.parse(text)
        except jsonrpc.BadMessage as bad:
            if bad.reply:
                self.reply_error(bad.id, bad.error)
            return
        wait = self.state.limiter.spend(*self.keys)
        if wait:
            if not message.is_notification:
                self.reply_error(
                    message.id,
                    RpcError(
                        jsonrpc.RATE_LIMITED,
                        f"rate limit exceeded: retry after {wait:.2f}s",
                        {"retry_after": round(wait, 3)},
                    ),
                )
            return
        try:
            value = await dispatch(self, message)
        except RpcError as exc:
            error = exc
        except Exception as exc:  # one bad request must never end the connection
            error = rpc_error_from(exc)
            if error.code == jsonrpc.INTERNAL_ERROR:
                log.exception("ACP %s failed", message.method)
        else:
            if not message.is_notification:
                self.outbox.send(jsonrpc.result(message.id, value))
            await self.outbox.wait_below(2 * self.outbox.limit)
            return
        if not message.is_notification:
            self.reply_error(message.id, error)

    def reply_error(self, id: jsonrpc.Id, error: RpcError) -> None:
        self.outbox.send(jsonrpc.error(id, error))

    # -- subscriptions ---------------------------------------------------------------

    def new_subscription(self, stream: Stream) -> Subscription:
        sub = Subscription(
            f"s{next(self._sub_ids)}", stream, self.outbox, on_overflow=self._overflowed
        )
        self.subscriptions[sub.id] = sub
        return sub

    def watch_replay(self, sub: Subscription) -> None:
        """If ``sub``'s replay fails (the database, say), tell the client instead of going quiet."""

        def done(task: asyncio.Task) -> None:
            if task.cancelled() or task.exception() is None or sub.closed:
                return
            self.close_subscription(sub)
            error = rpc_error_from(task.exception())
            self.outbox.send_after_events(
                jsonrpc.notification(
                    "session.events.error",
                    {"subscription": sub.id, "last_event_id": sub.position, **error.as_json()},
                )
            )

        assert sub.attaching is not None
        sub.attaching.add_done_callback(done)

    def close_subscription(self, sub: Subscription) -> None:
        self.subscriptions.pop(sub.id, None)
        self.state.pump.unsubscribe(sub)
        if sub.attaching is not None and not sub.attaching.done():
            sub.attaching.cancel()

    def _overflowed(self, sub: Subscription) -> None:
        """A live subscriber's queue is full: detach it and tell the client where it stands."""
        self.state.metrics.ws_dropped()
        self.state.metrics.ws_backpressured()
        self.close_subscription(sub)
        self.outbox.send_after_events(
            jsonrpc.notification(
                "system.backpressure",
                {
                    "subscription": sub.id,
                    "last_event_id": sub.position,
                    "reason": f"send queue full ({self.outbox.limit} events)",
                    "resume": "call session.events.subscribe with from_event_id=last_event_id",
                },
            ),
        )


def rpc_error_from(exc: BaseException) -> RpcError:
    """Map library errors to ACP's error codes."""
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, QueueSaturated):
        return RpcError(jsonrpc.QUEUE_SATURATED, str(exc), exc.as_json())
    if isinstance(exc, UnknownAgent):
        return RpcError(jsonrpc.NOT_FOUND, str(exc), {"what": "agent"})
    if isinstance(exc, TaskNotFound):
        return RpcError(jsonrpc.NOT_FOUND, str(exc), {"what": "task"})
    if isinstance(exc, SessionNotFound):
        return RpcError(jsonrpc.NOT_FOUND, str(exc), {"what": "session"})
    if isinstance(exc, ReplayGap):
        return RpcError(
            jsonrpc.REPLAY_GAP, str(exc), {"cursor": exc.cursor, "purged_upto": exc.purged_upto}
        )
    if isinstance(exc, IllegalTransition):
        return RpcError(jsonrpc.CONFLICT, str(exc), {"state": str(exc.current)})
    if isinstance(exc, ValueError):
        return RpcError(jsonrpc.INVALID_PARAMS, str(exc))
    if isinstance(exc, GoclawError):
        return RpcError(jsonrpc.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
    return RpcError(jsonrpc.INTERNAL_ERROR, f"internal error ({type(exc).__name__})")


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """``GET /ws``: check the origin and the connection limit, then serve ACP."""
    state = request.app[STATE]
    settings = state.settings
    if not origin_allowed(request, settings.allowed_origins):
        return openai_error(
            403,
            f"origin {request.headers.get('Origin')!r} is not in gateway.allowed_origins",
            "forbidden",
            code="origin_not_allowed",
        )
    if state.connections >= settings.max_connections:
        return openai_error(
            503,
            f"too many connections (gateway.max_connections = {settings.max_connections})",
            "server_overloaded",
            code="too_many_connections",
            headers={"Retry-After": "1"},
        )
    ws = web.WebSocketResponse(
        protocols=(ACP_PROTOCOL,),
        max_msg_size=settings.max_frame_bytes * HARD_FRAME_FACTOR,
        heartbeat=30.0,
        writer_limit=WRITER_LIMIT,
    )
    await ws.prepare(request)
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
    state.connections += 1
    state.metrics.ws_connected()
    try:
        await Connection(state, ws, request).serve()
    finally:
        state.connections -= 1
        state.metrics.ws_disconnected()
        await ws.close()
    return ws
