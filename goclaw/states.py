"""The task lifecycle: eight states and the only moves between them.

The enum values are the strings stored in the database. Every move the broker
makes is checked against ``ALLOWED`` before it touches a row, and the row
update itself is guarded by the expected from-state, so an illegal move can
neither be requested nor slip through a race.
"""

from __future__ import annotations

import enum


class TaskState(enum.StrEnum):
    QUEUED = "QUEUED"
    CLAIMED = "CLAIMED"
    RUNNING = "RUNNING"
    RETRY_WAIT = "RETRY_WAIT"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    DEAD_LETTER = "DEAD_LETTER"


Q, C, R, W = TaskState.QUEUED, TaskState.CLAIMED, TaskState.RUNNING, TaskState.RETRY_WAIT
S, F, X, D = TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELED, TaskState.DEAD_LETTER

#: from-state -> the states it may move to.
ALLOWED: dict[TaskState, frozenset[TaskState]] = {
    Q: frozenset({C, X}),
    # A claim can be lost (lease expiry, shutdown), rejected before it runs
    # (unknown kind, bad payload), exhausted by crashes, or canceled.
    C: frozenset({R, Q, F, X, D}),
    R: frozenset({S, W, F, D, Q, X}),
    # Claimed directly once run_after passes: the visible wait ends in a claim.
    W: frozenset({C, X}),
    S: frozenset(),
    # An operator may re-queue a failed or dead-lettered task (goclaw task retry).
    F: frozenset({Q}),
    X: frozenset(),
    D: frozenset({Q}),
}

TERMINAL: frozenset[TaskState] = frozenset({S, F, X, D})
LEASED: frozenset[TaskState] = frozenset({C, R})
CLAIMABLE: frozenset[TaskState] = frozenset({Q, W})
CANCELABLE: frozenset[TaskState] = frozenset(s for s in TaskState if X in ALLOWED[s])


def is_allowed(current: TaskState | str, wanted: TaskState | str) -> bool:
    return TaskState(wanted) in ALLOWED[TaskState(current)]


class Reason(enum.StrEnum):
    """Reason codes carried by FAILED, DEAD_LETTER and CANCELED tasks."""

    UNKNOWN_KIND = "unknown_kind"
    BAD_PAYLOAD = "bad_payload"
    BAD_INPUT = "bad_input"
    RETRIES_EXHAUSTED = "retries_exhausted"
    POISON_PILL = "poison_pill"
    LEASE_EXPIRED = "lease_expired"
    CANCELED = "canceled"
