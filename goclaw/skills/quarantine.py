"""Skill faults, kept in the database, and the quarantine they lead to.

A fault is written, audited and counted in one transaction: when the count of
faults within the window (since the last ``enable``, if later) reaches the
threshold, the same commit quarantines the skill. The quarantine is a row, so
it holds for every worker and survives restarts; only ``enable`` lifts it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from goclaw.audit import AuditLog
from goclaw.config import SkillSettings
from goclaw.store.database import Database

#: The audit decisions this module writes (capability ``skills.<name>``).
FAULT = "fault"
QUARANTINE = "quarantine"
ENABLE = "enable"


@dataclasses.dataclass(frozen=True)
class Fault:
    id: int
    skill: str
    code: str
    message: str
    task_id: int | None
    agent: str | None
    at: float


@dataclasses.dataclass(frozen=True)
class Quarantine:
    skill: str
    since: float
    reason: str


class SkillHealth:
    def __init__(
        self,
        db: Database,
        audit: AuditLog | None,
        settings: SkillSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.audit = audit
        self.settings = settings
        self.clock = clock

    def record_fault(
        self,
        skill: str,
        code: str,
        message: str,
        *,
        agent: str,
        task_id: int | None,
        session: str | None,
        policy_version: str,
    ) -> Quarantine | None:
        """Keep the fault; answer the quarantine it brought about, if it did."""
        now = self.clock()
        audit = {
            "agent": agent,
            "task_id": task_id,
            "session": session,
            "capability": f"skills.{skill}",
            "subject": skill,
            "policy_version": policy_version,
        }
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO skill_faults (skill, code, message, task_id, agent, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (skill, code, message, task_id, agent, now),
            )
            if self.audit is not None:
                self.audit.record(**audit, decision=FAULT, reason=f"{code}: {message}")
            row = self.db.fetchone(
                "SELECT quarantined_at, lifted_at FROM skill_quarantine WHERE skill = ?", (skill,)
            )
            if row is not None and row[0] is not None:
                return None  # already quarantined (a call that started before it was)
            since = now - self.settings.quarantine_window_seconds
            if row is not None and row[1] is not None:
                since = max(since, float(row[1]))
            count = int(
                self.db.fetchone(
                    "SELECT COUNT(*) FROM skill_faults WHERE skill = ? AND at > ?", (skill, since)
                )[0]
            )
            if count < self.settings.quarantine_faults:
                return None
            reason = (
                f"{count} faults within {self.settings.quarantine_window_seconds:g} s, "
                f"the last {code}: {message}"
            )
            self.db.execute(
                "INSERT INTO skill_quarantine (skill, quarantined_at, reason) VALUES (?, ?, ?) "
                "ON CONFLICT (skill) DO UPDATE SET quarantined_at = excluded.quarantined_at, "
                "reason = excluded.reason",
                (skill, now, reason),
            )
            if self.audit is not None:
                self.audit.record(**audit, decision=QUARANTINE, reason=reason)
        return Quarantine(skill=skill, since=now, reason=reason)

    def quarantine_of(self, skill: str) -> Quarantine | None:
        row = self.db.fetchone(
            "SELECT quarantined_at, reason FROM skill_quarantine "
            "WHERE skill = ? AND quarantined_at IS NOT NULL",
            (skill,),
        )
        return None if row is None else Quarantine(skill, float(row[0]), row[1] or "")

    def quarantined(self) -> dict[str, Quarantine]:
        rows = self.db.fetchall(
            "SELECT skill, quarantined_at, reason FROM skill_quarantine "
            "WHERE quarantined_at IS NOT NULL ORDER BY skill"
        )
        return {r[0]: Quarantine(r[0], float(r[1]), r[2] or "") for r in rows}

    def enable(self, skill: str, *, by: str) -> Quarantine | None:
        """Lift the quarantine (answer the one lifted, or None if there was none).

        Earlier faults stop counting, so the skill starts with a clean slate.
        """
        now = self.clock()
        with self.db.transaction():
            row = self.db.fetchone(
                "SELECT quarantined_at, reason FROM skill_quarantine WHERE skill = ?", (skill,)
            )
            lifted = None
            if row is not None and row[0] is not None:
                lifted = Quarantine(skill, float(row[0]), row[1] or "")
            self.db.execute(
                "INSERT INTO skill_quarantine (skill, quarantined_at, lifted_at, lifted_by) "
                "VALUES (?, NULL, ?, ?) ON CONFLICT (skill) DO UPDATE SET "
                "quarantined_at = NULL, lifted_at = excluded.lifted_at, "
                "lifted_by = excluded.lifted_by",
                (skill, now, by),
            )
            if self.audit is not None and lifted is not None:
                self.audit.record(
                    agent="-",
                    task_id=None,
                    session=None,
                    capability=f"skills.{skill}",
                    subject=skill,
                    decision=ENABLE,
                    reason=f"quarantine lifted by {by}",
                    policy_version="-",
                )
        return lifted

    def faults(self, skill: str, limit: int = 20) -> list[Fault]:
        rows = self.db.fetchall(
            "SELECT id, skill, code, message, task_id, agent, at FROM skill_faults "
            "WHERE skill = ? ORDER BY id DESC LIMIT ?",
            (skill, limit),
        )
        return [Fault(int(r[0]), r[1], r[2], r[3], r[4], r[5], float(r[6])) for r in rows]
