"""The event pump: one reader of the event log, fanned out to every subscriber.

A thousand clients following a thousand sessions must not mean a thousand
database queries per poll. A tick runs when a worker rings the events
doorbell after committing events (``goclaw.doorbell.EVENTS``), or at the
latest every ``poll_seconds`` (a ring is a hint and may be lost). Each tick,
the pump asks the database one cheap
question (which streams have rows with an id above the last one seen?), then
reads only those streams, by their commit-ordered cursor
(``goclaw.event_log``), and hands each new event, serialised once, to every
live subscriber of its stream. The whole tick is one call on the database
thread.

The id scan is only a hint of *which* streams changed. On PostgreSQL a row
with a lower id can commit after a higher one was seen, so the scan always
re-reads a trailing window of ids, and every stream is re-read once a second
regardless; what is delivered always comes from the per-stream cursor read,
which cannot skip.

A new subscriber first *replays*: it reads pages from its own cursor, each
page waiting for room in its sink, so a client far behind is paced, never
disconnected. When it has caught up with what the pump has read (each stream
keeps a ring of its recent events to close the last step without a race), it
joins the live set. A live subscriber whose sink is full is dropped from the
live set and told so (``on_overflow``) with the cursor it reached; nothing
after that cursor was delivered, so it can resume from it without loss.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from goclaw import event_log
from goclaw.doorbell import EVENTS, Doorbell, Listener
from goclaw.event_log import Stream
from goclaw.records import TaskEvent
from goclaw.store.database import Database

log = logging.getLogger(__name__)

#: Events a stream keeps after reading them, for subscribers finishing their replay.
RING_SIZE = 2048
#: Ids below the highest seen that are scanned again (late commits on PostgreSQL).
LATE_COMMIT_WINDOW = 1000
#: Every stream is re-read at least this often, whatever the scan says.
SWEEP_SECONDS = 1.0
#: Rows the change scan reads per tick before it treats every stream as changed.
SCAN_LIMIT = 5000
#: The shortest time between two ticks, however often the doorbell rings: under a stream
#: of commits each tick then takes a batch of them (a few ms of latency for far less CPU).
MIN_TICK_SECONDS = 0.01


@dataclasses.dataclass(frozen=True)
class Encoded:
    """An event serialised once, as the members of a ``session.event``'s params."""

    event: TaskEvent
    cursor: int
    members: str  # '"id":…,"task_id":…,…' (no braces, no subscription)


def encode(event: TaskEvent, cursor: int) -> Encoded:
    body = {
        "id": cursor,
        "event_id": event.event_id,
        "task_id": event.task_id,
        "session_key": event.session_key,
        "type": event.type,
        "from": event.from_state,
        "to": event.to_state,
        "at": event.at,
        "data": json.loads(event.detail) if event.detail else None,
    }
    # ASCII-escaped: whatever a stored string holds, the frame is valid UTF-8.
    text = json.dumps(body, separators=(",", ":"), default=str)
    return Encoded(event, cursor, text[1:-1])


class Sink(Protocol):
    def room(self) -> int:
        """How many events can be taken now without waiting."""

    def offer(self, subscription: Subscription, item: Encoded) -> None:
        """Take one event now (only called when ``room()`` said there is space)."""

    async def put(self, subscription: Subscription, item: Encoded) -> None:
        """Take one event, waiting for room."""


class Subscription:
    """One follower of one stream, delivering into a sink."""

    def __init__(
        self,
        id: str,
        stream: Stream,
        sink: Sink,
        *,
        on_overflow: Callable[[Subscription], None],
    ) -> None:
        self.id = id
        self.stream = stream
        self.sink = sink
        self.on_overflow = on_overflow
        #: Every event of the stream up to here was delivered (or is not this follower's).
        self.position = 0
        self.live = False
        self.closed = False
        self.attaching: asyncio.Task | None = None


class _Feed:
    """The pump's state for one stream: its cursor, its recent events, its subscribers."""

    def __init__(self, stream: Stream, cursor: int) -> None:
        self.stream = stream
        self.cursor = cursor
        #: Everything the pump read with a cursor above ``floor`` is in ``ring``.
        self.floor = cursor
        self.ring: collections.deque[Encoded] = collections.deque()
        self.live: set[Subscription] = set()
        self.members: set[Subscription] = set()

    def remember(self, item: Encoded) -> None:
        self.ring.append(item)
        if len(self.ring) > RING_SIZE:
            self.floor = self.ring.popleft().cursor


class EventPump:
    def __init__(
        self,
        db: Database,
        run_db: Callable[..., Any],
        *,
        poll_seconds: float,
        page_size: int,
        doorbell: Doorbell | None = None,
    ) -> None:
        self.db = db
        #: Rung by workers after they commit events: a tick at once, not at the next poll.
        self.doorbell = doorbell
        self._listener: Listener | None = None
        self._waiter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pump-bell")
        self.run_db = run_db  # GatewayState.db: runs a blocking call on the database thread
        self.poll_seconds = poll_seconds
        self.page_size = page_size
        self.late_window = 0 if db.is_sqlite else LATE_COMMIT_WINDOW
        self._feeds: dict[tuple[str, Any], _Feed] = {}
        self._seen_id = 0
        self._last_sweep = time.monotonic()
        self._task: asyncio.Task | None = None
        #: Ticks and events delivered, for tests and /metrics.
        self.ticks = 0
        self.delivered = 0

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Start ticking; the database is first read in the loop, so a gateway whose
        database is down still starts (and its /healthz says 503)."""
        self._task = asyncio.create_task(self._run(), name="event-pump")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # wakes a waiting thread at once
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.doorbell is not None:
            try:
                self._listener = await loop.run_in_executor(
                    self._waiter, self.doorbell.listen, self.db, EVENTS, 1
                )
            except Exception as exc:  # no doorbell: polling alone still delivers everything
                log.warning(
                    "event pump: no doorbell (%s); polling every %ss", exc, self.poll_seconds
                )
        started = False
        try:
            while True:
                began = time.monotonic()
                try:
                    if not started:
                        self._seen_id = await self.run_db(self._max_id)
                        started = True
                    await self.tick()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a database hiccup must not end streaming for good
                    log.exception("event pump: tick failed; retrying")
                    await asyncio.sleep(min(1.0, self.poll_seconds * 10))
                if self._listener is not None:
                    await loop.run_in_executor(self._waiter, self._listener.wait, self.poll_seconds)
                    rest = MIN_TICK_SECONDS - (time.monotonic() - began)
                    if rest > 0:
                        await asyncio.sleep(rest)
                else:
                    await asyncio.sleep(self.poll_seconds)
        finally:
            if self._listener is not None:
                self._listener.close()
            self._waiter.shutdown(wait=False)

    # -- subscribing ---------------------------------------------------------

    async def subscribe(self, sub: Subscription, after: int) -> None:
        """Replay ``sub`` from cursor ``after``, then keep it live; returns once it is live."""
        feed = self._feeds.get(sub.stream.key)
        if feed is None:
            cursor = await self.run_db(event_log.head, self.db, _whole(sub.stream))
            feed = self._feeds.get(sub.stream.key)  # another subscriber may have made it
            if feed is None:
                feed = self._feeds[sub.stream.key] = _Feed(_whole(sub.stream), cursor)
        feed.members.add(sub)
        sub.position = after
        try:
            await self._catch_up(feed, sub)
        except BaseException:
            self.unsubscribe(sub)
            raise

    def start_subscription(self, sub: Subscription, after: int) -> asyncio.Task:
        """``subscribe`` in a task of its own (a long replay must not block its caller)."""
        task = asyncio.create_task(self.subscribe(sub, after), name=f"subscribe-{sub.id}")
        task.add_done_callback(_log_failure)
        return task

    def unsubscribe(self, sub: Subscription) -> None:
        sub.closed = True
        feed = self._feeds.get(sub.stream.key)
        if feed is None:
            return
        feed.live.discard(sub)
        feed.members.discard(sub)
        if not feed.members:
            del self._feeds[sub.stream.key]

    async def _catch_up(self, feed: _Feed, sub: Subscription) -> None:
        while not sub.closed:
            if sub.position >= feed.floor:
                pending = [e for e in feed.ring if e.cursor > sub.position]
                wanted = [e for e in pending if sub.stream.wants(e.event)]
                if sub.sink.room() >= len(wanted):
                    # No await from here on: the pump cannot run in between.
                    for item in wanted:
                        sub.sink.offer(sub, item)
                    sub.position = max(sub.position, feed.cursor)
                    sub.live = True
                    feed.live.add(sub)
                    return
            read_to = feed.cursor
            page = await self.run_db(
                event_log.read, self.db, sub.stream, after=sub.position, limit=self.page_size
            )
            for event in page:
                if sub.closed:
                    return
                cursor = sub.stream.cursor(event)
                await sub.sink.put(sub, encode(event, cursor))
                sub.position = cursor
            if len(page) < self.page_size:
                # Everything committed when the read began is delivered, and the
                # pump had read up to ``read_to`` before it began.
                sub.position = max(sub.position, read_to)

    # -- the tick ------------------------------------------------------------

    async def tick(self) -> None:
        self.ticks += 1
        if not self._feeds:
            return
        sweep = time.monotonic() - self._last_sweep >= SWEEP_SECONDS
        if sweep:
            self._last_sweep = time.monotonic()
        wanted = {key: (feed.stream, feed.cursor) for key, feed in self._feeds.items()}
        found = await self.run_db(self._poll, wanted, sweep)
        for key, events in found.items():
            feed = self._feeds.get(key)
            if feed is None:
                continue
            for event in events:
                cursor = feed.stream.cursor(event)
                if cursor <= feed.cursor:
                    continue  # read twice across a tick boundary
                item = encode(event, cursor)
                feed.cursor = cursor
                feed.remember(item)
                self._fan_out(feed, item)

    def _fan_out(self, feed: _Feed, item: Encoded) -> None:
        for sub in list(feed.live):
            if item.cursor <= sub.position:
                continue  # the subscriber started past this point
            if sub.stream.wants(item.event):
                if sub.sink.room() < 1:
                    feed.live.discard(sub)
                    sub.live = False
                    sub.on_overflow(sub)
                    continue
                sub.sink.offer(sub, item)
                self.delivered += 1
            sub.position = item.cursor

    # -- on the database thread ----------------------------------------------

    def _max_id(self) -> int:
        row = self.db.fetchone("SELECT MAX(id) FROM task_events")
        return int(row[0] or 0) if row else 0

    def _poll(
        self, wanted: dict[tuple[str, Any], tuple[Stream, int]], sweep: bool
    ) -> dict[tuple[str, Any], list[TaskEvent]]:
        rows = self.db.fetchall(
            "SELECT id, session_key, task_id FROM task_events WHERE id > ? ORDER BY id LIMIT ?",
            (max(0, self._seen_id - self.late_window), SCAN_LIMIT),
        )
        changed: set[tuple[str, Any]] = set()
        for event_id, session_key, task_id in rows:
            if event_id > self._seen_id:
                self._seen_id = event_id
            changed.add(("session", session_key) if session_key else ("task", task_id))
        if sweep or len(rows) >= SCAN_LIMIT:
            changed = set(wanted)
        found = {}
        for key in changed & set(wanted):
            stream, cursor = wanted[key]
            events: list[TaskEvent] = []
            while True:
                page = event_log.read(self.db, stream, after=cursor, limit=self.page_size)
                events.extend(page)
                if len(page) < self.page_size:
                    break
                cursor = stream.cursor(page[-1])
            if events:
                found[key] = events
        return found


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("subscription replay failed", exc_info=task.exception())


def _whole(stream: Stream) -> Stream:
    """The stream a feed reads: a session-bound task's feed is its whole session."""
    if stream.by_seq:
        return Stream(session_key=stream.session_key)
    return stream
