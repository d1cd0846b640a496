"""The per-session sequence: one counter that orders everything a conversation writes.

Messages, agent events and the state changes of a session's tasks all take
their ``seq`` from ``sessions.next_seq``. Taking it is an ``UPDATE`` of the
session row, whose lock is held until the transaction commits, so a higher
seq never becomes visible before a lower one, on PostgreSQL too, where serial
ids are not commit-ordered. A reader that follows ``seq > cursor`` therefore
never skips a row that commits late.
"""

from __future__ import annotations

import time

from goclaw.errors import GoclawError
from goclaw.store.database import Database


class UnknownSession(GoclawError, KeyError):
    """A sequence number was asked of a session that has no row."""


def take_session_seq(db: Database, key: str, count: int = 1, *, now: float | None = None) -> int:
    """Reserve ``count`` numbers of session ``key``; return the first. Call inside a transaction."""
    row = db.fetchone(
        "UPDATE sessions SET next_seq = next_seq + ?, updated_at = ? WHERE key = ? "
        "RETURNING next_seq",
        (count, time.time() if now is None else now, key),
    )
    if row is None:
        raise UnknownSession(f"session {key!r} does not exist")
    return int(row[0]) - count
