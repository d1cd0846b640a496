"""Frozen records read from the database: tasks, events, claims, workers.

Rows become records at the store boundary so nothing above it handles raw
tuples. ``as_json()`` is the shape the CLI's ``--json`` prints.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

from goclaw.states import TaskState


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


TASK_COLUMNS = (
    "id, kind, queue, payload, state, priority, attempts, max_attempts, run_after, "
    "idempotency_key, ref, lease_owner, lease_token, lease_expires_at, error_streak, "
    "last_error, reason, result, created_at, updated_at, finished_at, session_key, "
    "events_purged_upto"
)


@dataclasses.dataclass(frozen=True)
class Task:
    id: int
    kind: str
    queue: str
    payload: str
    state: TaskState
    priority: int
    attempts: int
    max_attempts: int
    run_after: float
    idempotency_key: str | None
    ref: str | None
    lease_owner: str | None
    lease_token: int
    lease_expires_at: float | None
    error_streak: int
    last_error: str | None
    reason: str | None
    result: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    #: Agent turns: the session whose event sequence this task's state changes join.
    session_key: str | None = None
    #: The highest event id purged by retention (0: none).
    events_purged_upto: int = 0

    @classmethod
    def from_row(cls, row: tuple) -> Task:
        values = list(row)
        values[4] = TaskState(values[4])
        return cls(*values)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "queue": self.queue,
            "state": self.state.value,
            "priority": self.priority,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "args": _loads(self.payload),
            "idempotency_key": self.idempotency_key,
            "lease_owner": self.lease_owner,
            "lease_token": self.lease_token,
            "lease_expires_at": iso(self.lease_expires_at),
            "run_after": iso(self.run_after),
            "last_error": self.last_error,
            "reason": self.reason,
            "result": _loads(self.result),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "finished_at": iso(self.finished_at),
            "session_key": self.session_key,
        }


EVENT_COLUMNS = (
    "id, task_id, type, from_state, to_state, at, lease_token, worker, detail, session_key, seq"
)


@dataclasses.dataclass(frozen=True)
class TaskEvent:
    event_id: int
    task_id: int
    type: str
    from_state: str | None
    to_state: str | None
    at: float
    lease_token: int | None
    worker: str | None
    detail: str | None
    #: Agent events only: the session and its per-session sequence number.
    session_key: str | None = None
    seq: int | None = None

    @classmethod
    def from_row(cls, row: tuple) -> TaskEvent:
        return cls(*row)

    def as_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "task_id": self.task_id,
            "type": self.type,
            "from": self.from_state,
            "to": self.to_state,
            "at": iso(self.at),
            "lease_token": self.lease_token,
            "worker": self.worker,
            "detail": _loads(self.detail),
            **({"session_key": self.session_key, "seq": self.seq} if self.session_key else {}),
        }

    @property
    def data(self) -> Any:
        return _loads(self.detail)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A lease on one task, held by ``owner`` while ``token`` is current."""

    task_id: int
    token: int
    owner: str
    kind: str
    payload: str
    attempts: int
    max_attempts: int
    priority: int
    ref: str | None

    @property
    def message_id(self) -> str:
        """The id Huey knows this run by: Huey's own task id, or the task id."""
        return self.ref or str(self.task_id)


@dataclasses.dataclass(frozen=True)
class Submitted:
    task_id: int
    #: False when an idempotency key matched an existing task.
    created: bool


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    id: str
    hostname: str
    pid: int
    queue: str
    concurrency: int
    started_at: float
    heartbeat_at: float
    stopped_at: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "hostname": self.hostname,
            "pid": self.pid,
            "queue": self.queue,
            "concurrency": self.concurrency,
            "started_at": iso(self.started_at),
            "heartbeat_at": iso(self.heartbeat_at),
        }
