"""The task lifecycle, edge by edge, on a real SQLite file and a real PostgreSQL schema.

What this file proves, through the public ``Broker`` API only:

* every legal move in ``goclaw.states.ALLOWED`` can be made, and making it writes
  exactly one ``task_events`` row whose type, from-state and to-state are the
  ones expected (``test_edge``); ``test_every_allowed_edge_is_exercised`` fails
  as soon as an edge is added to (or removed from) ``ALLOWED`` without a case here;
* a RETRY_WAIT task stays visibly waiting until its ``run_after`` passes;
* illegal moves raise ``IllegalTransition`` and leave the row and the event log
  untouched; a ``start`` under a lost lease returns False and changes nothing
  but the log (one ``report.rejected``);
* fencing: a report under a stale lease token, or after a cancel, is rejected
  and recorded, the current owner's report is accepted, ``renew`` names the
  leases that are gone;
* retries: capped exponential backoff with equal jitter, per-task and default
  ``max_attempts``, dead-lettering on exhaustion and on a poison pill, and an
  operator retry that starts the task over;
* idempotency keys, priorities (FIFO by due time within one, also inside one
  claimed batch), leader election, and the ``counts`` / ``expired_leases`` /
  ``queue_depth`` read side;
* transactions: broker calls made inside ``Broker.transaction()`` commit together
  and roll back together, and a move is never committed without its event.

Time is never slept: every call gets an explicit ``now``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest

from goclaw.broker import Broker, Outcome, Reported
from goclaw.errors import IllegalTransition
from goclaw.records import Task, TaskEvent
from goclaw.states import ALLOWED, Reason, TaskState
from tests.conftest import FAST

S = TaskState
T0 = 1_700_000_000.0
LEASE = FAST.lease_seconds
#: Long enough after ``T0`` for any FAST lease or retry delay to have passed.
LATER = T0 + 100 * LEASE


def make_broker(broker: Broker, **changes) -> Broker:
    """The fixture's database with other settings (and deterministic jitter)."""
    return Broker(broker.db, dataclasses.replace(FAST, **changes), rand=lambda: 0.5)


def boom(text: str = "boom") -> Outcome:
    return Outcome.error_from(RuntimeError(text))


# -- bringing a task into each state -----------------------------------------


def queued(b: Broker, **kw) -> int:
    return b.submit("echo", {"n": 1}, now=T0, **kw)[0].task_id


def claimed(b: Broker, owner: str = "w1", **kw):
    task_id = queued(b, **kw)
    (claim,) = b.claim(owner, now=T0)
    assert claim.task_id == task_id
    return task_id, claim


def running(b: Broker, owner: str = "w1", **kw):
    task_id, claim = claimed(b, owner, **kw)
    assert b.start(claim, now=T0)
    return task_id, claim


def retry_waiting(b: Broker):
    task_id, claim = running(b)
    assert b.report(claim, boom(), now=T0).state == S.RETRY_WAIT
    return task_id


def failed(b: Broker) -> int:
    task_id, claim = running(b)
    assert b.report(claim, Outcome.permanent("bad input"), now=T0).state == S.FAILED
    return task_id


def dead_lettered(b: Broker) -> int:
    task_id, claim = running(b, max_attempts=1)
    assert b.report(claim, boom(), now=T0).state == S.DEAD_LETTER
    return task_id


def succeeded(b: Broker) -> int:
    task_id, claim = running(b)
    assert b.report(claim, Outcome.succeeded({"ok": True}), now=T0).accepted
    return task_id


def canceled(b: Broker) -> int:
    task_id = queued(b)
    b.cancel(task_id, now=T0)
    return task_id


IN_STATE: dict[TaskState, Callable[[Broker], int]] = {
    S.QUEUED: queued,
    S.CLAIMED: lambda b: claimed(b)[0],
    S.RUNNING: lambda b: running(b)[0],
    S.RETRY_WAIT: retry_waiting,
    S.SUCCEEDED: succeeded,
    S.FAILED: failed,
    S.CANCELED: canceled,
    S.DEAD_LETTER: dead_lettered,
}


def new_events(b: Broker, task_id: int, before: list[TaskEvent]) -> list[tuple]:
    events = b.events(task_id)
    assert events[: len(before)] == before, "the event log is append-only"
    return [(e.type, e.from_state, e.to_state) for e in events[len(before) :]]


# -- every legal edge ---------------------------------------------------------

Arranged = tuple[int, Callable[[], object]]


@dataclasses.dataclass(frozen=True)
class Edge:
    """One way to make one legal move: arrange a task in ``frm``, then ``act``."""

    name: str
    frm: TaskState
    to: TaskState
    event: str
    arrange: Callable[[Broker], Arranged]
    check: Callable[[Task, TaskEvent], None] | None = None


def _claim_queued(b):
    task_id = queued(b)
    return task_id, lambda: b.claim("w1", now=T0)


def _cancel_in(state):
    def arrange(b):
        task_id = IN_STATE[state](b)
        return task_id, lambda: b.cancel(task_id, reason="operator", now=T0 + 0.5)

    return arrange


def _start(b):
    task_id, claim = claimed(b)
    return task_id, lambda: b.start(claim, now=T0)


def _report_from(state, outcome, owner="w1", **kw):
    def arrange(b):
        make = claimed if state == S.CLAIMED else running
        task_id, claim = make(make_broker(b), owner, **kw)
        return task_id, lambda: b.report(claim, outcome, now=T0 + 0.5)

    return arrange


def _reap_from(state, **kw):
    def arrange(b):
        make = claimed if state == S.CLAIMED else running
        task_id, _ = make(b, **kw)
        return task_id, lambda: b.reap(now=T0 + LEASE + 0.5)

    return arrange


def _poison(b):
    b = make_broker(b, poison_pill_threshold=2, max_attempts=10)
    task_id, claim = running(b)
    b.report(claim, boom("same"), now=T0)
    (claim,) = b.claim("w1", now=LATER)
    b.start(claim, now=LATER)
    return task_id, lambda: b.report(claim, boom("same"), now=LATER)


def _claim_retry_wait(b):
    task_id = retry_waiting(b)
    run_after = b.get(task_id).run_after
    return task_id, lambda: b.claim("w2", now=run_after)


def _retry_from(state):
    def arrange(b):
        task_id = IN_STATE[state](b)
        return task_id, lambda: b.retry(task_id, now=LATER)

    return arrange


def _leased_to(owner, attempts):
    def check(task, event):
        assert task.lease_owner == owner
        assert task.lease_expires_at is not None
        assert task.attempts == attempts
        assert event.lease_token == task.lease_token

    return check


def _unleased(task, event):
    assert task.lease_owner is None
    assert task.lease_expires_at is None


def _ended(reason):
    def check(task, event):
        _unleased(task, event)
        assert task.reason == reason
        assert task.finished_at is not None

    return check


def _released(task, event):
    _unleased(task, event)
    assert task.attempts == 0, "a released attempt does not count"


def _reaped(task, event):
    _unleased(task, event)
    assert task.attempts == 1, "a crashed attempt counts"
    assert json.loads(event.detail)["owner"] == "w1"


def _requeued(task, event):
    assert (task.attempts, task.error_streak, task.reason, task.finished_at) == (0, 0, None, None)
    assert task.run_after == LATER


def _unleased_with_result(task, result):
    assert (task.lease_owner, task.lease_expires_at) == (None, None)
    assert json.loads(task.result) == result


def _retry_scheduled(task, event):
    _unleased(task, event)
    assert task.run_after > T0
    assert task.error_streak == 1


EDGES: list[Edge] = [
    Edge("claim", S.QUEUED, S.CLAIMED, "task.claimed", _claim_queued, _leased_to("w1", 1)),
    Edge("cancel-queued", S.QUEUED, S.CANCELED, "task.canceled", _cancel_in(S.QUEUED)),
    Edge("start", S.CLAIMED, S.RUNNING, "task.started", _start, _leased_to("w1", 1)),
    Edge(
        "release-claimed",
        S.CLAIMED,
        S.QUEUED,
        "task.released",
        _report_from(S.CLAIMED, Outcome.released()),
        _released,
    ),
    Edge("reap-claimed", S.CLAIMED, S.QUEUED, "lease.expired", _reap_from(S.CLAIMED), _reaped),
    Edge(
        "reject-claimed",
        S.CLAIMED,
        S.FAILED,
        "task.failed",
        _report_from(S.CLAIMED, Outcome.permanent("no such kind", Reason.UNKNOWN_KIND)),
        _ended(Reason.UNKNOWN_KIND),
    ),
    Edge(
        "cancel-claimed",
        S.CLAIMED,
        S.CANCELED,
        "task.canceled",
        _cancel_in(S.CLAIMED),
        _ended(Reason.CANCELED),
    ),
    Edge(
        "task-cancels-claimed",
        S.CLAIMED,
        S.CANCELED,
        "task.canceled",
        _report_from(S.CLAIMED, Outcome.canceled()),
        _ended(Reason.CANCELED),
    ),
    Edge(
        "reap-claimed-exhausted",
        S.CLAIMED,
        S.DEAD_LETTER,
        "lease.expired",
        _reap_from(S.CLAIMED, max_attempts=1),
        _ended(Reason.LEASE_EXPIRED),
    ),
    Edge(
        "error-claimed-exhausted",
        S.CLAIMED,
        S.DEAD_LETTER,
        "task.dead_lettered",
        _report_from(S.CLAIMED, boom(), max_attempts=1),
        _ended(Reason.RETRIES_EXHAUSTED),
    ),
    Edge(
        "succeed",
        S.RUNNING,
        S.SUCCEEDED,
        "task.succeeded",
        _report_from(S.RUNNING, Outcome.succeeded({"answer": 42})),
        lambda task, event: _unleased_with_result(task, {"answer": 42}),
    ),
    Edge(
        "error",
        S.RUNNING,
        S.RETRY_WAIT,
        "task.retry_scheduled",
        _report_from(S.RUNNING, boom()),
        _retry_scheduled,
    ),
    Edge(
        "fail",
        S.RUNNING,
        S.FAILED,
        "task.failed",
        _report_from(S.RUNNING, Outcome.permanent("bad input")),
        _ended(Reason.BAD_INPUT),
    ),
    Edge(
        "error-exhausted",
        S.RUNNING,
        S.DEAD_LETTER,
        "task.dead_lettered",
        _report_from(S.RUNNING, boom(), max_attempts=1),
        _ended(Reason.RETRIES_EXHAUSTED),
    ),
    Edge(
        "poison-pill",
        S.RUNNING,
        S.DEAD_LETTER,
        "task.dead_lettered",
        _poison,
        _ended(Reason.POISON_PILL),
    ),
    Edge(
        "reap-running-exhausted",
        S.RUNNING,
        S.DEAD_LETTER,
        "lease.expired",
        _reap_from(S.RUNNING, max_attempts=1),
        _ended(Reason.LEASE_EXPIRED),
    ),
    Edge("reap-running", S.RUNNING, S.QUEUED, "lease.expired", _reap_from(S.RUNNING), _reaped),
    Edge(
        "release-running",
        S.RUNNING,
        S.QUEUED,
        "task.released",
        _report_from(S.RUNNING, Outcome.released()),
        _released,
    ),
    Edge(
        "cancel-running",
        S.RUNNING,
        S.CANCELED,
        "task.canceled",
        _cancel_in(S.RUNNING),
        _ended(Reason.CANCELED),
    ),
    Edge(
        "task-cancels-running",
        S.RUNNING,
        S.CANCELED,
        "task.canceled",
        _report_from(S.RUNNING, Outcome.canceled()),
        _ended(Reason.CANCELED),
    ),
    Edge(
        "claim-retry-wait",
        S.RETRY_WAIT,
        S.CLAIMED,
        "task.claimed",
        _claim_retry_wait,
        _leased_to("w2", 2),
    ),
    Edge(
        "cancel-retry-wait",
        S.RETRY_WAIT,
        S.CANCELED,
        "task.canceled",
        _cancel_in(S.RETRY_WAIT),
        _ended(Reason.CANCELED),
    ),
    Edge("retry-failed", S.FAILED, S.QUEUED, "task.requeued", _retry_from(S.FAILED), _requeued),
    Edge(
        "retry-dead-letter",
        S.DEAD_LETTER,
        S.QUEUED,
        "task.requeued",
        _retry_from(S.DEAD_LETTER),
        _requeued,
    ),
]


def test_every_allowed_edge_is_exercised():
    """Adding an edge to ALLOWED (or removing one) without a case in EDGES fails here."""
    allowed = {(frm, to) for frm, targets in ALLOWED.items() for to in targets}
    exercised = {(edge.frm, edge.to) for edge in EDGES}
    assert exercised - allowed == set(), "cases for moves ALLOWED forbids"
    assert allowed - exercised == set(), "moves ALLOWED permits that no case makes"


def test_edge_cases_are_named_uniquely():
    names = [edge.name for edge in EDGES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("edge", EDGES, ids=lambda edge: edge.name)
def test_edge(broker, edge):
    """The move happens and is logged as exactly one event: right type, from and to."""
    task_id, act = edge.arrange(broker)
    assert broker.get(task_id).state == edge.frm
    before = broker.events(task_id)
    act()
    assert new_events(broker, task_id, before) == [(edge.event, edge.frm, edge.to)]
    task = broker.get(task_id)
    assert task.state == edge.to
    if edge.check is not None:
        edge.check(task, broker.events(task_id)[-1])


def test_a_long_life_leaves_a_continuous_history(broker):
    """Each event starts where the previous one ended; the log ends at the row's state."""
    b = make_broker(broker, max_attempts=2)
    task_id, claim = running(b)
    b.report(claim, boom(), now=T0)
    (claim,) = b.claim("w2", now=LATER)
    b.report(claim, Outcome.released(), now=LATER)
    (claim,) = b.claim("w1", now=LATER)
    b.start(claim, now=LATER)
    b.reap(now=LATER + LEASE + 1)  # attempts 2 of 2: dead-lettered
    b.retry(task_id, now=LATER + 2 * LEASE)
    (claim,) = b.claim("w1", now=LATER + 2 * LEASE)
    b.start(claim, now=LATER + 2 * LEASE)
    b.report(claim, Outcome.succeeded(), now=LATER + 2 * LEASE)
    events = b.events(task_id)
    assert [(e.from_state, e.to_state) for e in events] == [
        (None, "QUEUED"),
        ("QUEUED", "CLAIMED"),
        ("CLAIMED", "RUNNING"),
        ("RUNNING", "RETRY_WAIT"),
        ("RETRY_WAIT", "CLAIMED"),
        ("CLAIMED", "QUEUED"),
        ("QUEUED", "CLAIMED"),
        ("CLAIMED", "RUNNING"),
        ("RUNNING", "DEAD_LETTER"),
        ("DEAD_LETTER", "QUEUED"),
        ("QUEUED", "CLAIMED"),
        ("CLAIMED", "RUNNING"),
        ("RUNNING", "SUCCEEDED"),
    ]
    assert events[-1].to_state == b.get(task_id).state


def test_retry_wait_is_not_claimed_before_run_after(broker):
    task_id = retry_waiting(broker)
    run_after = broker.get(task_id).run_after
    assert run_after > T0
    before = broker.events(task_id)

    assert broker.claim("w1", now=T0) == []
    assert broker.claim("w1", now=run_after - 0.001) == []
    task = broker.get(task_id)
    assert task.state == S.RETRY_WAIT
    assert task.lease_owner is None
    assert broker.tasks(state=S.RETRY_WAIT)[0].id == task_id
    assert broker.counts()["RETRY_WAIT"] == 1
    assert broker.queue_depth("default") == 1
    assert broker.next_due("default") == run_after
    assert new_events(broker, task_id, before) == []

    (claim,) = broker.claim("w1", now=run_after)
    assert claim.task_id == task_id
    assert new_events(broker, task_id, before) == [("task.claimed", "RETRY_WAIT", "CLAIMED")]


def test_delayed_submit_is_not_claimed_early(broker):
    task_id = broker.submit("echo", delay=5.0, now=T0)[0].task_id
    assert broker.claim("w1", now=T0 + 4.9) == []
    assert broker.get(task_id).state == S.QUEUED
    assert [c.task_id for c in broker.claim("w1", now=T0 + 5.0)] == [task_id]


# -- illegal moves --------------------------------------------------------------


def _assert_untouched(b: Broker, task_id: int, move: Callable[[], object]) -> IllegalTransition:
    row, log = b.get(task_id), b.events(task_id)
    with pytest.raises(IllegalTransition) as caught:
        move()
    assert b.get(task_id) == row
    assert b.events(task_id) == log
    return caught.value


TERMINAL_STATES = [S.SUCCEEDED, S.FAILED, S.CANCELED, S.DEAD_LETTER]


@pytest.mark.parametrize("state", TERMINAL_STATES, ids=str)
def test_cancel_of_a_terminal_task_is_illegal(broker, state):
    task_id = IN_STATE[state](broker)
    error = _assert_untouched(broker, task_id, lambda: broker.cancel(task_id, now=LATER))
    assert (error.task_id, error.current, error.wanted) == (task_id, state, S.CANCELED)


@pytest.mark.parametrize(
    "state",
    [S.QUEUED, S.CLAIMED, S.RUNNING, S.RETRY_WAIT, S.SUCCEEDED, S.CANCELED],
    ids=str,
)
def test_retry_of_a_task_neither_failed_nor_dead_is_illegal(broker, state):
    task_id = IN_STATE[state](broker)
    error = _assert_untouched(broker, task_id, lambda: broker.retry(task_id, now=LATER))
    assert (error.current, error.wanted) == (state, S.QUEUED)


def test_report_of_success_without_start_is_illegal(broker):
    """CLAIMED -> SUCCEEDED is not an edge: a task must be started before it succeeds."""
    task_id, claim = claimed(broker)
    error = _assert_untouched(
        broker, task_id, lambda: broker.report(claim, Outcome.succeeded(), now=T0)
    )
    assert (error.current, error.wanted) == (S.CLAIMED, S.SUCCEEDED)


def test_report_of_retryable_error_without_start_is_illegal(broker):
    """CLAIMED -> RETRY_WAIT is not an edge either (only dead-lettering is, when exhausted)."""
    task_id, claim = claimed(broker)
    error = _assert_untouched(broker, task_id, lambda: broker.report(claim, boom(), now=T0))
    assert (error.current, error.wanted) == (S.CLAIMED, S.RETRY_WAIT)


@pytest.mark.parametrize(
    "state",
    [S.QUEUED, S.RUNNING, S.RETRY_WAIT, S.SUCCEEDED, S.FAILED, S.CANCELED, S.DEAD_LETTER],
    ids=str,
)
def test_start_of_a_task_not_claimed_changes_nothing(broker, state):
    """``start`` is fenced rather than raising: it returns False, the row is unchanged and
    the only trace is one ``report.rejected`` event (from == to == the current state)."""
    b = make_broker(broker, max_attempts=1 if state == S.DEAD_LETTER else 3)
    task_id, claim = claimed(b)  # the claim whose start comes too late
    if state in (S.RUNNING, S.RETRY_WAIT, S.SUCCEEDED, S.DEAD_LETTER):
        assert b.start(claim, now=T0)  # for RUNNING, the start below is a second one
    outcome = {
        S.QUEUED: Outcome.released(),
        S.RETRY_WAIT: boom(),
        S.SUCCEEDED: Outcome.succeeded(),
        S.FAILED: Outcome.permanent("bad"),
        S.DEAD_LETTER: boom(),
    }.get(state)
    if outcome is not None:
        assert b.report(claim, outcome, now=T0).state == state
    if state == S.CANCELED:
        b.cancel(task_id, now=T0)
    assert b.get(task_id).state == state
    row, before = b.get(task_id), b.events(task_id)

    assert b.start(claim, now=T0 + 0.5) is False

    assert b.get(task_id) == row
    assert new_events(b, task_id, before) == [("report.rejected", state, state)]
    assert json.loads(b.events(task_id)[-1].detail)["report"] == "start"


def test_start_after_reap_and_reclaim_is_fenced(broker):
    task_id, old = claimed(broker, "w1")
    broker.reap(now=T0 + LEASE + 0.5)
    (new,) = broker.claim("w2", now=T0 + LEASE + 0.5)
    row, before = broker.get(task_id), broker.events(task_id)
    assert broker.start(old, now=T0 + LEASE + 0.6) is False
    assert broker.get(task_id) == row
    assert new_events(broker, task_id, before) == [("report.rejected", "CLAIMED", "CLAIMED")]
    assert broker.start(new, now=T0 + LEASE + 0.7)


# -- fencing --------------------------------------------------------------------


def test_stale_report_after_reap_and_reclaim_is_rejected(broker):
    task_id, old = running(broker, "w1")
    assert broker.reap(now=T0 + LEASE + 0.5) == [task_id]
    (new,) = broker.claim("w2", now=T0 + LEASE + 0.5)
    assert new.task_id == task_id
    assert new.token > old.token
    assert broker.start(new, now=T0 + LEASE + 0.6)
    row, before = broker.get(task_id), broker.events(task_id)

    stale = broker.report(old, Outcome.succeeded("zombie"), now=T0 + LEASE + 0.7)

    assert stale.accepted is False
    assert stale.state == S.RUNNING
    assert str(new.token) in stale.detail
    assert broker.get(task_id) == row, "the new owner's task is left exactly as it was"
    assert new_events(broker, task_id, before) == [("report.rejected", "RUNNING", "RUNNING")]
    rejected = broker.events(task_id)[-1]
    assert (rejected.lease_token, rejected.worker) == (old.token, "w1")
    assert json.loads(rejected.detail)["report"] == "succeeded"

    fresh = broker.report(new, Outcome.succeeded("real"), now=T0 + LEASE + 0.8)
    assert fresh == Reported(True, S.SUCCEEDED)
    task = broker.get(task_id)
    assert task.state == S.SUCCEEDED
    assert json.loads(task.result) == "real"
    assert broker.events(task_id)[-1].lease_token == new.token


def test_stale_claim_cannot_report_on_a_task_claimed_again(broker):
    """Reaped, re-claimed and not yet started: the zombie still cannot move it."""
    task_id, old = claimed(broker, "w1")
    broker.reap(now=T0 + LEASE + 0.5)
    (new,) = broker.claim("w2", now=T0 + LEASE + 0.5)
    row = broker.get(task_id)
    for outcome in (Outcome.released(), Outcome.permanent("x"), Outcome.canceled()):
        assert broker.report(old, outcome, now=T0 + LEASE + 0.6).accepted is False
    assert broker.start(old, now=T0 + LEASE + 0.6) is False
    assert broker.get(task_id) == row
    assert [e.type for e in broker.events(task_id)][-4:] == ["report.rejected"] * 4
    assert broker.start(new, now=T0 + LEASE + 0.7)


def test_report_after_cancel_is_rejected(broker):
    task_id, claim = running(broker)
    broker.cancel(task_id, now=T0 + 0.1)
    assert broker.canceled_among([task_id]) == [task_id]
    row, before = broker.get(task_id), broker.events(task_id)

    result = broker.report(claim, Outcome.succeeded(), now=T0 + 0.2)

    assert (result.accepted, result.state) == (False, S.CANCELED)
    assert "CANCELED" in result.detail
    assert broker.get(task_id) == row
    assert new_events(broker, task_id, before) == [("report.rejected", "CANCELED", "CANCELED")]


def test_a_lease_is_held_until_strictly_after_it_expires(broker):
    task_id, claim = running(broker)
    expires = broker.get(task_id).lease_expires_at
    assert expires == T0 + LEASE
    assert broker.reap(now=expires) == []
    assert broker.get(task_id).state == S.RUNNING
    assert broker.renew("w1", [claim], now=expires) == []
    assert broker.reap(now=expires + 0.001) == []  # renewed at the last moment
    assert broker.reap(now=expires + LEASE + 0.001) == [task_id]


def test_renew_extends_held_leases_and_returns_the_lost_ones(broker):
    kept_id, kept = running(broker, "w1")
    canceled_id, canceled_claim = running(broker, "w1")
    stolen_id, stolen = claimed(broker, "w1")
    broker.cancel(canceled_id, now=T0)
    assert broker.renew("w1", [kept], now=T0 + 0.9) == []
    assert broker.get(kept_id).lease_expires_at == T0 + 0.9 + LEASE

    # The unrenewed lease expires and another worker takes the task.
    assert broker.reap(now=T0 + LEASE + 0.5) == [stolen_id]
    broker.claim("w2", now=T0 + LEASE + 0.5)

    lost = broker.renew("w1", [kept, canceled_claim, stolen], now=T0 + LEASE + 0.6)

    assert sorted(lost) == sorted([canceled_id, stolen_id])
    assert broker.get(kept_id).lease_expires_at == T0 + LEASE + 0.6 + LEASE
    assert broker.get(stolen_id).lease_owner == "w2"
    assert broker.get(canceled_id).lease_expires_at is None


def test_renew_does_not_write_events(broker):
    task_id, claim = running(broker)
    before = broker.events(task_id)
    assert broker.renew("w1", [claim], now=T0 + 0.5) == []
    assert new_events(broker, task_id, before) == []


# -- retries --------------------------------------------------------------------


@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.999])
def test_backoff_is_exponential_jittered_and_capped(broker, jitter):
    base, cap = 0.5, 6.0
    b = Broker(
        broker.db,
        dataclasses.replace(FAST, retry_base_seconds=base, retry_max_seconds=cap, max_attempts=20),
        rand=lambda: jitter,
    )
    task_id = queued(b)
    now = T0
    seen = []
    for attempt in range(1, 8):
        (claim,) = b.claim("w1", now=now)
        assert claim.attempts == attempt
        b.start(claim, now=now)
        # A different error each time: no poison pill.
        assert b.report(claim, boom(f"e{attempt}"), now=now).state == S.RETRY_WAIT
        delay = min(cap, base * 2 ** (attempt - 1))
        wait = b.get(task_id).run_after - now
        assert delay / 2 - 1e-9 <= wait <= delay + 1e-9
        assert wait == pytest.approx(delay / 2 + jitter * delay / 2)
        seen.append(wait)
        now = b.get(task_id).run_after
    full = [min(cap, base * 2**n) for n in range(7)]
    assert full == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0, 6.0]  # the cap is reached
    assert seen == pytest.approx([d / 2 + jitter * d / 2 for d in full])


def test_backoff_uses_random_jitter_by_default(broker):
    """With the real random source every wait still lies within [delay/2, delay]."""
    b = Broker(broker.db, dataclasses.replace(FAST, max_attempts=50, poison_pill_threshold=99))
    ids = [t.task_id for t in b.submit("echo", count=20, now=T0)]
    claims = b.claim("w1", limit=20, now=T0)
    delay = FAST.retry_base_seconds
    for claim in claims:
        b.start(claim, now=T0)
        b.report(claim, boom(), now=T0)
    for task_id in ids:
        wait = b.get(task_id).run_after - T0
        assert delay / 2 - 1e-9 <= wait <= delay + 1e-9


def _fail_until_done(b: Broker, task_id: int, errors, now: float = T0) -> list[TaskState]:
    states = []
    for error in errors:
        (claim,) = b.claim("w1", now=now)
        assert claim.task_id == task_id
        b.start(claim, now=now)
        states.append(b.report(claim, boom(error), now=now).state)
        if states[-1] != S.RETRY_WAIT:
            break
        now = b.get(task_id).run_after
    return states


def test_max_attempts_defaults_from_settings_and_can_be_set_per_task(broker):
    b = make_broker(broker, max_attempts=3, poison_pill_threshold=99)
    default_id = queued(b)
    own_id = b.submit("echo", max_attempts=2, now=T0)[0].task_id
    assert b.get(default_id).max_attempts == 3
    assert b.get(own_id).max_attempts == 2
    with pytest.raises(ValueError):
        b.submit("echo", max_attempts=0, now=T0)

    b.cancel(default_id, now=T0)
    assert _fail_until_done(b, own_id, ["a", "b", "c"]) == [S.RETRY_WAIT, S.DEAD_LETTER]

    other = queued(b)
    assert _fail_until_done(b, other, "abcd") == [S.RETRY_WAIT, S.RETRY_WAIT, S.DEAD_LETTER]


def test_exhausted_retries_dead_letter_with_reason(broker):
    b = make_broker(broker, max_attempts=2, poison_pill_threshold=99)
    task_id = queued(b)
    _fail_until_done(b, task_id, ["a", "b"])
    task = b.get(task_id)
    assert task.state == S.DEAD_LETTER
    assert task.reason == Reason.RETRIES_EXHAUSTED
    assert task.attempts == 2
    assert task.last_error == "RuntimeError: b"
    assert (task.lease_owner, task.lease_expires_at) == (None, None)
    last = b.events(task_id)[-1]
    assert (last.type, last.from_state, last.to_state) == (
        "task.dead_lettered",
        "RUNNING",
        "DEAD_LETTER",
    )
    assert json.loads(last.detail)["reason"] == "retries_exhausted"


def test_same_error_in_a_row_is_a_poison_pill(broker):
    b = make_broker(broker, max_attempts=10, poison_pill_threshold=3)
    task_id = queued(b)
    states = _fail_until_done(b, task_id, ["same"] * 5)
    assert states == [S.RETRY_WAIT, S.RETRY_WAIT, S.DEAD_LETTER]
    task = b.get(task_id)
    assert (task.reason, task.attempts, task.error_streak) == (Reason.POISON_PILL, 3, 3)
    assert json.loads(b.events(task_id)[-1].detail)["reason"] == "poison_pill"


def test_alternating_errors_reset_the_poison_streak(broker):
    b = make_broker(broker, max_attempts=6, poison_pill_threshold=3)
    task_id = queued(b)
    states = _fail_until_done(b, task_id, "ababab")
    assert states == [S.RETRY_WAIT] * 5 + [S.DEAD_LETTER]
    task = b.get(task_id)
    assert task.reason == Reason.RETRIES_EXHAUSTED
    assert task.error_streak == 1


def test_a_different_error_restarts_the_streak(broker):
    b = make_broker(broker, max_attempts=10, poison_pill_threshold=3)
    task_id = queued(b)
    streaks = []
    now = T0
    for error in "aabaa":
        (claim,) = b.claim("w1", now=now)
        b.start(claim, now=now)
        assert b.report(claim, boom(error), now=now).state == S.RETRY_WAIT
        streaks.append(b.get(task_id).error_streak)
        now = b.get(task_id).run_after
    assert streaks == [1, 2, 1, 1, 2]
    assert _fail_until_done(b, task_id, "a", now=now) == [S.DEAD_LETTER]
    assert b.get(task_id).reason == Reason.POISON_PILL


def test_retry_from_dead_letter_starts_over(broker):
    b = make_broker(broker, max_attempts=2, poison_pill_threshold=2)
    task_id = queued(b)
    _fail_until_done(b, task_id, ["x", "x"])
    dead = b.get(task_id)
    assert (dead.state, dead.reason, dead.attempts) == (S.DEAD_LETTER, Reason.POISON_PILL, 2)
    before = b.events(task_id)

    task = b.retry(task_id, now=LATER)

    assert (task.state, task.attempts, task.error_streak, task.reason) == (S.QUEUED, 0, 0, None)
    assert task.run_after == LATER
    assert task.finished_at is None
    assert new_events(b, task_id, before) == [("task.requeued", "DEAD_LETTER", "QUEUED")]
    detail = json.loads(b.events(task_id)[-1].detail)
    assert detail == {"previous_reason": "poison_pill", "previous_attempts": 2}
    (claim,) = b.claim("w1", now=LATER)
    assert claim.attempts == 1
    # The streak starts again: one more identical error is not yet a poison pill.
    b.start(claim, now=LATER)
    assert b.report(claim, boom("x"), now=LATER).state == S.RETRY_WAIT


def test_released_attempts_do_not_count(broker):
    b = make_broker(broker, max_attempts=1)
    task_id = queued(b)
    for _ in range(3):
        (claim,) = b.claim("w1", now=T0)
        assert claim.attempts == 1
        b.report(claim, Outcome.released(), now=T0)
    assert b.get(task_id).attempts == 0
    assert b.get(task_id).state == S.QUEUED


# -- idempotency ------------------------------------------------------------------


def test_same_idempotency_key_returns_the_same_task(broker):
    (first,) = broker.submit("echo", {"n": 1}, idempotency_key="job-1", now=T0)
    events = broker.events()
    counts = broker.counts()

    (again,) = broker.submit("echo", {"n": 2}, idempotency_key="job-1", now=T0 + 5)

    assert first.created is True
    assert again.task_id == first.task_id
    assert again.created is False
    assert broker.events() == events
    assert broker.counts() == counts
    assert json.loads(broker.get(first.task_id).payload) == {"n": 1}
    (other,) = broker.submit("echo", idempotency_key="job-2", now=T0)
    assert other.created and other.task_id != first.task_id


def test_idempotency_key_with_count_names_each_task(broker):
    first = broker.submit("echo", idempotency_key="KEY", count=3, now=T0)
    assert [s.created for s in first] == [True] * 3
    ids = [s.task_id for s in first]
    assert len(set(ids)) == 3
    assert [broker.get(i).idempotency_key for i in ids] == ["KEY/0", "KEY/1", "KEY/2"]
    events = broker.events()
    assert len(events) == 3

    again = broker.submit("echo", idempotency_key="KEY", count=3, now=T0 + 1)

    assert [s.task_id for s in again] == ids
    assert [s.created for s in again] == [False] * 3
    assert broker.events() == events
    assert broker.counts()["QUEUED"] == 3


def test_idempotency_key_survives_the_task_ending(broker):
    task_id, claim = running(broker, idempotency_key="once")
    broker.report(claim, Outcome.succeeded(), now=T0)
    (again,) = broker.submit("echo", idempotency_key="once", now=LATER)
    assert (again.task_id, again.created) == (task_id, False)
    assert broker.get(task_id).state == S.SUCCEEDED


# -- priorities -------------------------------------------------------------------


def test_higher_priority_is_claimed_first_fifo_within_a_priority(broker):
    low = broker.submit("echo", priority=0, now=T0)[0].task_id
    high_a = broker.submit("echo", priority=5, now=T0 + 1)[0].task_id
    mid = broker.submit("echo", priority=1, now=T0 + 2)[0].task_id
    high_b = broker.submit("echo", priority=5, now=T0 + 3)[0].task_id
    low_b = broker.submit("echo", priority=0, now=T0 + 4)[0].task_id
    order = [broker.claim("w1", now=T0 + 10)[0].task_id for _ in range(5)]
    assert order == [high_a, high_b, mid, low, low_b]
    assert broker.claim("w1", now=T0 + 10) == []


def test_fifo_follows_due_time_within_a_priority(broker):
    """A task submitted later but due earlier is claimed first (the order is run_after)."""
    early_but_delayed = broker.submit("echo", delay=5, now=T0)[0].task_id
    late = broker.submit("echo", now=T0 + 1)[0].task_id
    order = [broker.claim("w1", now=T0 + 10)[0].task_id for _ in range(2)]
    assert order == [late, early_but_delayed]


def test_claim_limit_takes_the_best_tasks(broker):
    ids = {p: broker.submit("echo", priority=p, now=T0)[0].task_id for p in (0, 3, 1, 2)}
    claims = broker.claim("w1", limit=2, now=T0)
    assert sorted(c.task_id for c in claims) == sorted([ids[3], ids[2]])
    assert {c.priority for c in claims} == {3, 2}


def test_claim_batch_is_returned_in_claim_order(broker):
    """A batch comes back best first: the worker starts ``claim(limit=1 + prefetch)``'s
    claims in list order. (Regression: SQLite once returned the batch in RETURNING order,
    i.e. by id, and PostgreSQL re-sorted it by (-priority, id), ignoring run_after.)"""
    low = broker.submit("echo", priority=0, now=T0)[0].task_id
    high_due_late = broker.submit("echo", priority=5, delay=5, now=T0)[0].task_id
    high_a = broker.submit("echo", priority=5, now=T0 + 1)[0].task_id
    high_b = broker.submit("echo", priority=5, now=T0 + 1)[0].task_id
    claims = broker.claim("w1", limit=4, now=T0 + 10)
    assert [c.task_id for c in claims] == [high_a, high_b, high_due_late, low]
    assert [c.priority for c in claims] == [5, 5, 5, 0]


def test_queues_are_separate(broker):
    mine = broker.submit("echo", queue="a", now=T0)[0].task_id
    broker.submit("echo", queue="b", priority=9, now=T0)
    assert [c.task_id for c in broker.claim("w1", queue="a", limit=5, now=T0)] == [mine]
    assert broker.claim("w1", queue="c", now=T0) == []


# -- leader election -------------------------------------------------------------


def test_leader_role_is_held_until_its_ttl_passes(broker):
    assert broker.try_lead("reaper", "a", ttl=10, now=T0)
    assert not broker.try_lead("reaper", "b", ttl=10, now=T0 + 5)
    assert broker.try_lead("reaper", "a", ttl=10, now=T0 + 5)  # renewed: now held to T0+15
    assert not broker.try_lead("reaper", "b", ttl=10, now=T0 + 12)
    assert not broker.try_lead("reaper", "b", ttl=10, now=T0 + 15)
    assert broker.try_lead("reaper", "b", ttl=10, now=T0 + 15.5)
    assert not broker.try_lead("reaper", "a", ttl=10, now=T0 + 16)
    # Roles are independent.
    assert broker.try_lead("other-role", "a", ttl=10, now=T0 + 16)


# -- transactions -------------------------------------------------------------------


def test_calls_inside_one_transaction_commit_together(broker):
    with broker.transaction():
        task_id = broker.submit("echo", now=T0)[0].task_id
        (claim,) = broker.claim("w1", now=T0)
        assert broker.start(claim, now=T0)
    assert broker.get(task_id).state == S.RUNNING
    assert [e.type for e in broker.events(task_id)] == [
        "task.submitted",
        "task.claimed",
        "task.started",
    ]


def test_a_failed_transaction_leaves_neither_rows_nor_events(broker):
    """Broker calls join the caller's transaction, so they roll back with it."""
    task_id = queued(broker)
    row, log = broker.get(task_id), broker.events()
    with pytest.raises(RuntimeError), broker.transaction():
        broker.submit("echo", {"n": 2}, now=T0)
        (claim,) = broker.claim("w1", now=T0)
        broker.start(claim, now=T0)
        raise RuntimeError("the worker died mid-exchange")
    assert [t.id for t in broker.tasks()] == [task_id]
    assert broker.get(task_id) == row
    assert broker.events() == log


def test_an_illegal_move_inside_a_transaction_aborts_all_of_it(broker):
    task_id = failed(broker)
    other = queued(broker)
    row, log = broker.get(other), broker.events()
    with pytest.raises(IllegalTransition), broker.transaction():
        broker.cancel(other, now=T0)
        broker.cancel(task_id, now=T0)  # FAILED is terminal
    assert broker.get(other) == row
    assert broker.events() == log


def test_a_move_whose_event_cannot_be_written_is_not_made(broker, monkeypatch):
    """The state change and its event are one unit: if the event insert fails (disk
    full, a crash), the row must not have moved either."""
    from goclaw.errors import DatabaseError

    task_id, claim = claimed(broker)
    row, log = broker.get(task_id), broker.events(task_id)
    real = broker.db.executemany

    def failing(sql, rows):
        if "task_events" in sql:
            raise DatabaseError("simulated failure writing the event")
        return real(sql, rows)

    monkeypatch.setattr(broker.db, "executemany", failing)
    with pytest.raises(DatabaseError):
        broker.start(claim, now=T0)
    monkeypatch.undo()
    assert broker.events(task_id) == log
    assert broker.get(task_id) == row, "moved to RUNNING with no task.started event"


# -- the read side -----------------------------------------------------------------


def test_counts_expired_leases_and_queue_depth(broker):
    assert broker.counts() == {s.value: 0 for s in S}
    assert broker.queue_depth("default") == 0
    assert broker.expired_leases(now=T0) == 0
    # QUEUED last: the helpers claim whatever is due first in the default queue.
    leased = [claimed(broker)[0], claimed(broker)[0], running(broker)[0]]
    for state in (S.RETRY_WAIT, S.SUCCEEDED, S.FAILED, S.CANCELED, S.DEAD_LETTER, S.QUEUED):
        IN_STATE[state](broker)
    broker.submit("echo", queue="other", now=T0)

    counts = broker.counts()
    assert counts == {
        "QUEUED": 2,
        "CLAIMED": 2,
        "RUNNING": 1,
        "RETRY_WAIT": 1,
        "SUCCEEDED": 1,
        "FAILED": 1,
        "CANCELED": 1,
        "DEAD_LETTER": 1,
    }
    assert sum(counts.values()) == len(broker.tasks(limit=100)) == 10
    for state in S:
        assert len(broker.tasks(state=state)) == counts[state]

    assert broker.queue_depth("default") == 2  # QUEUED + RETRY_WAIT, due or not
    assert broker.queue_depth("other") == 1
    assert broker.queue_depth("nowhere") == 0

    assert broker.expired_leases(now=T0) == 0
    assert broker.expired_leases(now=T0 + LEASE) == 0  # expiry is strictly after
    assert broker.expired_leases(now=T0 + LEASE + 0.1) == 3
    assert sorted(broker.reap(now=T0 + LEASE + 0.1)) == sorted(leased)
    assert broker.expired_leases(now=T0 + LEASE + 0.1) == 0
    assert broker.counts()["QUEUED"] == 5
    assert broker.counts()["CLAIMED"] + broker.counts()["RUNNING"] == 0
    assert broker.queue_depth("default") == 5  # 4 QUEUED + 1 RETRY_WAIT
