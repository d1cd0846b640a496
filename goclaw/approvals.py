"""Durable approvals: a human's yes or no to one gated tool call, and standing yeses.

When the policy says ``ask`` for a tool, the agent turn does not wait in a
worker thread. It writes an approval request here (one row per task and tool
call, so a retried attempt finds the same request), and its task *parks*:
it gives up its lease and worker slot and sits in RETRY_WAIT until the
request's deadline. Whoever answers (``goclaw approvals approve``, ACP
``approval.respond``) updates the row and wakes the task in the same
commit; the next attempt of the turn reads the answer and runs, or refuses,
the call. Nothing lives in memory, so any process may die at any point:

- before the request commits, the retried turn asks again (same row key);
- after it, the row and the parked task are both durable;
- an answer commits with the wake, so a task never sleeps past an answer;
- an unanswered request is denied once its deadline passes (the parked task
  falls due exactly then, and the turn records the expiry).

An allow-always answer also stores a rule for (agent, capability, subject);
later calls that match it need no human. Rules are listed and revoked like
approvals. Every answer, expiry and revocation is audited.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from goclaw.audit import AuditLog
from goclaw.broker import Broker
from goclaw.errors import GoclawError
from goclaw.records import iso
from goclaw.states import TERMINAL

PENDING, APPROVED, DENIED, EXPIRED = "pending", "approved", "denied", "expired"
STATES = (PENDING, APPROVED, DENIED, EXPIRED)
#: ``once`` approves this call; ``always`` also stores a rule for the same subject.
SCOPES = ("once", "always")
#: The capability recorded for a rule's revocation in the audit log.
REVOKE_CAPABILITY = "approval.rule"

_APPROVAL_COLUMNS = (
    "id, task_id, call_id, agent, session_key, capability, subject, arguments, "
    "policy_version, state, scope, created_at, expires_at, decided_at, decided_by, note"
)
_RULE_COLUMNS = "id, agent, capability, subject, created_at, created_by, approval_id"
_TERMINAL_SQL = "(" + ", ".join(f"'{state}'" for state in sorted(TERMINAL)) + ")"


class ApprovalError(GoclawError):
    """The approval cannot be answered that way."""

    def __init__(self, message: str, code: str = "conflict") -> None:
        super().__init__(message)
        #: ``not_found`` or ``conflict`` (already answered, or expired).
        self.code = code


@dataclasses.dataclass(frozen=True)
class Approval:
    id: int
    task_id: int
    call_id: str
    agent: str
    session_key: str | None
    capability: str
    subject: str
    arguments: dict[str, Any]
    policy_version: str
    state: str
    scope: str | None
    created_at: float
    expires_at: float
    decided_at: float | None
    decided_by: str | None
    note: str | None

    @classmethod
    def from_row(cls, row: tuple) -> Approval:
        values = list(row)
        values[7] = json.loads(values[7])
        return cls(*values)

    def state_at(self, now: float) -> str:
        """The stored state, except that a pending request past its deadline is expired."""
        if self.state == PENDING and now >= self.expires_at:
            return EXPIRED
        return self.state

    def as_json(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        data = dataclasses.asdict(self)
        data["state"] = self.state_at(now)
        data["created_at"] = iso(self.created_at)
        data["expires_at"] = iso(self.expires_at)
        data["decided_at"] = iso(self.decided_at) if self.decided_at else None
        return data


@dataclasses.dataclass(frozen=True)
class AllowRule:
    id: int
    agent: str
    capability: str
    subject: str
    created_at: float
    created_by: str
    approval_id: int | None

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["created_at"] = iso(self.created_at)
        return data


class Approvals:
    """The approval table and the rule table, over the broker (which wakes parked tasks)."""

    def __init__(
        self,
        broker: Broker,
        audit: AuditLog | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        self.db = broker.db
        self.audit = audit
        self.clock = clock
        self._for_update = "" if self.db.is_sqlite else " FOR UPDATE"

    # -- asking (the agent turn) ----------------------------------------------

    def request(
        self,
        *,
        task_id: int,
        call_id: str,
        agent: str,
        session_key: str | None,
        capability: str,
        subject: str,
        arguments: dict[str, Any],
        policy_version: str,
        timeout: float,
    ) -> tuple[Approval, bool]:
        """The request for this call, created if there is none; True when created now."""
        now = self.clock()
        with self.broker.transaction():
            existing = self.for_call(task_id, call_id)
            if existing is not None:
                return existing, False
            row = self.db.fetchone(
                "INSERT INTO approvals (task_id, call_id, agent, session_key, capability, "
                "subject, arguments, policy_version, state, created_at, expires_at) "
                f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {_APPROVAL_COLUMNS}",
                (
                    task_id,
                    call_id,
                    agent,
                    session_key,
                    capability,
                    subject,
                    json.dumps(arguments, ensure_ascii=False, sort_keys=True, default=str),
                    policy_version,
                    PENDING,
                    now,
                    now + timeout,
                ),
            )
        return Approval.from_row(row), True

    def for_call(self, task_id: int, call_id: str) -> Approval | None:
        row = self.db.fetchone(
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE task_id = ? AND call_id = ?",
            (task_id, call_id),
        )
        return None if row is None else Approval.from_row(row)

    def expire(self, approval: Approval) -> Approval:
        """Record that ``approval`` ran out of time (a denial); idempotent."""
        now = self.clock()
        with self.broker.transaction():
            row = self.db.fetchone(
                "UPDATE approvals SET state = ?, decided_at = ?, decided_by = ? "
                f"WHERE id = ? AND state = ? RETURNING {_APPROVAL_COLUMNS}",
                (EXPIRED, now, "timeout", approval.id, PENDING),
            )
            if row is None:
                return self.get(approval.id)
            expired = Approval.from_row(row)
            self._audit(expired, "deny", "no answer before the deadline: denied")
        return expired

    def rule_for(self, agent: str, capability: str, subject: str) -> AllowRule | None:
        """The allow-always rule covering this exact call, if a human made one."""
        row = self.db.fetchone(
            f"SELECT {_RULE_COLUMNS} FROM approval_rules "
            "WHERE agent = ? AND capability = ? AND subject = ?",
            (agent, capability, subject),
        )
        return None if row is None else AllowRule(*row)

    # -- answering (CLI, ACP) -------------------------------------------------

    def get(self, approval_id: int) -> Approval:
        row = self.db.fetchone(
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE id = ?", (approval_id,)
        )
        if row is None:
            raise ApprovalError(f"approval {approval_id} does not exist", code="not_found")
        return Approval.from_row(row)

    def list(self, *, state: str | None = PENDING, limit: int = 100) -> list[Approval]:
        """Newest first; ``state`` as ``state_at`` reports it (None: every state)."""
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        now = self.clock()
        if state is None:
            where, params = "", ()
        elif state == PENDING:
            # A canceled (or otherwise ended) task waits for nothing any more.
            where = (
                "WHERE state = ? AND expires_at > ? AND task_id IN "
                f"(SELECT id FROM tasks WHERE state NOT IN {_TERMINAL_SQL})"
            )
            params = (PENDING, now)
        elif state == EXPIRED:
            where = "WHERE state = ? OR (state = ? AND expires_at <= ?)"
            params = (EXPIRED, PENDING, now)
        else:
            where, params = "WHERE state = ?", (state,)
        rows = self.db.fetchall(
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals {where} ORDER BY id DESC LIMIT ?",
            (*params, int(limit)),
        )
        return [Approval.from_row(r) for r in rows]

    def respond(
        self,
        approval_id: int,
        *,
        approve: bool,
        by: str,
        scope: str = "once",
        note: str = "",
    ) -> Approval:
        """Answer a pending request and wake its task, in one commit.

        Raises ``ApprovalError`` (``conflict``) when the request was already
        answered or its deadline passed: a late yes must not run a call that
        the turn may already have reported as denied.
        """
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        now = self.clock()
        with self.broker.transaction():
            row = self.db.fetchone(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE id = ?{self._for_update}",
                (approval_id,),
            )
            if row is None:
                raise ApprovalError(f"approval {approval_id} does not exist", code="not_found")
            current = Approval.from_row(row)
            state = current.state_at(now)
            if state != PENDING:
                raise ApprovalError(f"approval {approval_id} is already {state}")
            task = self.broker.get(current.task_id)
            if task.state in TERMINAL:
                raise ApprovalError(
                    f"approval {approval_id}: task {task.id} is {task.state}, nothing waits "
                    "for this answer"
                )
            answer = APPROVED if approve else DENIED
            row = self.db.fetchone(
                "UPDATE approvals SET state = ?, scope = ?, decided_at = ?, decided_by = ?, "
                f"note = ? WHERE id = ? RETURNING {_APPROVAL_COLUMNS}",
                (answer, scope if approve else None, now, by, note or None, approval_id),
            )
            answered = Approval.from_row(row)
            if approve and scope == "always":
                self._add_rule(answered, by, now)
            how = f"{answer} by {by}" + (f" ({scope})" if approve else "")
            reason = f"{how}: {note}" if note else how
            self._audit(answered, "approve" if approve else "deny", reason)
            self.broker.note(
                answered.task_id,
                "approval.resolved",
                {
                    "approval_id": answered.id,
                    "call_id": answered.call_id,
                    "state": answer,
                    "scope": answered.scope,
                    "by": by,
                },
                now=now,
            )
            self.broker.wake(answered.task_id, why=f"approval {approval_id} {answer}", now=now)
        return answered

    def rules(self) -> list[AllowRule]:
        rows = self.db.fetchall(f"SELECT {_RULE_COLUMNS} FROM approval_rules ORDER BY id")
        return [AllowRule(*r) for r in rows]

    def revoke_rule(self, rule_id: int, *, by: str, policy_version: str = "-") -> AllowRule:
        with self.broker.transaction():
            row = self.db.fetchone(
                f"DELETE FROM approval_rules WHERE id = ? RETURNING {_RULE_COLUMNS}", (rule_id,)
            )
            if row is None:
                raise ApprovalError(f"rule {rule_id} does not exist", code="not_found")
            rule = AllowRule(*row)
            if self.audit is not None:
                self.audit.record(
                    agent=rule.agent,
                    task_id=None,
                    session=None,
                    capability=REVOKE_CAPABILITY,
                    subject=f"{rule.capability} {rule.subject}",
                    decision="revoke",
                    reason=f"allow-always rule {rule.id} revoked by {by}",
                    policy_version=policy_version,
                )
        return rule

    # -- internals ------------------------------------------------------------

    def _add_rule(self, approval: Approval, by: str, now: float) -> None:
        if self.rule_for(approval.agent, approval.capability, approval.subject) is not None:
            return
        self.db.execute(
            "INSERT INTO approval_rules (agent, capability, subject, created_at, created_by, "
            "approval_id) VALUES (?, ?, ?, ?, ?, ?)",
            (approval.agent, approval.capability, approval.subject, now, by, approval.id),
        )

    def _audit(self, approval: Approval, decision: str, reason: str) -> None:
        """Answers are recorded under the policy version the request was made under."""
        if self.audit is None:
            return
        self.audit.record(
            agent=approval.agent,
            task_id=approval.task_id,
            session=approval.session_key,
            capability=approval.capability,
            subject=approval.subject or "-",
            decision=decision,
            reason=f"approval {approval.id}: {reason}",
            policy_version=approval.policy_version,
        )
