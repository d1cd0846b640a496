"""Schedules in the database: the ones config.yaml declares, the ones added at runtime, history.

Every process that manages schedules (the scheduler, the CLI, the gateway)
goes through ``ScheduleStore``. Config schedules are owned by config.yaml:
``sync`` brings the table in line with it (adds, updates, removes), and the
CLI and ACP refuse to remove or redefine them. A schedule whose definition
changes starts afresh from that moment: its old fire times are not caught up
under the new definition.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from goclaw.cron.spec import ScheduleError, ScheduleSpec, check_name, spec_from_json
from goclaw.store.database import Database

log = logging.getLogger(__name__)

CONFIG = "config"
RUNTIME = "runtime"
HEARTBEAT = "heartbeat"
#: Sources config.yaml owns: ``sync`` writes them, people cannot remove them.
OWNED_BY_CONFIG = (CONFIG, HEARTBEAT)

QUEUED = "queued"
CATCH_UP = "catch_up"
SKIPPED = "skipped"
MANUAL = "manual"

_COLUMNS = "name, source, spec, enabled, created_at, updated_at, last_fire_at"


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    source: str
    spec: ScheduleSpec
    enabled: bool
    created_at: float
    updated_at: float
    last_fire_at: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "enabled": self.enabled,
            "spec": self.spec.as_json(),
            "describe": self.spec.describe(),
            "created_at": self.created_at,
            "last_fire_at": self.last_fire_at,
        }


@dataclasses.dataclass(frozen=True)
class Fire:
    schedule: str
    fire_at: float
    outcome: str
    task_id: int | None
    missed: int
    recorded_at: float
    #: The task's state now (None: no task, or it was purged).
    task_state: str | None = None

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ScheduleStore:
    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self._unreadable: set[tuple[str, str]] = set()

    # -- reading ---------------------------------------------------------------

    def get(self, name: str) -> Schedule | None:
        row = self.db.fetchone(f"SELECT {_COLUMNS} FROM schedules WHERE name = ?", (name,))
        return None if row is None else _schedule(row)

    def require(self, name: str) -> Schedule:
        schedule = self.get(name)
        if schedule is None:
            raise ScheduleError(f"no schedule named {name!r} (goclaw cron list shows them)")
        return schedule

    def list(self) -> list[Schedule]:
        """Every schedule that can be read; a row that cannot (a spec edited by hand in the
        database) is logged and left out, so one bad row never stops the others."""
        schedules = []
        for row in self.db.fetchall(f"SELECT {_COLUMNS} FROM schedules ORDER BY name"):
            try:
                schedules.append(_schedule(row))
            except (ScheduleError, ValueError) as exc:
                if (row[0], row[2]) not in self._unreadable:  # once, not at every tick
                    self._unreadable.add((row[0], row[2]))
                    log.error("schedule %s cannot be read and does not fire: %s", row[0], exc)
        return schedules

    def history(self, name: str, limit: int = 50) -> list[Fire]:
        """Fires newest first, each with its task's state as of now."""
        self.require(name)
        rows = self.db.fetchall(
            "SELECT f.schedule, f.fire_at, f.outcome, f.task_id, f.missed, f.recorded_at, "
            "t.state FROM schedule_fires f LEFT JOIN tasks t ON t.id = f.task_id "
            "WHERE f.schedule = ? ORDER BY f.fire_at DESC LIMIT ?",
            (name, limit),
        )
        return [Fire(r[0], float(r[1]), r[2], r[3], int(r[4]), float(r[5]), r[6]) for r in rows]

    # -- people's changes --------------------------------------------------------

    def add(self, name: str, spec: ScheduleSpec) -> Schedule:
        """A runtime schedule; it fires from now on (nothing before it is caught up)."""
        check_name(name)
        spec = spec_from_json(spec.as_json())  # the checks, also for a spec built by hand
        now = self.clock()
        with self.db.transaction():
            held = self.get(name)
            if held is not None:
                raise ScheduleError(
                    f"a schedule named {name!r} exists ({held.source}); remove it first"
                )
            self.db.execute(
                f"INSERT INTO schedules ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (name, RUNTIME, _dump(spec), int(spec.enabled), now, now),
            )
        return self.require(name)

    def remove(self, name: str) -> Schedule:
        with self.db.transaction():
            schedule = self.require(name)
            if schedule.source in OWNED_BY_CONFIG:
                raise ScheduleError(
                    f"{name!r} comes from config.yaml ({schedule.source}): remove it there, "
                    "or disable it"
                )
            self.db.execute("DELETE FROM schedules WHERE name = ?", (name,))
            # A schedule added again under this name starts with no history.
            self.db.execute("DELETE FROM schedule_fires WHERE schedule = ?", (name,))
        return schedule

    def set_enabled(self, name: str, enabled: bool) -> Schedule:
        """Enabling starts afresh from now: fires missed while disabled are not caught up."""
        now = self.clock()
        with self.db.transaction():
            schedule = self.require(name)
            if schedule.enabled == enabled:
                pass
            elif enabled:
                self.db.execute(
                    "UPDATE schedules SET enabled = 1, updated_at = ?, last_fire_at = ? "
                    "WHERE name = ?",
                    (now, max(schedule.last_fire_at or 0.0, now), name),
                )
            else:
                self.db.execute(
                    "UPDATE schedules SET enabled = 0, updated_at = ? WHERE name = ?", (now, name)
                )
        return self.require(name)

    # -- config.yaml ---------------------------------------------------------------

    def sync(self, declared: Mapping[str, tuple[str, ScheduleSpec]]) -> list[str]:
        """Make the config-owned rows match ``declared`` (name -> (source, spec)).

        Answers what changed, in words. A runtime schedule of a name config.yaml now
        declares is replaced by the config one (config wins, and it says so).
        """
        now = self.clock()
        changes = []
        with self.db.transaction():
            held = {s.name: s for s in self.list()}
            unreadable = {row[0] for row in self.db.fetchall("SELECT name FROM schedules")} - set(
                held
            )
            for name, (source, spec) in declared.items():
                old = held.get(name)
                if old is None and name not in unreadable:
                    self.db.execute(
                        f"INSERT INTO schedules ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL)",
                        (name, source, _dump(spec), int(spec.enabled), now, now),
                    )
                    changes.append(f"added {name}")
                elif old is None or old.source != source or old.spec != spec:
                    if old is not None and old.source == RUNTIME:
                        log.warning("config.yaml declares %s: it replaces the runtime one", name)
                    # `enabled` follows config.yaml only where config.yaml changed it: a
                    # `goclaw cron disable` survives an unrelated edit.
                    enabled = spec.enabled
                    if old is not None and old.spec.enabled == spec.enabled:
                        enabled = old.enabled
                    self.db.execute(
                        "UPDATE schedules SET source = ?, spec = ?, enabled = ?, updated_at = ?, "
                        "last_fire_at = ? WHERE name = ?",
                        (source, _dump(spec), int(enabled), now, now, name),
                    )
                    changes.append(f"updated {name}")
            for name, old in held.items():
                if old.source in OWNED_BY_CONFIG and name not in declared:
                    self.db.execute("DELETE FROM schedules WHERE name = ?", (name,))
                    changes.append(f"removed {name}")
        return changes


def _dump(spec: ScheduleSpec) -> str:
    return json.dumps(spec.as_json(), sort_keys=True)


@functools.lru_cache(maxsize=1024)
def _spec(text: str) -> ScheduleSpec:
    """Specs are immutable: each stored text is parsed and checked once, not at every tick."""
    return spec_from_json(json.loads(text))


def _schedule(row: Any) -> Schedule:
    return Schedule(
        name=row[0],
        source=row[1],
        spec=_spec(row[2]),
        enabled=bool(row[3]),
        created_at=float(row[4]),
        updated_at=float(row[5]),
        last_fire_at=None if row[6] is None else float(row[6]),
    )
