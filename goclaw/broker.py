"""The durable broker: the only code that changes a task's state.

Every move is a guarded update (expected from-state, plus the lease token
where one is held) and one append-only ``task_events`` row, in the same
transaction. A move the state machine forbids raises ``IllegalTransition``
before any row is touched; a guarded update that finds the row changed
underneath it is a lost race, reported as such and never a silent overwrite.

Public methods open a transaction, or join the caller's as a savepoint, so a
worker can report one task, start the next and claim more in one commit
(``with broker.transaction(): ...``). One commit per task instead of three is
what lets a durable ``synchronous=FULL`` queue keep up with a non-leasing one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from goclaw.backoff import retry_delay
from goclaw.config import BrokerSettings
from goclaw.doorbell import ANY_QUEUE, EVENTS, Doorbell
from goclaw.errors import GoclawError, IllegalTransition, TaskNotFound
from goclaw.records import (
    EVENT_COLUMNS,
    TASK_COLUMNS,
    Claim,
    Submitted,
    Task,
    TaskEvent,
    WorkerInfo,
)
from goclaw.states import CLAIMABLE, LEASED, TERMINAL, Reason, TaskState, is_allowed
from goclaw.store.database import Database
from goclaw.store.sequence import take_session_seq

S = TaskState
LEASED_SQL = "('CLAIMED', 'RUNNING')"
CLAIMABLE_SQL = "('QUEUED', 'RETRY_WAIT')"
MAX_ERROR_CHARS = 2000
#: Where positional arguments (from Huey's API) travel in a task's JSON payload.
POSITIONAL_KEY = "_args"
#: The columns a task gives up with its lease.
NO_LEASE: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a worker reports about a claim it ran."""

    status: str  # succeeded | error | permanent | canceled | released | parked
    result: Any = None
    error: str | None = None
    code: str | None = None
    #: For ``parked``: when the task becomes claimable again unless woken earlier.
    until: float | None = None

    @classmethod
    def succeeded(cls, result: Any = None) -> Outcome:
        return cls("succeeded", result=result)

    @classmethod
    def error_from(cls, exc: BaseException) -> Outcome:
        return cls("error", error=_describe(exc))

    @classmethod
    def permanent(cls, message: str, code: str = Reason.BAD_INPUT) -> Outcome:
        return cls("permanent", error=message, code=code)

    @classmethod
    def canceled(cls, message: str = "canceled by the task") -> Outcome:
        return cls("canceled", error=message)

    @classmethod
    def parked(cls, message: str, until: float) -> Outcome:
        return cls("parked", error=message, until=until)

    @classmethod
    def released(cls, message: str = "worker shut down before the task finished") -> Outcome:
        return cls("released", error=message)


@dataclasses.dataclass(frozen=True)
class Reported:
    accepted: bool
    state: TaskState
    detail: str = ""


class Broker:
    """Task lifecycle operations over one database."""

    def __init__(
        self,
        db: Database,
        settings: BrokerSettings,
        *,
        doorbell: Doorbell | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.db = db
        self.settings = settings
        self.doorbell = doorbell or Doorbell.for_database(db)
        self.clock = clock
        self.rand = rand
        self._for_update = "" if db.is_sqlite else " FOR UPDATE"
        self._local = _TransactionState()

    def close(self) -> None:
        self.doorbell.close()
        self.db.close()

    # -- transactions --------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One commit for everything inside; nested calls join it.

        Events are buffered and written with one statement just before the
        commit, so a worker's report + start + claim costs one insert, not three.
        """
        if self._local.events is not None:
            yield
            return
        self._local.events = []
        try:
            with self.db.transaction():
                yield
                self._write_events(self._local.events)
        finally:
            self._local.events = None

    # -- submitting ----------------------------------------------------------

    def submit(
        self,
        kind: str,
        args: Mapping[str, Any] | None = None,
        *,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        delay: float = 0.0,
        count: int = 1,
        ref: str | None = None,
        session_key: str | None = None,
        now: float | None = None,
    ) -> list[Submitted]:
        """Queue ``count`` identical tasks in one transaction.

        With an idempotency key, a repeat returns the task(s) it created the
        first time instead of adding new ones; under ``count > 1`` the key of
        the i-th task is ``KEY/i``. With a ``session_key`` (whose ``sessions``
        row must exist) the task's state changes join that session's event
        sequence.
        """
        if not kind:
            raise ValueError("a task needs a kind")
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        attempts = self.settings.max_attempts if max_attempts is None else max_attempts
        if attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {attempts}")
        payload = encode_payload(args)
        limit = self.settings.max_payload_bytes
        size = len(payload.encode())
        if size > limit:
            raise ValueError(
                f"task arguments are {size:,} bytes of JSON, over "
                f"broker.max_payload_bytes ({limit:,}): pass a reference (a path, a URL), "
                "not the data"
            )
        now = self.clock() if now is None else now
        run_after = now + max(delay, 0.0)
        keys: list[str | None]
        if idempotency_key is None:
            keys = [None] * count
        elif count == 1:
            keys = [idempotency_key]
        else:
            keys = [f"{idempotency_key}/{i}" for i in range(count)]
        submitted: list[Submitted] = []
        events = []
        with self.transaction():
            for key in keys:
                row = self.db.fetchone(
                    "INSERT INTO tasks (kind, queue, payload, state, priority, max_attempts, "
                    "run_after, idempotency_key, ref, session_key, created_at, updated_at) "
                    "VALUES (?, ?, ?, 'QUEUED', ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING RETURNING id",
                    (
                        kind,
                        queue,
                        payload,
                        priority,
                        attempts,
                        run_after,
                        key,
                        ref,
                        session_key,
                        now,
                        now,
                    ),
                )
                if row is not None:
                    submitted.append(Submitted(row[0], True))
                    events.append(
                        (
                            row[0],
                            "task.submitted",
                            None,
                            S.QUEUED,
                            now,
                            None,
                            None,
                            None,
                            session_key,
                        )
                    )
                    continue
                existing = self.db.fetchone(
                    "SELECT id FROM tasks WHERE idempotency_key = ? OR ref = ?", (key, ref)
                )
                if existing is None:  # pragma: no cover - a conflict implies a row
                    raise GoclawError(f"submit: key {key!r} conflicted, yet no task holds it")
                submitted.append(Submitted(existing[0], False))
            self._insert_events(events)
            if events:
                self.doorbell.ring(self.db, queue)
        return submitted

    # -- the worker's side ---------------------------------------------------

    def claim(
        self,
        owner: str,
        *,
        queue: str = "default",
        limit: int = 1,
        now: float | None = None,
    ) -> list[Claim]:
        """Lease up to ``limit`` due tasks, highest priority first, FIFO within it."""
        now = self.clock() if now is None else now
        expires = now + self.settings.lease_seconds
        with self.transaction():
            if self.db.is_sqlite:
                # The transaction already holds SQLite's write lock: select,
                # then update exactly the rows seen.
                # INDEXED BY: left alone, the planner range-scans run_after and
                # sorts every waiting task (0.9 ms a claim at 2,000 waiting).
                picked = self.db.fetchall(
                    "SELECT id, state FROM tasks INDEXED BY tasks_claim_order "
                    f"WHERE queue = ? AND state IN {CLAIMABLE_SQL} AND run_after <= ? "
                    "ORDER BY priority DESC, run_after, id LIMIT ?",
                    (queue, now, limit),
                )
                if not picked:
                    return []
                previous = dict(picked)
                marks = ", ".join("?" * len(picked))
                rows = self.db.fetchall(
                    "UPDATE tasks SET state = 'CLAIMED', lease_owner = ?, "
                    "lease_token = lease_token + 1, lease_expires_at = ?, "
                    "attempts = attempts + 1, updated_at = ? "
                    f"WHERE id IN ({marks}) AND state IN {CLAIMABLE_SQL} "
                    "RETURNING id, lease_token, kind, payload, attempts, max_attempts, "
                    "priority, ref, session_key",
                    (owner, expires, now, *previous),
                )
                # RETURNING order is unspecified: restore the claim order.
                order = {task_id: i for i, (task_id, _) in enumerate(picked)}
                rows = sorted(
                    ((r[0], previous[r[0]], *r[1:]) for r in rows), key=lambda r: order[r[0]]
                )
            else:
                rows = self.db.fetchall(
                    "UPDATE tasks AS t SET state = 'CLAIMED', lease_owner = ?, "
                    "lease_token = t.lease_token + 1, lease_expires_at = ?, "
                    "attempts = t.attempts + 1, updated_at = ? "
                    "FROM (SELECT id, state FROM tasks "
                    f"  WHERE queue = ? AND state IN {CLAIMABLE_SQL} AND run_after <= ? "
                    "  ORDER BY priority DESC, run_after, id LIMIT ? FOR UPDATE SKIP LOCKED) AS c "
                    "WHERE t.id = c.id RETURNING t.id, c.state, t.lease_token, t.kind, "
                    "t.payload, t.attempts, t.max_attempts, t.priority, t.ref, t.session_key, "
                    "t.run_after",
                    (owner, expires, now, queue, now, limit),
                )
                # RETURNING order is unspecified: restore the claim order.
                rows.sort(key=lambda r: (-r[7], r[10], r[0]))
            self._insert_events(
                [
                    (r[0], "task.claimed", r[1], S.CLAIMED, now, r[2], owner, None, r[9])
                    for r in rows
                ]
            )
        return [
            Claim(
                task_id=r[0],
                token=r[2],
                owner=owner,
                kind=r[3],
                payload=r[4],
                attempts=r[5],
                max_attempts=r[6],
                priority=r[7],
                ref=r[8],
            )
            for r in rows
        ]

    def start(self, claim: Claim, *, now: float | None = None) -> bool:
        """CLAIMED -> RUNNING; False when the lease was lost before the start."""
        now = self.clock() if now is None else now
        with self.transaction():
            moved = self._move(
                claim.task_id,
                S.CLAIMED,
                S.RUNNING,
                "task.started",
                token=claim.token,
                worker=claim.owner,
                now=now,
            )
            if not moved:
                self._reject(claim, "start", now)
        return moved

    def report(self, claim: Claim, outcome: Outcome, *, now: float | None = None) -> Reported:
        """Record how a claimed task ended, unless its lease is no longer held.

        A report under a lost lease (expired and re-claimed, canceled, or a
        stale token) is rejected and recorded as a ``report.rejected`` event:
        this is the zombie fencing.
        """
        now = self.clock() if now is None else now
        with self.transaction():
            if outcome.status == "succeeded" and self._move(
                claim.task_id,
                S.RUNNING,
                S.SUCCEEDED,
                "task.succeeded",
                token=claim.token,
                worker=claim.owner,
                sets=self._succeeded_sets(outcome, now),
                now=now,
            ):
                # The common case needs no read: the guard is the lease check.
                return Reported(True, S.SUCCEEDED)
            row = self.db.fetchone(
                "SELECT state, lease_token, attempts, max_attempts, error_streak, last_error "
                f"FROM tasks WHERE id = ?{self._for_update}",
                (claim.task_id,),
            )
            if row is None:
                raise TaskNotFound(f"task {claim.task_id} does not exist")
            state, token, attempts, max_attempts, streak, last_error = row
            if state not in LEASED or token != claim.token:
                why = self._reject(claim, outcome.status, now, state=state, token=token)
                return Reported(False, S(state), why)
            target, sets, event_type = self._outcome_target(
                S(state), outcome, attempts, max_attempts, streak, last_error, now
            )
            self._move(
                claim.task_id,
                S(state),
                target,
                event_type,
                token=claim.token,
                worker=claim.owner,
                sets=sets,
                now=now,
                detail=_detail(outcome, sets),
            )
            if target in CLAIMABLE:
                # Waiting workers recompute when the next task falls due.
                self.doorbell.ring(self.db, ANY_QUEUE)
        return Reported(True, target)

    def _outcome_target(
        self,
        state: TaskState,
        outcome: Outcome,
        attempts: int,
        max_attempts: int,
        streak: int,
        last_error: str | None,
        now: float,
    ) -> tuple[TaskState, dict[str, Any], str]:
        done = {**NO_LEASE, "finished_at": now}
        if outcome.status == "succeeded":
            return S.SUCCEEDED, self._succeeded_sets(outcome, now), "task.succeeded"
        error = (outcome.error or "")[:MAX_ERROR_CHARS]
        if outcome.status == "permanent":
            sets = {**done, "last_error": error, "reason": outcome.code or Reason.BAD_INPUT}
            return S.FAILED, sets, "task.failed"
        if outcome.status == "canceled":
            return (
                S.CANCELED,
                {**done, "last_error": error, "reason": Reason.CANCELED},
                ("task.canceled"),
            )
        if outcome.status == "released":
            # Interrupted by a shutdown: the attempt did not really happen.
            sets = {**NO_LEASE, "attempts": max(attempts - 1, 0), "run_after": now}
            return S.QUEUED, sets, "task.released"
        if outcome.status == "parked":
            # Waiting on the world (an approval), not failing: the attempt is given back
            # and the error streak is left alone.
            until = now if outcome.until is None else max(outcome.until, now)
            sets = {**NO_LEASE, "attempts": max(attempts - 1, 0), "run_after": until}
            return S.RETRY_WAIT, sets, "task.parked"
        if outcome.status != "error":
            raise ValueError(f"unknown outcome status {outcome.status!r}")
        streak = streak + 1 if error == last_error else 1
        sets = {"last_error": error, "error_streak": streak}
        if streak >= self.settings.poison_pill_threshold:
            return (
                S.DEAD_LETTER,
                {**sets, **done, "reason": Reason.POISON_PILL},
                "task.dead_lettered",
            )
        if attempts >= max_attempts:
            sets = {**sets, **done, "reason": Reason.RETRIES_EXHAUSTED}
            return S.DEAD_LETTER, sets, "task.dead_lettered"
        wait = retry_delay(
            attempts,
            base=self.settings.retry_base_seconds,
            cap=self.settings.retry_max_seconds,
            rand=self.rand,
        )
        sets = {**sets, **NO_LEASE, "run_after": now + wait}
        return S.RETRY_WAIT, sets, "task.retry_scheduled"

    @staticmethod
    def _succeeded_sets(outcome: Outcome, now: float) -> dict[str, Any]:
        return {**NO_LEASE, "finished_at": now, "result": encode_result(outcome.result)}

    def renew(self, owner: str, claims: Sequence[Claim], *, now: float | None = None) -> list[int]:
        """Extend the leases of ``claims``; return the ids whose lease is gone."""
        now = self.clock() if now is None else now
        expires = now + self.settings.lease_seconds
        lost = []
        with self.transaction():
            for claim in claims:
                cursor = self.db.execute(
                    "UPDATE tasks SET lease_expires_at = ? "
                    f"WHERE id = ? AND lease_token = ? AND state IN {LEASED_SQL}",
                    (expires, claim.task_id, claim.token),
                )
                if cursor.rowcount != 1:
                    lost.append(claim.task_id)
        return lost

    def canceled_among(self, task_ids: Sequence[int]) -> list[int]:
        """Which of these (running) tasks have been canceled since they were claimed."""
        if not task_ids:
            return []
        marks = ", ".join("?" * len(task_ids))
        rows = self.db.fetchall(
            f"SELECT id FROM tasks WHERE id IN ({marks}) AND state = 'CANCELED'", tuple(task_ids)
        )
        return [r[0] for r in rows]

    def wake(self, task_id: int, *, why: str, now: float | None = None) -> bool:
        """Make a parked (RETRY_WAIT) task claimable now; False if it is not waiting.

        Not a state change, so it is logged as a ``task.woken`` event from
        RETRY_WAIT to itself. Waiting workers are rung to claim it.
        """
        now = self.clock() if now is None else now
        with self.transaction():
            row = self.db.fetchone(
                "UPDATE tasks SET run_after = ?, updated_at = ? "
                "WHERE id = ? AND state = 'RETRY_WAIT' AND run_after > ? RETURNING id",
                (now, now, task_id, now),
            )
            if row is None:
                return False
            self.note(task_id, "task.woken", {"why": why}, now=now)
            self.doorbell.ring(self.db, ANY_QUEUE)
        return True

    def note(
        self,
        task_id: int,
        event_type: str,
        detail: Mapping[str, Any] | None = None,
        *,
        now: float | None = None,
    ) -> None:
        """Append an event about a task that does not change its state.

        It is written from and to the task's current state, in the caller's
        transaction, and joins the task's session stream when it has one.
        """
        now = self.clock() if now is None else now
        with self.transaction():
            row = self.db.fetchone("SELECT state, session_key FROM tasks WHERE id = ?", (task_id,))
            if row is None:
                raise TaskNotFound(f"task {task_id} does not exist")
            state = S(row[0])
            self._insert_events(
                [(task_id, event_type, state, state, now, None, None, _json(detail), row[1])]
            )

    def next_due(self, queue: str) -> float | None:
        """When the earliest waiting task of ``queue`` becomes claimable."""
        row = self.db.fetchone(
            f"SELECT MIN(run_after) FROM tasks WHERE queue = ? AND state IN {CLAIMABLE_SQL}",
            (queue,),
        )
        return None if row is None else row[0]

    # -- operators -----------------------------------------------------------

    def cancel(self, task_id: int, *, reason: str = "", now: float | None = None) -> Task:
        """Cancel from any non-terminal state; a running worker sees it at its next check."""
        now = self.clock() if now is None else now
        with self.transaction():
            task = self._locked_task(task_id)
            if task.state in TERMINAL:
                raise IllegalTransition(task_id, task.state, S.CANCELED, "the task already ended")
            self._move(
                task_id,
                task.state,
                S.CANCELED,
                "task.canceled",
                sets={**NO_LEASE, "finished_at": now, "reason": Reason.CANCELED},
                now=now,
                detail={"reason": reason} if reason else None,
            )
            return self.get(task_id)  # as this transaction left it

    def retry(self, task_id: int, *, now: float | None = None) -> Task:
        """Re-queue a FAILED or DEAD_LETTER task with a fresh set of attempts."""
        now = self.clock() if now is None else now
        with self.transaction():
            task = self._locked_task(task_id)
            if task.state not in (S.FAILED, S.DEAD_LETTER):
                raise IllegalTransition(
                    task_id, task.state, S.QUEUED, "only FAILED or DEAD_LETTER tasks are retried"
                )
            self._move(
                task_id,
                task.state,
                S.QUEUED,
                "task.requeued",
                sets={
                    "attempts": 0,
                    "error_streak": 0,
                    "reason": None,
                    "run_after": now,
                    "finished_at": None,
                },
                now=now,
                detail={"previous_reason": task.reason, "previous_attempts": task.attempts},
            )
            self.doorbell.ring(self.db, task.queue)
            return self.get(task_id)  # as this transaction left it, not as a worker has since

    # -- the reaper ----------------------------------------------------------

    def try_lead(self, role: str, owner: str, *, ttl: float, now: float | None = None) -> bool:
        """Take or keep the named role until ``now + ttl``; True if ``owner`` holds it."""
        now = self.clock() if now is None else now
        with self.transaction():
            self.db.execute(
                "INSERT INTO leaders (role, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (role) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at "
                "WHERE leaders.owner = excluded.owner OR leaders.expires_at < ?",
                (role, owner, now + ttl, now),
            )
            row = self.db.fetchone("SELECT owner FROM leaders WHERE role = ?", (role,))
        return row is not None and row[0] == owner

    def reap(self, *, now: float | None = None, limit: int = 500) -> list[int]:
        """Return tasks whose lease expired to the queue, or dead-letter them.

        A task whose attempts are used up by crashes goes to DEAD_LETTER with
        ``lease_expired``: a task that kills its worker every time must not
        be retried forever.
        """
        now = self.clock() if now is None else now
        skip = "" if self.db.is_sqlite else " FOR UPDATE SKIP LOCKED"
        reaped = []
        with self.transaction():
            rows = self.db.fetchall(
                "SELECT id, state, lease_token, lease_owner, attempts, max_attempts FROM tasks "
                f"WHERE state IN {LEASED_SQL} AND lease_expires_at < ? "
                f"ORDER BY lease_expires_at LIMIT ?{skip}",
                (now, limit),
            )
            for task_id, state, token, owner, attempts, max_attempts in rows:
                detail = {"owner": owner, "attempts": attempts}
                if attempts >= max_attempts:
                    target = S.DEAD_LETTER
                    sets = {"reason": Reason.LEASE_EXPIRED, "finished_at": now}
                else:
                    target, sets = S.QUEUED, {"run_after": now}
                self._move(
                    task_id,
                    S(state),
                    target,
                    "lease.expired",
                    token=token,
                    sets={**sets, **NO_LEASE},
                    now=now,
                    detail=detail,
                )
                reaped.append(task_id)
            if reaped:
                self.doorbell.ring(self.db, ANY_QUEUE)
        return reaped

    # -- workers -------------------------------------------------------------

    def register_worker(
        self, worker_id: str, *, hostname: str, pid: int, queue: str, concurrency: int
    ) -> None:
        now = self.clock()
        with self.transaction():
            self.db.execute(
                "INSERT INTO workers (id, hostname, pid, queue, concurrency, started_at, "
                "heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (worker_id, hostname, pid, queue, concurrency, now, now),
            )

    def worker_heartbeat(self, worker_id: str, *, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        with self.transaction():
            self.db.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (now, worker_id))

    def worker_stopped(self, worker_id: str) -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE workers SET stopped_at = ? WHERE id = ?", (self.clock(), worker_id)
            )

    def live_workers(self, *, now: float | None = None) -> list[WorkerInfo]:
        now = self.clock() if now is None else now
        horizon = now - 3 * self.settings.heartbeat_seconds
        rows = self.db.fetchall(
            "SELECT id, hostname, pid, queue, concurrency, started_at, heartbeat_at, stopped_at "
            "FROM workers WHERE stopped_at IS NULL AND heartbeat_at >= ? ORDER BY started_at",
            (horizon,),
        )
        return [WorkerInfo(*r) for r in rows]

    # -- reading -------------------------------------------------------------

    def get(self, task_id: int) -> Task:
        row = self.db.fetchone(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,))
        if row is None:
            raise TaskNotFound(f"task {task_id} does not exist")
        return Task.from_row(row)

    def events(
        self, task_id: int | None = None, *, after: int = 0, limit: int = 1000
    ) -> list[TaskEvent]:
        if task_id is None:
            rows = self.db.fetchall(
                f"SELECT {EVENT_COLUMNS} FROM task_events WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            )
        else:
            rows = self.db.fetchall(
                f"SELECT {EVENT_COLUMNS} FROM task_events WHERE task_id = ? AND id > ? "
                "ORDER BY id LIMIT ?",
                (task_id, after, limit),
            )
        return [TaskEvent.from_row(r) for r in rows]

    def tasks(
        self, *, state: TaskState | str | None = None, limit: int = 100, kind: str | None = None
    ) -> list[Task]:
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(S(state).value)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self.db.fetchall(
            f"SELECT {TASK_COLUMNS} FROM tasks {clause}ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [Task.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self.db.fetchall("SELECT state, COUNT(*) FROM tasks GROUP BY state")
        found = dict(rows)
        return {s.value: int(found.get(s.value, 0)) for s in TaskState}

    def queue_depth(self, queue: str) -> int:
        """Tasks of ``queue`` waiting to be claimed (QUEUED or RETRY_WAIT)."""
        row = self.db.fetchone(
            f"SELECT COUNT(*) FROM tasks WHERE queue = ? AND state IN {CLAIMABLE_SQL}", (queue,)
        )
        return int(row[0])

    def expired_leases(self, *, now: float | None = None) -> int:
        now = self.clock() if now is None else now
        row = self.db.fetchone(
            f"SELECT COUNT(*) FROM tasks WHERE state IN {LEASED_SQL} AND lease_expires_at < ?",
            (now,),
        )
        return int(row[0])

    # -- internals -----------------------------------------------------------

    def _locked_task(self, task_id: int) -> Task:
        row = self.db.fetchone(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?{self._for_update}", (task_id,)
        )
        if row is None:
            raise TaskNotFound(f"task {task_id} does not exist")
        return Task.from_row(row)

    def _move(
        self,
        task_id: int,
        current: TaskState,
        target: TaskState,
        event_type: str,
        *,
        token: int | None = None,
        worker: str | None = None,
        sets: Mapping[str, Any] | None = None,
        now: float,
        detail: Mapping[str, Any] | None = None,
    ) -> bool:
        """The one guarded transition: update if still in ``current`` (and token), log it."""
        if not is_allowed(current, target):
            raise IllegalTransition(task_id, current, target)
        columns = {"state": target.value, "updated_at": now, **(sets or {})}
        assignments = ", ".join(f"{name} = ?" for name in columns)
        guard = "id = ? AND state = ?"
        params: list[Any] = [*columns.values(), task_id, current.value]
        if token is not None:
            guard += " AND lease_token = ?"
            params.append(token)
        row = self.db.fetchone(
            f"UPDATE tasks SET {assignments} WHERE {guard} RETURNING session_key", params
        )
        if row is None:
            return False
        self._insert_events(
            [(task_id, event_type, current, target, now, token, worker, _json(detail), row[0])]
        )
        return True

    def _reject(
        self,
        claim: Claim,
        what: str,
        now: float,
        *,
        state: str | None = None,
        token: int | None = None,
    ) -> str:
        if state is None:
            row = self.db.fetchone(
                "SELECT state, lease_token FROM tasks WHERE id = ?", (claim.task_id,)
            )
            state, token = row if row else ("?", None)
        if token != claim.token:
            why = f"lease token {claim.token} was superseded by {token}"
        else:
            why = f"the task is {state}, no longer leased"
        self._insert_events(
            [
                (
                    claim.task_id,
                    "report.rejected",
                    state,
                    state,
                    now,
                    claim.token,
                    claim.owner,
                    _json({"report": what, "why": why}),
                    None,  # diagnostics, not part of a session's stream
                )
            ]
        )
        return why

    def _insert_events(self, rows: Sequence[tuple]) -> None:
        """Queue event rows for the current transaction (see ``transaction``)."""
        if self._local.events is None:  # pragma: no cover - every writer holds a transaction
            raise RuntimeError("events are written inside Broker.transaction() only")
        self._local.events.extend(rows)

    def _write_events(self, rows: Sequence[tuple]) -> None:
        """Insert the transaction's events; those of session-bound tasks take session seqs.

        The seqs are taken last, just before the commit, sessions in sorted
        order: the session row lock is held for as short a time as possible and
        always after any task row lock, so writers cannot deadlock. Holding it
        to the commit is what makes seq commit-ordered on PostgreSQL.
        """
        if not rows:
            return
        wanted: dict[str, int] = {}
        for row in rows:
            if row[8] is not None:
                wanted[row[8]] = wanted.get(row[8], 0) + 1
        next_seq = {key: take_session_seq(self.db, key, wanted[key]) for key in sorted(wanted)}
        values = []
        for r in rows:
            seq = None
            if r[8] is not None:
                seq = next_seq[r[8]]
                next_seq[r[8]] += 1
            from_state = None if r[2] is None else str(r[2])
            values.append((r[0], r[1], from_state, str(r[3]), *r[4:8], r[8], seq))
        self.db.executemany(
            "INSERT INTO task_events (task_id, type, from_state, to_state, at, lease_token, "
            "worker, detail, session_key, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )
        if wanted:  # someone may follow these sessions: wake the gateway now
            self.doorbell.ring(self.db, EVENTS)


class _TransactionState(threading.local):
    #: Event rows waiting for the current transaction's commit; None outside one.
    events: list[tuple] | None = None


def encode_payload(args: Mapping[str, Any] | None) -> str:
    """Task arguments are a JSON object: inspectable, portable, never pickled."""
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ValueError(f"task arguments must be a mapping, got {type(args).__name__}")
    try:
        return json.dumps(dict(args), separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"task arguments must be JSON-serialisable: {exc}") from exc


def decode_payload(payload: str) -> tuple[list[Any], dict[str, Any]]:
    """Decode a task's JSON payload into positional and keyword arguments."""
    try:
        data = json.loads(payload)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"payload must be a JSON object, got {type(data).__name__}")
    args = data.pop(POSITIONAL_KEY, [])
    if not isinstance(args, list):
        raise ValueError(f"payload key {POSITIONAL_KEY!r} must be a list")
    return args, data


def encode_result(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps({"repr": repr(value)[:MAX_ERROR_CHARS]})


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _detail(outcome: Outcome, sets: Mapping[str, Any]) -> dict[str, Any] | None:
    detail: dict[str, Any] = {}
    if outcome.error:
        detail["error"] = outcome.error[:MAX_ERROR_CHARS]
    if sets.get("reason"):
        detail["reason"] = str(sets["reason"])
    if "run_after" in sets and outcome.status in ("error", "parked"):
        detail["retry_at"] = sets["run_after"]
    return detail or None


def _json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), default=str)


__all__ = ["Broker", "Outcome", "Reported", "decode_payload", "encode_payload"]
