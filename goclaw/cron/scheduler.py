"""The scheduler's loop: each due fire time queues exactly one task, across restarts and peers.

Per schedule and tick, one transaction:

1. take the schedule's row lock (an ``UPDATE`` of the row: SQLite's write lock,
   PostgreSQL's row lock), so two schedulers take turns;
2. read ``last_fire_at`` and list the fire times in (``last_fire_at``, now];
3. queue a task for each fire time that is on time (at most
   ``misfire_grace_seconds`` late), with the idempotency key
   ``cron:<name>:<fire time>``; fire times older than that were *missed* (the
   scheduler was down): ``skip`` records them as one skipped window, ``run_once``
   queues one catch-up task for the latest of them;
4. record each outcome in ``schedule_fires`` and move ``last_fire_at``.

A scheduler killed anywhere in that commits all of it or none of it, and the
idempotency key makes a second scheduler, or a restarted one, find the task
already there. Nothing that goes wrong with one schedule stops the others or
the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from goclaw.agent.heartbeat import HEARTBEAT_KIND, heartbeat_session
from goclaw.agent.sessions import SessionStore
from goclaw.agent.turns import submit_turn
from goclaw.broker import Broker
from goclaw.config import Config, SchedulerSettings, load_config
from goclaw.cron.spec import ScheduleSpec, parse_spec
from goclaw.cron.store import (
    CATCH_UP,
    CONFIG,
    HEARTBEAT,
    MANUAL,
    QUEUED,
    SKIPPED,
    Schedule,
    ScheduleStore,
)
from goclaw.errors import ConfigError
from goclaw.filewatch import stamp

log = logging.getLogger(__name__)

#: More missed fire times than this in one window are counted, not listed one by one.
MAX_FIRES_PER_TICK = 100_000


@dataclasses.dataclass(frozen=True)
class Fired:
    schedule: str
    fire_at: float
    outcome: str
    task_id: int | None
    missed: int = 0


def declared_schedules(config: Config) -> dict[str, tuple[str, ScheduleSpec]]:
    """What config.yaml declares: its ``cron`` entries and each agent's heartbeat."""
    declared: dict[str, tuple[str, ScheduleSpec]] = {
        name: (CONFIG, spec) for name, spec in config.cron.items()
    }
    for agent_id, agent in config.agents.items():
        if agent.heartbeat_every:
            declared[f"heartbeat.{agent_id}"] = (HEARTBEAT, heartbeat_spec(agent_id, config))
    return declared


def heartbeat_spec(agent_id: str, config: Config) -> ScheduleSpec:
    agent = config.agents[agent_id]
    raw: dict[str, Any] = {
        "every": agent.heartbeat_every,
        "timezone": agent.heartbeat_timezone,
        "kind": HEARTBEAT_KIND,
        "args": {"agent": agent_id},
    }
    if agent.heartbeat_active_hours:
        raw["active_hours"] = agent.heartbeat_active_hours
    return parse_spec(raw, f"agents.{agent_id}.heartbeat")


class Scheduler:
    def __init__(
        self,
        broker: Broker,
        settings: SchedulerSettings,
        *,
        queue: str = "default",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.queue = queue
        self.clock = clock
        self.store = ScheduleStore(broker.db, clock=clock)

    # -- one pass ----------------------------------------------------------------

    def tick(self) -> list[Fired]:
        """Handle every enabled schedule's due fire times once; answer what was done."""
        now = self.clock()
        fired: list[Fired] = []
        for schedule in self.store.list():  # a row that cannot be read is logged and left out
            name = schedule.name
            # Read without a lock first: most ticks find nothing due, and must not cost a
            # write transaction (a commit per schedule per second) to find that out.
            since = schedule.last_fire_at or schedule.created_at
            if not schedule.enabled or next(schedule.spec.fires(since, now), None) is None:
                continue
            try:
                fired += self.fire_due(name, now)
            except Exception:  # one broken schedule must not stop the others
                log.exception("schedule %s: firing failed; the next tick tries again", name)
        return fired

    def fire_due(self, name: str, now: float) -> list[Fired]:
        db = self.broker.db
        grace = self.settings.misfire_grace_seconds
        with db.transaction():
            # Lock the row before reading it: a peer scheduler waits here, then sees ours.
            db.execute("UPDATE schedules SET updated_at = updated_at WHERE name = ?", (name,))
            schedule = self.store.get(name)
            if schedule is None or not schedule.enabled:
                return []
            since = schedule.last_fire_at or schedule.created_at
            due = _due(schedule.spec, since, now)
            if not due:
                return []
            missed = [t for t in due if now - t > grace]
            fired: list[Fired] = []
            if missed:
                if schedule.spec.misfire == "run_once":
                    fired.append(self._queue(schedule, missed[-1], CATCH_UP, len(missed)))
                else:
                    fired.append(self._record(schedule.name, missed[0], SKIPPED, None, len(missed)))
            for fire_at in due[len(missed) :]:
                fired.append(self._queue(schedule, fire_at, QUEUED))
            db.execute(
                "UPDATE schedules SET last_fire_at = ? WHERE name = ?", (due[-1], schedule.name)
            )
        for fire in fired:
            _log_fire(fire)
        return fired

    def run_now(self, name: str) -> Fired:
        """Queue the schedule's work now, outside its times (``goclaw cron run-now``)."""
        now = self.clock()
        with self.broker.db.transaction():
            schedule = self.store.require(name)
            # Its own key: a manual run never stands in for a scheduled fire time.
            task_id = submit_fire(
                self.broker, schedule, now, queue=self.queue, key=f"cron:{name}:manual:{now!r}"
            )
            fired = self._record(name, now, MANUAL, task_id, 0)
        _log_fire(fired)
        return fired

    # -- queueing ------------------------------------------------------------------

    def _queue(self, schedule: Schedule, fire_at: float, outcome: str, missed: int = 0) -> Fired:
        task_id = submit_fire(self.broker, schedule, fire_at, queue=self.queue)
        return self._record(schedule.name, fire_at, outcome, task_id, missed)

    def _record(
        self, name: str, fire_at: float, outcome: str, task_id: int | None, missed: int
    ) -> Fired:
        self.broker.db.execute(
            "INSERT INTO schedule_fires (schedule, fire_at, outcome, task_id, missed, "
            "recorded_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (schedule, fire_at) DO NOTHING",
            (name, fire_at, outcome, task_id, missed, self.clock()),
        )
        return Fired(name, fire_at, outcome, task_id, missed)

    # -- the process ---------------------------------------------------------------

    def run(self, config: Config, stop: threading.Event) -> None:
        """Tick until ``stop``; re-read config.yaml when it changes (a bad edit is logged
        and the schedules stay as they were)."""
        watched = config.path or config.home / "config.yaml"
        seen = stamp(watched)
        self.sync(config)
        while not stop.is_set():
            current = stamp(watched)
            if current != seen:
                seen = current
                config = self._reload(config) or config
            self.tick()
            stop.wait(self.settings.tick_seconds)

    def sync(self, config: Config) -> None:
        changes = self.store.sync(declared_schedules(config))
        if changes:
            log.info("schedules from config.yaml: %s", "; ".join(changes))

    def _reload(self, config: Config) -> Config | None:
        try:
            fresh = load_config(config.home, config.path)
            self.sync(fresh)
        except ConfigError as exc:
            log.warning("config.yaml not applied, the schedules stay as they were: %s", exc)
            return None
        return fresh


def submit_fire(
    broker: Broker, schedule: Schedule, fire_at: float, *, queue: str, key: str | None = None
) -> int:
    """Queue one fire's task, idempotently: the key is the schedule and the fire time."""
    spec = schedule.spec
    key = key or f"cron:{schedule.name}:{fire_at:.0f}"
    if spec.prompt is not None:
        submitted, _ = submit_turn(
            broker,
            agent=spec.agent or "default",
            prompt=spec.prompt,
            session=key,
            queue=queue,
            idempotency_key=key,
        )
        return submitted.task_id
    assert spec.kind is not None
    session = None
    if spec.kind == HEARTBEAT_KIND:  # its turn runs in the agent's heartbeat session
        agent = str(spec.args.get("agent", "default"))
        session = heartbeat_session(agent)
    with broker.transaction():
        if session is not None:
            SessionStore(broker.db).ensure(session, agent)
        [submitted] = broker.submit(
            spec.kind, dict(spec.args), queue=queue, idempotency_key=key, session_key=session
        )
    return submitted.task_id


def _due(spec: ScheduleSpec, since: float, now: float) -> list[float]:
    due = []
    for fire_at in spec.fires(since, now):
        due.append(fire_at)
        if len(due) >= MAX_FIRES_PER_TICK:
            break
    return due


def _log_fire(fire: Fired) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(fire.fire_at))
    if fire.outcome == SKIPPED:
        log.warning(
            "schedule %s: %d fire(s) from %s UTC were missed (misfire: skip)",
            fire.schedule,
            fire.missed,
            when,
        )
    else:
        extra = f" (catching up {fire.missed} missed)" if fire.missed else ""
        log.info("schedule %s: %s UTC -> task %s%s", fire.schedule, when, fire.task_id, extra)
