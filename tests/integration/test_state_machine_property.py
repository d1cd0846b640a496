"""Random operation sequences against a real broker, checked against a pure-Python model.

A hypothesis ``RuleBasedStateMachine`` submits tasks (with and without idempotency
keys), claims them as one of two workers, starts them, reports every kind of outcome
(also under stale claims), renews leases, cancels, retries and reaps while a fake clock
advances far enough for leases and retry delays to run out. A small model written
from the documented lifecycle, not from ``goclaw.states``, predicts each step: which
task a claim gets, whether a report is accepted, rejected or illegal, the next state,
attempts, lease token, error streak, reason, due time, and the exact events logged.

After every step the invariants check that the database matches the model for every
task, that every task's event chain is continuous (it starts with ``task.submitted``
into QUEUED, each event leaves from where the previous one arrived, rejections stay
put, and the last event arrives at the row's state), that no move outside the model's
edge table was ever logged, that at most one report is accepted per lease token, and
that ``counts``, ``queue_depth`` and ``expired_leases`` agree with the model.

It runs on a fresh SQLite file per example and, when PostgreSQL is available, on one
PostgreSQL schema emptied per example. Examples are derandomized so a run is
reproducible; raise ``max_examples`` or drop ``derandomize`` to search harder.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import shutil
import tempfile
import urllib.parse
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from goclaw.broker import Broker, Outcome
from goclaw.config import BrokerSettings
from goclaw.errors import IllegalTransition
from goclaw.store.database import Database
from goclaw.store.migrations import migrate
from tests.conftest import PG_URL, require_postgres

# -- the model ------------------------------------------------------------------

QUEUED, CLAIMED, RUNNING, RETRY_WAIT = "QUEUED", "CLAIMED", "RUNNING", "RETRY_WAIT"
SUCCEEDED, FAILED, CANCELED, DEAD_LETTER = "SUCCEEDED", "FAILED", "CANCELED", "DEAD_LETTER"
STATES = (QUEUED, CLAIMED, RUNNING, RETRY_WAIT, SUCCEEDED, FAILED, CANCELED, DEAD_LETTER)

#: The lifecycle as documented, written out here so a wrong ``ALLOWED`` table is caught.
MOVES = {
    QUEUED: {CLAIMED, CANCELED},
    CLAIMED: {RUNNING, QUEUED, FAILED, CANCELED, DEAD_LETTER},
    RUNNING: {SUCCEEDED, RETRY_WAIT, FAILED, DEAD_LETTER, QUEUED, CANCELED},
    RETRY_WAIT: {CLAIMED, CANCELED},
    SUCCEEDED: set(),
    FAILED: {QUEUED},
    CANCELED: set(),
    DEAD_LETTER: {QUEUED},
}
ENDED = {SUCCEEDED, FAILED, CANCELED, DEAD_LETTER}
HELD = {CLAIMED, RUNNING}
WAITING = {QUEUED, RETRY_WAIT}
#: Event types that record an accepted report (one per lease token at most).
REPORT_EVENTS = {
    "task.succeeded",
    "task.failed",
    "task.retry_scheduled",
    "task.dead_lettered",
    "task.released",
}

#: What a ``report.rejected`` event's detail may name: a start or an outcome's status.
REJECTABLE = {"start", "succeeded", "error", "permanent", "canceled", "released"}

T0 = 1_700_000_000.0
#: Short leases and delays against clock steps of 0.5-3.5 s: leases run out and
#: retries fall due within a few steps. Every time is an exact binary fraction.
SETTINGS = BrokerSettings(
    lease_seconds=3.0,
    heartbeat_seconds=1.0,
    max_attempts=3,
    poison_pill_threshold=2,
    retry_base_seconds=0.5,
    retry_max_seconds=2.0,
)
JITTER = 0.5
OWNERS = ("w1", "w2")
ERRORS = ("RuntimeError: a", "RuntimeError: b")


def expected_delay(attempt: int) -> float:
    """Capped exponential delay with equal jitter, as the retry settings describe it."""
    full = min(SETTINGS.retry_max_seconds, SETTINGS.retry_base_seconds * 2 ** (attempt - 1))
    return full / 2 + JITTER * full / 2


@dataclasses.dataclass
class Model:
    id: int
    priority: int
    max_attempts: int
    run_after: float
    state: str = QUEUED
    attempts: int = 0
    token: int = 0
    owner: str | None = None
    expires: float | None = None
    streak: int = 0
    last_error: str | None = None
    reason: str | None = None
    events: list = dataclasses.field(default_factory=list)

    def log(self, kind: str, to: str) -> None:
        frm = self.state
        if kind == "report.rejected":
            assert frm == to
        else:
            assert to in MOVES[frm], f"model bug: {frm} -> {to}"
        self.events.append((kind, frm, to))
        self.state = to

    def unlease(self) -> None:
        self.owner = None
        self.expires = None


# -- the machine -------------------------------------------------------------------

OUTCOMES = {
    "succeeded": lambda: Outcome.succeeded({"ok": 1}),
    "error-a": lambda: Outcome.error_from(RuntimeError("a")),
    "error-b": lambda: Outcome.error_from(RuntimeError("b")),
    "permanent": lambda: Outcome.permanent("bad input"),
    "canceled": lambda: Outcome.canceled("stopped by the task"),
    "released": lambda: Outcome.released("shutting down"),
}
#: Errors twice as likely as any other outcome: retries, streaks and poison pills.
OUTCOME_CHOICE = st.sampled_from(sorted([*OUTCOMES, "error-a", "error-b"]))
CLAIM_CHOICE = st.sampled_from([CLAIMED, RUNNING, RUNNING, "superseded", "stale", "any"])


class BrokerMachine(RuleBasedStateMachine):
    #: Set by the test: a callable returning (database, cleanup) for a fresh example.
    open_database = None

    def __init__(self):
        super().__init__()
        self.db, self._cleanup = type(self).open_database()
        self.broker = Broker(self.db, SETTINGS, rand=lambda: JITTER)
        self.now = T0
        self.tasks: dict[int, Model] = {}
        self.keys: dict[str, int] = {}
        self.claims: list = []
        self.accepted: set[tuple[int, int]] = set()

    def teardown(self):
        self.broker.doorbell.close()
        self._cleanup()

    # -- helpers --

    def pick(self, seq, index):
        return seq[index % len(seq)]

    def task_ids(self):
        return sorted(self.tasks)

    def expect_rejected(self, task: Model, result_state: str) -> None:
        task.log("report.rejected", task.state)
        assert result_state == task.state

    # -- rules --

    @initialize(
        tasks=st.lists(
            st.tuples(st.integers(0, 2), st.sampled_from([None, 1, 2, 4])), min_size=1, max_size=4
        )
    )
    def seed(self, tasks):
        for priority, max_attempts in tasks:
            self.do_submit(None, 1, priority, max_attempts, 0.0)

    @precondition(lambda self: sum(t.state not in ENDED for t in self.tasks.values()) < 5)
    @rule(
        key=st.sampled_from([None, None, "k1", "k2", "k3"]),
        count=st.sampled_from([1, 1, 1, 2]),
        priority=st.integers(0, 2),
        max_attempts=st.sampled_from([None, 1, 2, 4]),
        delay=st.sampled_from([0.0, 0.0, 2.0]),
    )
    def submit(self, key, count, priority, max_attempts, delay):
        self.do_submit(key, count, priority, max_attempts, delay)

    def do_submit(self, key, count, priority, max_attempts, delay):
        result = self.broker.submit(
            "echo",
            {"p": priority},
            priority=priority,
            max_attempts=max_attempts,
            idempotency_key=key,
            count=count,
            delay=delay,
            now=self.now,
        )
        assert len(result) == count
        if key is None:
            keys = [None] * count
        elif count == 1:
            keys = [key]
        else:
            keys = [f"{key}/{i}" for i in range(count)]
        for name, submitted in zip(keys, result, strict=True):
            if name is not None and name in self.keys:
                assert submitted.created is False
                assert submitted.task_id == self.keys[name]
                continue
            assert submitted.created is True
            assert submitted.task_id not in self.tasks
            task = Model(
                id=submitted.task_id,
                priority=priority,
                max_attempts=SETTINGS.max_attempts if max_attempts is None else max_attempts,
                run_after=self.now + delay,
            )
            task.events.append(("task.submitted", None, QUEUED))
            self.tasks[task.id] = task
            if name is not None:
                self.keys[name] = task.id

    @rule(
        owner=st.sampled_from(OWNERS),
        limit=st.sampled_from([1, 1, 2]),
        and_start=st.booleans(),
    )
    def claim(self, owner, limit, and_start):
        claims = self.do_claim(owner, limit)
        if and_start:
            for claim in claims:
                self.do_start(claim)

    @rule(owner=st.sampled_from(OWNERS), outcome=OUTCOME_CHOICE)
    def work(self, owner, outcome):
        """A worker's whole cycle in one step: claim one task, start it, report on it."""
        for claim in self.do_claim(owner, 1):
            self.do_start(claim)
            self.do_report(claim, outcome)

    def do_claim(self, owner, limit):
        due = [t for t in self.tasks.values() if t.state in WAITING and t.run_after <= self.now]
        due.sort(key=lambda t: (-t.priority, t.run_after, t.id))
        expected = due[:limit]
        claims = self.broker.claim(owner, limit=limit, now=self.now)
        assert [c.task_id for c in claims] == [t.id for t in expected]
        for claim, task in zip(claims, expected, strict=True):
            task.log("task.claimed", CLAIMED)
            task.attempts += 1
            task.token += 1
            task.owner = owner
            task.expires = self.now + SETTINGS.lease_seconds
            assert (claim.token, claim.owner, claim.attempts) == (task.token, owner, task.attempts)
            assert claim.max_attempts == task.max_attempts
            self.claims.append(claim)
        return claims

    def choose_claim(self, index, which):
        """Pick a claim of the kind ``which`` names (any claim if there is none such).

        ``CLAIMED``/``RUNNING``: its lease is held and the task is in that state;
        ``superseded``: a zombie's, its task leased again under a newer token;
        ``stale``: any claim whose lease is gone. The model only steers the choice
        toward the interesting cases; what the broker does with it is still checked.
        """
        pools = collections.defaultdict(list)
        for claim in self.claims:
            task = self.tasks[claim.task_id]
            if task.state in HELD and task.token == claim.token:
                pools[task.state].append(claim)
                continue
            pools["stale"].append(claim)
            if task.state in HELD:
                pools["superseded"].append(claim)
        return self.pick(pools.get(which) or self.claims, index)

    @precondition(lambda self: self.claims)
    @rule(index=st.integers(0, 10_000), which=CLAIM_CHOICE)
    def start(self, index, which):
        self.do_start(self.choose_claim(index, which))

    def do_start(self, claim):
        task = self.tasks[claim.task_id]
        started = self.broker.start(claim, now=self.now)
        if task.state == CLAIMED and task.token == claim.token:
            assert started is True
            task.log("task.started", RUNNING)
        else:
            assert started is False
            task.log("report.rejected", task.state)

    @precondition(lambda self: self.claims)
    @rule(
        index=st.integers(0, 10_000),
        which=CLAIM_CHOICE,
        outcome=OUTCOME_CHOICE,
    )
    def report(self, index, which, outcome):
        self.do_report(self.choose_claim(index, which), outcome)

    def do_report(self, claim, outcome):
        task = self.tasks[claim.task_id]
        if task.state not in HELD or task.token != claim.token:
            result = self.broker.report(claim, OUTCOMES[outcome](), now=self.now)
            assert result.accepted is False
            self.expect_rejected(task, result.state)
            return
        target, changes, kind = self.outcome_target(task, outcome)
        if target not in MOVES[task.state]:
            with pytest.raises(IllegalTransition):
                self.broker.report(claim, OUTCOMES[outcome](), now=self.now)
            return
        result = self.broker.report(claim, OUTCOMES[outcome](), now=self.now)
        assert (result.accepted, result.state) == (True, target)
        assert (task.id, claim.token) not in self.accepted, "a lease token reported twice"
        self.accepted.add((task.id, claim.token))
        task.log(kind, target)
        for name, value in changes.items():
            setattr(task, name, value)
        task.unlease()

    def outcome_target(self, task: Model, outcome: str):
        if outcome == "succeeded":
            return SUCCEEDED, {}, "task.succeeded"
        if outcome == "permanent":
            return FAILED, {"reason": "bad_input", "last_error": "bad input"}, "task.failed"
        if outcome == "canceled":
            changes = {"reason": "canceled", "last_error": "stopped by the task"}
            return CANCELED, changes, "task.canceled"
        if outcome == "released":
            changes = {"attempts": max(task.attempts - 1, 0), "run_after": self.now}
            return QUEUED, changes, "task.released"
        error = ERRORS[0] if outcome == "error-a" else ERRORS[1]
        streak = task.streak + 1 if error == task.last_error else 1
        changes = {"streak": streak, "last_error": error}
        if streak >= SETTINGS.poison_pill_threshold:
            return DEAD_LETTER, {**changes, "reason": "poison_pill"}, "task.dead_lettered"
        if task.attempts >= task.max_attempts:
            changes["reason"] = "retries_exhausted"
            return DEAD_LETTER, changes, "task.dead_lettered"
        changes["run_after"] = self.now + expected_delay(task.attempts)
        return RETRY_WAIT, changes, "task.retry_scheduled"

    @precondition(lambda self: self.claims)
    @rule(indices=st.lists(st.integers(0, 10_000), min_size=1, max_size=3, unique=True))
    def renew(self, indices):
        chosen = {}
        for index in indices:
            claim = self.pick(self.claims, index)
            chosen[(claim.task_id, claim.token)] = claim
        claims = list(chosen.values())
        lost = self.broker.renew(claims[0].owner, claims, now=self.now)
        expected = []
        for claim in claims:
            task = self.tasks[claim.task_id]
            if task.state in HELD and task.token == claim.token:
                task.expires = self.now + SETTINGS.lease_seconds
            else:
                expected.append(claim.task_id)
        assert lost == expected

    @precondition(lambda self: self.tasks)
    @rule(index=st.integers(0, 10_000))
    def cancel(self, index):
        task = self.tasks[self.pick(self.task_ids(), index)]
        if task.state in ENDED:
            with pytest.raises(IllegalTransition):
                self.broker.cancel(task.id, now=self.now)
            return
        row = self.broker.cancel(task.id, now=self.now)
        task.log("task.canceled", CANCELED)
        task.unlease()
        task.reason = "canceled"
        assert row.state == CANCELED

    @precondition(lambda self: self.tasks)
    @rule(index=st.integers(0, 10_000))
    def retry(self, index):
        task = self.tasks[self.pick(self.task_ids(), index)]
        if task.state not in (FAILED, DEAD_LETTER):
            with pytest.raises(IllegalTransition):
                self.broker.retry(task.id, now=self.now)
            return
        row = self.broker.retry(task.id, now=self.now)
        task.log("task.requeued", QUEUED)
        task.attempts, task.streak, task.reason, task.run_after = 0, 0, None, self.now
        assert row.state == QUEUED

    @rule(step=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]), and_reap=st.booleans())
    def tick(self, step, and_reap):
        """The fake clock moves on (leases run out, retries fall due); the reaper may run."""
        self.now += step
        if and_reap:
            self.reap()

    def reap(self):
        expired = [t for t in self.tasks.values() if t.state in HELD and t.expires < self.now]
        reaped = self.broker.reap(now=self.now)
        assert sorted(reaped) == sorted(t.id for t in expired)
        for task in expired:
            if task.attempts >= task.max_attempts:
                task.log("lease.expired", DEAD_LETTER)
                task.reason = "lease_expired"
            else:
                task.log("lease.expired", QUEUED)
                task.run_after = self.now
            task.unlease()

    # -- invariants --

    @invariant()
    def rows_match_the_model(self):
        rows = {t.id: t for t in self.broker.tasks(limit=10_000)}
        assert set(rows) == set(self.tasks)
        for task_id, task in self.tasks.items():
            row = rows[task_id]
            got = (
                row.state,
                row.attempts,
                row.max_attempts,
                row.lease_token,
                row.lease_owner,
                row.lease_expires_at,
                row.error_streak,
                row.last_error,
                row.reason,
                row.priority,
            )
            want = (
                task.state,
                task.attempts,
                task.max_attempts,
                task.token,
                task.owner,
                task.expires,
                task.streak,
                task.last_error,
                task.reason,
                task.priority,
            )
            assert got == want, f"task {task_id}"
            if task.state in WAITING:
                assert row.run_after == task.run_after, f"task {task_id}"
            assert (row.finished_at is not None) == (task.state in ENDED), f"task {task_id}"

    @invariant()
    def event_chains_are_continuous_and_as_predicted(self):
        by_task = collections.defaultdict(list)
        for event in self.broker.events(limit=1_000_000):
            by_task[event.task_id].append(event)
        assert set(by_task) == set(self.tasks)
        for task_id, task in self.tasks.items():
            events = by_task[task_id]
            assert [(e.type, e.from_state, e.to_state) for e in events] == task.events
            first = events[0]
            assert (first.type, first.from_state, first.to_state) == (
                "task.submitted",
                None,
                QUEUED,
            )
            for previous, event in itertools.pairwise(events):
                assert event.from_state == previous.to_state, f"task {task_id}: gap in history"
                if event.type == "report.rejected":
                    assert event.from_state == event.to_state
                else:
                    assert event.to_state in MOVES[event.from_state], f"task {task_id}: {event}"
                assert event.at >= previous.at
            assert events[-1].to_state == task.state
            reports = collections.Counter(
                e.lease_token for e in events if e.type in REPORT_EVENTS or self._task_cancel(e)
            )
            assert all(n == 1 for n in reports.values()), f"task {task_id}: {reports}"
            claims = [e.lease_token for e in events if e.type == "task.claimed"]
            assert claims == sorted(set(claims)), "lease tokens only ever grow"
            for event in events:
                if event.type == "report.rejected":  # names the stale claim and the report
                    assert event.lease_token is not None and event.worker in OWNERS
                    assert json.loads(event.detail)["report"] in REJECTABLE

    @staticmethod
    def _task_cancel(event) -> bool:
        """A cancel reported by the task itself (it carries the lease token)."""
        return event.type == "task.canceled" and event.lease_token is not None

    @invariant()
    def counts_add_up(self):
        counts = self.broker.counts()
        tally = collections.Counter(t.state for t in self.tasks.values())
        assert counts == {state: tally.get(state, 0) for state in STATES}
        assert sum(counts.values()) == len(self.tasks)
        assert self.broker.queue_depth("default") == sum(tally[s] for s in WAITING)
        expired = [t for t in self.tasks.values() if t.state in HELD and t.expires < self.now]
        assert self.broker.expired_leases(now=self.now) == len(expired)


# -- running it --------------------------------------------------------------------

#: Tuned so the file runs in well under a minute with both databases.
RUN = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
#: PostgreSQL round trips cost more; fewer examples there (SQLite explores the space).
RUN_POSTGRES = settings(RUN, max_examples=60)


def _fresh_sqlite():
    directory = Path(tempfile.mkdtemp(prefix="goclaw-prop-"))
    db = Database(f"sqlite:///{directory / 'goclaw.db'}")
    migrate(db)

    def cleanup():
        db.close()
        shutil.rmtree(directory, ignore_errors=True)

    return db, cleanup


def test_broker_matches_model_on_sqlite():
    machine = type(
        "SqliteMachine", (BrokerMachine,), {"open_database": staticmethod(_fresh_sqlite)}
    )
    run_state_machine_as_test(machine, settings=RUN)


@pytest.fixture(scope="module")
def postgres_schema_url():
    """One schema for the whole run; each example empties it (much faster than a new one)."""
    require_postgres()
    import psycopg

    schema = f"goclaw_p_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options={urllib.parse.quote(f'-csearch_path={schema}')}"
    try:
        db = Database(url)
        migrate(db)
        db.close()
        yield url
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.postgres
def test_broker_matches_model_on_postgresql(postgres_schema_url):
    db = Database(postgres_schema_url)

    def fresh():
        with db.transaction():
            db.execute("TRUNCATE task_events, approvals, tasks, leaders RESTART IDENTITY")
        return db, lambda: None

    machine = type("PostgresMachine", (BrokerMachine,), {"open_database": staticmethod(fresh)})
    try:
        run_state_machine_as_test(machine, settings=RUN_POSTGRES)
    finally:
        db.close()
