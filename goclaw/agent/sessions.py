"""Durable conversation history, per session key.

A session is an ordered list of OpenAI-shaped messages. Each message is
written once, in the transaction that produced it, tagged with the task (the
turn) that wrote it; that tag is what lets a retried turn continue from what
its crashed attempt committed instead of starting again, and what keeps a
turn's user message and final reply from being written twice.

Order is a per-session sequence number taken from the ``sessions`` row with
an ``UPDATE ... RETURNING``: it is gap-free per session, commit-ordered on
both SQLite and PostgreSQL (unlike a serial id), and the row lock it takes
serialises writers of one session. Agent events share the same sequence.

Compaction never deletes: ``sessions.summary`` stands in for every message
up to ``summary_upto``, and the history a model sees starts after it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from goclaw.records import iso
from goclaw.store.database import Database
from goclaw.store.sequence import take_session_seq


@dataclasses.dataclass(frozen=True)
class StoredMessage:
    seq: int
    task_id: int
    message: dict[str, Any]

    @property
    def role(self) -> str:
        return str(self.message.get("role"))

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "task_id": self.task_id, **self.message}


@dataclasses.dataclass(frozen=True)
class History:
    """What a turn sends the model: the summary so far and the live messages after it."""

    summary: str | None
    summary_upto: int
    messages: list[StoredMessage]

    def openai_messages(self) -> list[dict[str, Any]]:
        return [m.message for m in self.messages]


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    key: str
    agent_id: str
    messages: int
    created_at: float
    updated_at: float

    def as_json(self) -> dict[str, Any]:
        return {
            "session_key": self.key,
            "agent_id": self.agent_id,
            "messages": self.messages,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


@dataclasses.dataclass(frozen=True)
class Usage:
    model_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SessionStore:
    """Sessions, their messages, and the accounting of the model calls made for them."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # -- writing -------------------------------------------------------------

    def ensure(self, key: str, agent_id: str) -> None:
        now = self.clock()
        self.db.execute(
            "INSERT INTO sessions (key, agent_id, created_at, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (key, agent_id, now, now),
        )

    def take_seq(self, key: str, count: int = 1) -> int:
        """Reserve ``count`` sequence numbers of ``key``; return the first (in a transaction)."""
        return take_session_seq(self.db, key, count, now=self.clock())

    def append(self, key: str, task_id: int, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Write ``messages`` in order, in one transaction; return their sequence numbers."""
        if not messages:
            return []
        with self.db.transaction():
            first = self.take_seq(key, len(messages))
            now = self.clock()
            seqs = list(range(first, first + len(messages)))
            self.db.executemany(
                "INSERT INTO session_messages (session_key, seq, task_id, role, message, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (key, seq, task_id, str(m["role"]), _dumps(m), now)
                    for seq, m in zip(seqs, messages, strict=True)
                ],
            )
        return seqs

    def compact(self, key: str, *, upto: int, summary: str) -> None:
        """Let ``summary`` stand in for every message up to ``upto`` (never deletes them)."""
        self.db.execute(
            "UPDATE sessions SET summary = ?, summary_upto = ?, updated_at = ? "
            "WHERE key = ? AND summary_upto < ?",
            (summary, upto, self.clock(), key, upto),
        )

    # -- reading -------------------------------------------------------------

    def turn_messages(self, key: str, task_id: int) -> list[StoredMessage]:
        """What one turn (task) has written to the session so far, in order."""
        rows = self.db.fetchall(
            "SELECT seq, task_id, message FROM session_messages "
            "WHERE session_key = ? AND task_id = ? ORDER BY seq",
            (key, task_id),
        )
        return [_stored(r) for r in rows]

    def history(self, key: str, task_id: int) -> History:
        """The context of turn ``task_id``: earlier turns (after the summary) and its own messages.

        Messages a concurrent later turn wrote to the same session are left
        out: they are not part of the conversation this turn is answering.
        """
        row = self.db.fetchone("SELECT summary, summary_upto FROM sessions WHERE key = ?", (key,))
        if row is None:
            return History(None, 0, [])
        summary, upto = row[0], int(row[1])
        own = self.db.fetchone(
            "SELECT MIN(seq) FROM session_messages WHERE session_key = ? AND task_id = ?",
            (key, task_id),
        )
        first_own = own[0] if own and own[0] is not None else None
        if first_own is None:
            rows = self.db.fetchall(
                "SELECT seq, task_id, message FROM session_messages "
                "WHERE session_key = ? AND seq > ? ORDER BY seq",
                (key, upto),
            )
        else:
            rows = self.db.fetchall(
                "SELECT seq, task_id, message FROM session_messages "
                "WHERE session_key = ? AND seq > ? AND (seq < ? OR task_id = ?) ORDER BY seq",
                (key, upto, first_own, task_id),
            )
        return History(summary, upto, [_stored(r) for r in rows])

    def messages(self, key: str, *, after: int = 0, limit: int = 1000) -> list[StoredMessage]:
        """The full, uncompacted record of a session (for people and clients, not the model)."""
        rows = self.db.fetchall(
            "SELECT seq, task_id, message FROM session_messages "
            "WHERE session_key = ? AND seq > ? ORDER BY seq LIMIT ?",
            (key, after, limit),
        )
        return [_stored(r) for r in rows]

    def get(self, key: str) -> SessionInfo | None:
        found = self.list(key=key)
        return found[0] if found else None

    def list(self, *, key: str | None = None, limit: int = 100) -> list[SessionInfo]:
        where, params = ("WHERE s.key = ? ", [key]) if key is not None else ("", [])
        rows = self.db.fetchall(
            "SELECT s.key, s.agent_id, "
            "(SELECT COUNT(*) FROM session_messages m WHERE m.session_key = s.key), "
            f"s.created_at, s.updated_at FROM sessions s {where}"
            "ORDER BY s.updated_at DESC LIMIT ?",
            (*params, limit),
        )
        return [SessionInfo(r[0], r[1], int(r[2]), r[3], r[4]) for r in rows]

    # -- accounting ----------------------------------------------------------

    def record_model_call(
        self,
        *,
        task_id: int,
        session_key: str,
        agent_id: str,
        model: str,
        purpose: str,
        outcome: str,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost: float = 0.0,
        latency_ms: float = 0.0,
    ) -> None:
        self.db.execute(
            "INSERT INTO model_calls (task_id, session_key, agent_id, model, purpose, outcome, "
            "prompt_tokens, completion_tokens, cost, latency_ms, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                task_id,
                session_key,
                agent_id,
                model,
                purpose,
                outcome,
                prompt_tokens,
                completion_tokens,
                cost,
                latency_ms,
                self.clock(),
            ),
        )

    def usage(self, *, task_id: int | None = None, session_key: str | None = None) -> Usage:
        """Tokens and cost of one task, or of one whole session."""
        if (task_id is None) == (session_key is None):
            raise ValueError("give exactly one of task_id and session_key")
        column, value = (
            ("task_id", task_id) if task_id is not None else ("session_key", session_key)
        )
        row = self.db.fetchone(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
            "COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cost), 0) "
            f"FROM model_calls WHERE {column} = ? AND outcome = 'ok'",
            (value,),
        )
        return Usage(int(row[0]), int(row[1]), int(row[2]), float(row[3]))


def _stored(row: tuple) -> StoredMessage:
    return StoredMessage(int(row[0]), int(row[1]), json.loads(row[2]))


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)
