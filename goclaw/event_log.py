"""Reading the task event log by cursor, and retention.

Followers (the gateway's subscribers, ``goclaw submit --wait``) read a
*stream* of events from a cursor. A stream is either a session (every state
change of its tasks and every agent event, ordered by the per-session
``seq``) or one task. A session-bound task is read by ``seq`` too; a task
with no session by event id. Both cursors are commit-ordered on SQLite and
PostgreSQL: ``seq`` because taking it locks the session row until commit
(``goclaw.store.sequence``), and a session-less task's event ids because
every writer of its events first locks the task row. A reader that asks for
``cursor > N`` therefore never skips a row that commits late. The global id
is not commit-ordered on PostgreSQL, so it is never used as a cursor across
tasks.

Retention (``purge``) deletes the events of tasks that ended before a cutoff,
whole tasks at a time, and raises the watermarks ``tasks.events_purged_upto``
and ``sessions.events_purged_upto``. A replay from below a watermark is a
*gap*, reported as such, never silently shortened.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from goclaw.errors import GoclawError, TaskNotFound
from goclaw.records import EVENT_COLUMNS, TaskEvent
from goclaw.states import TERMINAL
from goclaw.store.database import Database

TERMINAL_SQL = "(" + ", ".join(f"'{s.value}'" for s in sorted(TERMINAL)) + ")"


class SessionNotFound(GoclawError):
    pass


class ReplayGap(GoclawError):
    """Events after the cursor were purged; resuming from ``purged_upto`` accepts the loss."""

    def __init__(self, stream: Stream, cursor: int, purged_upto: int) -> None:
        self.cursor = cursor
        self.purged_upto = purged_upto
        super().__init__(
            f"{stream.describe()}: events up to {purged_upto} were purged, so a replay "
            f"from {cursor} would miss some; resubscribe from {purged_upto} to continue "
            "without them"
        )


@dataclasses.dataclass(frozen=True)
class Stream:
    """What a follower reads: a session, one task of a session, or a session-less task."""

    session_key: str | None = None
    task_id: int | None = None

    @property
    def by_seq(self) -> bool:
        return self.session_key is not None

    @property
    def key(self) -> tuple[str, Any]:
        """The stream a pump reads: tasks of a session are read with their session."""
        return ("session", self.session_key) if self.by_seq else ("task", self.task_id)

    def cursor(self, event: TaskEvent) -> int:
        if self.by_seq:
            assert event.seq is not None
            return event.seq
        return event.event_id

    def wants(self, event: TaskEvent) -> bool:
        return self.task_id is None or event.task_id == self.task_id

    def describe(self) -> str:
        if self.task_id is not None:
            return f"task {self.task_id}"
        return f"session {self.session_key!r}"


def resolve(db: Database, *, session_key: str | None = None, task_id: int | None = None) -> Stream:
    """The stream for a subscription request; raises if the session or task does not exist."""
    if (session_key is None) == (task_id is None):
        raise ValueError("give a session_key or a task_id, not both")
    if task_id is not None:
        row = db.fetchone("SELECT session_key FROM tasks WHERE id = ?", (task_id,))
        if row is None:
            raise TaskNotFound(f"task {task_id} does not exist")
        return Stream(session_key=row[0], task_id=task_id)
    if db.fetchone("SELECT 1 FROM sessions WHERE key = ?", (session_key,)) is None:
        raise SessionNotFound(f"session {session_key!r} does not exist")
    return Stream(session_key=session_key)


def read(db: Database, stream: Stream, *, after: int, limit: int = 500) -> list[TaskEvent]:
    """Events of ``stream`` with a cursor above ``after``, in cursor order."""
    if stream.by_seq:
        task = " AND task_id = ?" if stream.task_id is not None else ""
        params: tuple = (stream.session_key, after)
        if stream.task_id is not None:
            params += (stream.task_id,)
        rows = db.fetchall(
            f"SELECT {EVENT_COLUMNS} FROM task_events WHERE session_key = ? AND seq > ?{task} "
            "ORDER BY seq LIMIT ?",
            (*params, limit),
        )
    else:
        rows = db.fetchall(
            f"SELECT {EVENT_COLUMNS} FROM task_events WHERE task_id = ? AND id > ? "
            "ORDER BY id LIMIT ?",
            (stream.task_id, after, limit),
        )
    return [TaskEvent.from_row(r) for r in rows]


def head(db: Database, stream: Stream) -> int:
    """The highest cursor written so far (0 for none): where a live follower starts."""
    if stream.by_seq:
        row = db.fetchone(
            "SELECT MAX(seq) FROM task_events WHERE session_key = ?", (stream.session_key,)
        )
    else:
        row = db.fetchone("SELECT MAX(id) FROM task_events WHERE task_id = ?", (stream.task_id,))
    return int(row[0] or 0) if row else 0


def check_replay(db: Database, stream: Stream, cursor: int) -> None:
    """Raise ``ReplayGap`` if events after ``cursor`` were purged."""
    if stream.by_seq:
        row = db.fetchone(
            "SELECT events_purged_upto FROM sessions WHERE key = ?", (stream.session_key,)
        )
    else:
        row = db.fetchone("SELECT events_purged_upto FROM tasks WHERE id = ?", (stream.task_id,))
    purged = int(row[0]) if row else 0
    if cursor < purged:
        raise ReplayGap(stream, cursor, purged)


@dataclasses.dataclass(frozen=True)
class Purged:
    tasks: int
    events: int

    def as_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def purge(db: Database, *, finished_before: float, batch: int = 500) -> Purged:
    """Delete the events of tasks that ended before ``finished_before``, raising the watermarks.

    Tasks, messages and model calls stay; only their event rows go. Each batch
    is one transaction, so a purge can be stopped at any point and re-run.
    """
    tasks = events = 0
    while True:
        with db.transaction():
            ids = [
                r[0]
                for r in db.fetchall(
                    "SELECT t.id FROM tasks t "
                    f"WHERE t.state IN {TERMINAL_SQL} AND t.finished_at < ? "
                    "AND EXISTS (SELECT 1 FROM task_events e WHERE e.task_id = t.id) "
                    "ORDER BY t.id LIMIT ?",
                    (finished_before, batch),
                )
            ]
            if not ids:
                return Purged(tasks, events)
            marks = ", ".join("?" * len(ids))
            # Per task and per session its events belong to (agent events carry their
            # session even when the task has none).
            rows = db.fetchall(
                "SELECT task_id, session_key, MAX(id), MAX(seq), COUNT(*) FROM task_events "
                f"WHERE task_id IN ({marks}) GROUP BY task_id, session_key",
                ids,
            )
            db.execute(f"DELETE FROM task_events WHERE task_id IN ({marks})", ids)
            task_upto: dict[int, int] = {}
            session_upto: dict[str, int] = {}
            for task_id, session, max_id, max_seq, count in rows:
                task_upto[task_id] = max(task_upto.get(task_id, 0), int(max_id))
                if session is not None and max_seq is not None:
                    session_upto[session] = max(session_upto.get(session, 0), int(max_seq))
                events += int(count)
            db.executemany(
                "UPDATE tasks SET events_purged_upto = ? WHERE id = ?",
                [(upto, task_id) for task_id, upto in sorted(task_upto.items())],
            )
            db.executemany(
                "UPDATE sessions SET events_purged_upto = ? "
                "WHERE key = ? AND events_purged_upto < ?",
                [(seq, key, seq) for key, seq in sorted(session_upto.items())],
            )
            tasks += len(ids)
