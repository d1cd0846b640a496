"""Agent events of one run, in the task event log, ordered per session.

A client follows a run live or replays it later from the same rows:
``run.started``, ``chunk`` (token deltas), ``tool.call``, ``tool.result``,
``provider.failover``, ``compaction``, ``run.completed`` and ``run.failed``.
Each row carries its session key and a per-session sequence number taken
from the session row, so order within a session holds on PostgreSQL too,
where serial ids are not commit-ordered.

Durability is not paid per token. Token deltas are coalesced: a ``chunk``
row is written for a reply's first delta at once (time to first token is
what a user feels), then when ``coalesce_seconds`` have passed since the
last write or ``coalesce_chars`` are waiting, and before any other event, so a reader sees
deltas in order and never after the event that follows them. Each chunk
also names its ``reply`` (the n-th model reply of the run), so a client can
drop the partial text of a reply that failed over mid-stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from goclaw.agent.sessions import SessionStore
from goclaw.doorbell import EVENTS, Doorbell
from goclaw.store.database import Database

#: Every agent event type, for readers that want to tell them from state changes.
AGENT_EVENT_TYPES = (
    "run.started",
    "chunk",
    "tool.call",
    "tool.result",
    "provider.failover",
    "compaction",
    "run.completed",
    "run.failed",
)


class RunEvents:
    """The event writer of one run (one attempt of one agent task)."""

    def __init__(
        self,
        db: Database,
        sessions: SessionStore,
        *,
        task_id: int,
        session_key: str,
        worker: str | None = None,
        doorbell: Doorbell | None = None,
        coalesce_seconds: float = 0.05,
        coalesce_chars: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.sessions = sessions
        self.task_id = task_id
        self.session_key = session_key
        self.worker = worker
        self.doorbell = doorbell
        self.coalesce_seconds = coalesce_seconds
        self.coalesce_chars = coalesce_chars
        self.clock = clock
        self.wall_clock = wall_clock
        self._pending: list[str] = []
        self._pending_chars = 0
        self._pending_reply = 0
        #: The reply whose text was last written: time to first token is not coalesced.
        self._written_reply: int | None = None
        self._last_write = clock()
        #: Measured cost of durability for this run (reported in run.completed).
        self.writes = 0
        self.deltas = 0
        self.write_seconds = 0.0

    def emit(self, type: str, **data: Any) -> None:
        """Write one event now (after any pending chunk text)."""
        rows = self._take_chunk_rows()
        rows.append((type, data))
        self._write(rows)

    def chunk(self, delta: str, *, reply: int) -> None:
        """Buffer a token delta; write when enough time or text has gathered."""
        if not delta:
            return
        if self._pending and reply != self._pending_reply:
            self.flush()
        self._pending_reply = reply
        self._pending.append(delta)
        self._pending_chars += len(delta)
        self.deltas += 1
        if (
            reply != self._written_reply  # a reply's first token goes out at once
            or self._pending_chars >= self.coalesce_chars
            or self.clock() - self._last_write >= self.coalesce_seconds
        ):
            self.flush()

    def flush(self) -> None:
        rows = self._take_chunk_rows()
        if rows:
            self._write(rows)

    def stats(self) -> dict[str, Any]:
        return {
            "event_writes": self.writes,
            "deltas": self.deltas,
            "event_write_ms": round(self.write_seconds * 1000, 3),
        }

    def _take_chunk_rows(self) -> list[tuple[str, dict[str, Any]]]:
        if not self._pending:
            return []
        text = "".join(self._pending)
        self._written_reply = self._pending_reply
        self._pending.clear()
        self._pending_chars = 0
        return [("chunk", {"delta": text, "reply": self._pending_reply})]

    def _write(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        started = time.perf_counter()
        now = self.wall_clock()
        with self.db.transaction():
            first = self.sessions.take_seq(self.session_key, len(rows))
            self.db.executemany(
                "INSERT INTO task_events (task_id, type, at, worker, detail, session_key, seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        self.task_id,
                        type,
                        now,
                        self.worker,
                        json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str),
                        self.session_key,
                        first + i,
                    )
                    for i, (type, data) in enumerate(rows)
                ],
            )
            if self.doorbell is not None:
                self.doorbell.ring(self.db, EVENTS)
        self._last_write = self.clock()
        self.writes += 1
        self.write_seconds += time.perf_counter() - started
