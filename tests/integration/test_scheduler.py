"""The scheduler against a real database (SQLite and PostgreSQL): one task per fire time.

The clock is a ``Clock`` cell the test moves; nothing sleeps. Idempotency keys are
``cron:<name>:<fire epoch>``, so the keys of the tasks are the fire times.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from goclaw.agent.turns import AGENT_KIND
from goclaw.broker import Broker, decode_payload
from goclaw.config import SchedulerSettings, load_config
from goclaw.cron.scheduler import Fired, Scheduler, declared_schedules
from goclaw.cron.spec import ScheduleError, ScheduleSpec, parse_spec
from goclaw.cron.store import CONFIG, HEARTBEAT, RUNTIME, ScheduleStore
from goclaw.errors import ConfigError
from goclaw.store.database import Database

SETTINGS = SchedulerSettings(tick_seconds=1, misfire_grace_seconds=60)
#: Monday 2026-01-05 00:00 UTC: aligned to the minute, the hour and the day.
T0 = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp())


class Clock:
    """What the scheduler thinks the time is; the test moves it."""

    def __init__(self, now: float) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now


def utc(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp())


def spec(**raw: Any) -> ScheduleSpec:
    return parse_spec(raw, "test")


def scheduler(broker: Broker, clock: Clock) -> Scheduler:
    return Scheduler(broker, SETTINGS, clock=clock)


def keys(name: str, times: Iterable[float]) -> list[str]:
    return [f"cron:{name}:{int(t)}" for t in times]


def task_keys(broker: Broker) -> list[str]:
    rows = broker.db.fetchall("SELECT idempotency_key FROM tasks ORDER BY id")
    return [row[0] for row in rows]


def task_count(broker: Broker) -> int:
    return sum(broker.counts().values())


def outcomes(store: ScheduleStore, name: str) -> list[tuple[float, str, int]]:
    """History, newest first, as (fire time, outcome, missed)."""
    return [(f.fire_at, f.outcome, f.missed) for f in store.history(name, limit=1000)]


def random_ticks(start: float, end: float, seed: int = 20260105) -> list[float]:
    """Tick times from ``start`` to ``end`` (both included), 1..20 s apart."""
    rng = random.Random(seed)
    times, now = [], start
    while now < end:
        times.append(now)
        now += rng.randint(1, 20)
    return [*times, end]


def tick_through(sched: Scheduler, clock: Clock, times: Iterable[float]) -> list[Fired]:
    fired: list[Fired] = []
    for now in times:
        clock.now = now
        fired += sched.tick()
    return fired


@pytest.fixture
def peer(database_url, broker, settings) -> Iterator[Broker]:
    """A second broker on its own connection to the same database: another process."""
    other = Broker(Database(database_url), settings)
    yield other
    other.close()


# -- exactly once -----------------------------------------------------------------------


def test_every_minute_for_an_hour_queues_sixty_tasks(broker) -> None:
    clock = Clock(T0)
    sched = scheduler(broker, clock)
    sched.store.add("minutely", spec(schedule="* * * * *", kind="ping", args={"n": 1}))
    ticks = random_ticks(T0, T0 + 3600)
    assert len(ticks) > 300
    fired = tick_through(sched, clock, ticks)
    fire_times = [T0 + 60 * i for i in range(1, 61)]
    assert [(f.fire_at, f.outcome, f.missed) for f in fired] == [
        (t, "queued", 0) for t in fire_times
    ]
    assert task_keys(broker) == keys("minutely", fire_times)
    assert broker.counts()["QUEUED"] == 60 == task_count(broker)
    task = broker.get(fired[0].task_id)
    assert (task.kind, task.queue, decode_payload(task.payload)) == (
        "ping",
        "default",
        ([], {"n": 1}),
    )
    assert sched.store.require("minutely").last_fire_at == T0 + 3600
    history = sched.store.history("minutely", limit=100)
    assert [f.fire_at for f in history] == fire_times[::-1]
    assert {(f.outcome, f.missed, f.task_state) for f in history} == {("queued", 0, "QUEUED")}
    assert [f.task_id for f in history] == [f.task_id for f in fired][::-1]
    # Ticking again at the same time, or earlier, queues nothing more.
    assert sched.tick() == []
    clock.now = T0 + 1800
    assert sched.tick() == []
    assert task_count(broker) == 60


def test_a_late_tick_within_the_grace_still_queues(broker) -> None:
    clock = Clock(T0)
    sched = scheduler(broker, clock)
    sched.store.add("m", spec(every="1m", kind="k", misfire="skip"))
    # 60 s late exactly is on time (the grace is 60 s); 61 s is missed.
    clock.now = T0 + 120
    assert [(f.fire_at, f.outcome) for f in sched.tick()] == [
        (T0 + 60, "queued"),
        (T0 + 120, "queued"),
    ]
    clock.now = T0 + 241
    assert [(f.fire_at, f.outcome, f.missed) for f in sched.tick()] == [
        (T0 + 180, "skipped", 1),
        (T0 + 240, "queued", 0),
    ]
    assert task_keys(broker) == keys("m", [T0 + 60, T0 + 120, T0 + 240])


def test_two_schedulers_ticking_alternately(broker, peer) -> None:
    clock_a, clock_b = Clock(T0), Clock(T0)
    a, b = scheduler(broker, clock_a), scheduler(peer, clock_b)
    a.store.add("minutely", spec(schedule="* * * * *", kind="k"))
    b.store.add("quarter", spec(every="15m", kind="k"))
    fired: list[Fired] = []
    for i, now in enumerate(random_ticks(T0, T0 + 3600, seed=7)):
        clock_a.now, clock_b.now = now, now - 3  # b's clock runs 3 s behind a's
        fired += a.tick() if i % 2 == 0 else b.tick()
    clock_a.now = clock_b.now = T0 + 3600
    fired += a.tick() + b.tick()
    minutes = [T0 + 60 * i for i in range(1, 61)]
    quarters = [T0 + 900 * i for i in range(1, 5)]
    assert sorted(f.fire_at for f in fired if f.schedule == "minutely") == minutes
    assert sorted(f.fire_at for f in fired if f.schedule == "quarter") == quarters
    assert sorted(task_keys(broker)) == sorted(
        keys("minutely", minutes) + keys("quarter", quarters)
    )
    assert task_count(broker) == 64
    assert {f.outcome for f in fired} == {"queued"}


def test_two_schedulers_ticking_concurrently(broker, peer) -> None:
    setup = ScheduleStore(broker.db, clock=lambda: T0)
    setup.add("minutely", spec(schedule="* * * * *", kind="k"))
    setup.add("half", spec(every="30s", kind="k", misfire="run_once"))
    ticks = [T0 + 5 * i for i in range(1, 361)]  # 30 minutes, every 5 s
    barrier = threading.Barrier(2, timeout=30)
    results: dict[str, list[Fired]] = {}
    errors: list[BaseException] = []

    def run(name: str, owner: Broker) -> None:
        clock = Clock(T0)
        sched = scheduler(owner, clock)
        fired: list[Fired] = []
        try:
            for now in ticks:
                clock.now = now
                barrier.wait()  # both tick the same instant: they race for every fire
                fired += sched.tick()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            owner.db.close()  # this thread's connection
        results[name] = fired

    threads = [
        threading.Thread(target=run, args=("a", broker)),
        threading.Thread(target=run, args=("b", peer)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    fired = results["a"] + results["b"]
    minutes = [T0 + 60 * i for i in range(1, 31)]
    halves = [T0 + 30 * i for i in range(1, 61)]
    assert sorted(f.fire_at for f in fired if f.schedule == "minutely") == minutes
    assert sorted(f.fire_at for f in fired if f.schedule == "half") == halves
    assert {f.outcome for f in fired} == {"queued"}
    assert sorted(task_keys(broker)) == sorted(keys("minutely", minutes) + keys("half", halves))
    assert len(set(task_keys(broker))) == task_count(broker) == 90
    store = ScheduleStore(broker.db)
    assert len(store.history("minutely", limit=1000)) == 30
    assert len(store.history("half", limit=1000)) == 60


def test_a_restart_continues_without_duplicates_or_gaps(broker, peer) -> None:
    clock = Clock(T0)
    first = scheduler(broker, clock)
    first.store.add("minutely", spec(schedule="* * * * *", kind="k"))
    ticks = random_ticks(T0, T0 + 3600, seed=99)
    half = [t for t in ticks if t <= T0 + 1830]
    tick_through(first, clock, half)
    assert first.store.require("minutely").last_fire_at == T0 + 1800
    del first
    # The new process starts 50 s later (within the grace): the fire at 1860 is on time.
    restarted = Clock(T0 + 1880)
    second = scheduler(peer, restarted)
    fired = tick_through(second, restarted, [T0 + 1880, *[t for t in ticks if t > T0 + 1880]])
    assert fired[0].fire_at == T0 + 1860
    assert [f.fire_at for f in fired] == [T0 + 60 * i for i in range(31, 61)]
    assert {f.outcome for f in fired} == {"queued"}
    assert task_keys(broker) == keys("minutely", [T0 + 60 * i for i in range(1, 61)])


# -- missed fires -------------------------------------------------------------------------


@pytest.mark.parametrize("misfire", ["skip", "run_once"])
def test_downtime_over_ten_fires(broker, misfire: str) -> None:
    clock = Clock(T0)
    sched = scheduler(broker, clock)
    sched.store.add("m", spec(schedule="* * * * *", kind="k", misfire=misfire))
    clock.now = T0 + 63
    assert [f.fire_at for f in sched.tick()] == [T0 + 60]
    # Down for 10 minutes and 61 s: the fires 120 .. 660 are more than 60 s late (10 of
    # them); 720 is 1 s late, on time.
    clock.now = T0 + 60 + 600 + 61
    fired = sched.tick()
    if misfire == "skip":
        assert [(f.fire_at, f.outcome, f.task_id is None, f.missed) for f in fired] == [
            (T0 + 120, "skipped", True, 10),
            (T0 + 720, "queued", False, 0),
        ]
        queued = [T0 + 60, T0 + 720]
    else:
        assert [(f.fire_at, f.outcome, f.task_id is None, f.missed) for f in fired] == [
            (T0 + 660, "catch_up", False, 10),
            (T0 + 720, "queued", False, 0),
        ]
        queued = [T0 + 60, T0 + 660, T0 + 720]
    assert task_keys(broker) == keys("m", queued)
    # The next fire is on time again.
    clock.now = T0 + 782
    assert [(f.fire_at, f.outcome, f.missed) for f in sched.tick()] == [(T0 + 780, "queued", 0)]
    assert task_keys(broker) == keys("m", [*queued, T0 + 780])
    history = outcomes(sched.store, "m")
    middle = (T0 + 120, "skipped", 10) if misfire == "skip" else (T0 + 660, "catch_up", 10)
    assert history == [
        (T0 + 780, "queued", 0),
        (T0 + 720, "queued", 0),
        middle,
        (T0 + 60, "queued", 0),
    ]
    states = [f.task_state for f in sched.store.history("m")]
    assert states == ["QUEUED", "QUEUED", None if misfire == "skip" else "QUEUED", "QUEUED"]


@pytest.mark.parametrize("misfire", ["skip", "run_once"])
def test_downtime_with_every_fire_missed(broker, misfire: str) -> None:
    clock = Clock(T0)
    sched = scheduler(broker, clock)
    sched.store.add("q", spec(every="15m", kind="k", misfire=misfire))
    clock.now = T0 + 6 * 3600 + 300  # 24 fires, the last one 5 minutes late
    [fire] = sched.tick()
    if misfire == "skip":
        assert (fire.fire_at, fire.outcome, fire.task_id, fire.missed) == (
            T0 + 900,
            "skipped",
            None,
            24,
        )
        assert task_count(broker) == 0
    else:
        assert (fire.fire_at, fire.outcome, fire.missed) == (T0 + 6 * 3600, "catch_up", 24)
        assert task_keys(broker) == keys("q", [T0 + 6 * 3600])
    assert sched.store.require("q").last_fire_at == T0 + 6 * 3600
    clock.now = T0 + 6 * 3600 + 900
    assert [(f.fire_at, f.outcome) for f in sched.tick()] == [(T0 + 6 * 3600 + 900, "queued")]


# -- the store --------------------------------------------------------------------------


def test_a_runtime_schedule_fires_only_from_its_creation(broker) -> None:
    clock = Clock(T0 + 1000)
    sched = scheduler(broker, clock)
    added = sched.store.add("late", spec(every="1m", kind="k", misfire="run_once"))
    assert (added.source, added.enabled, added.created_at, added.last_fire_at) == (
        RUNTIME,
        True,
        T0 + 1000,
        None,
    )
    assert sched.tick() == []
    clock.now = T0 + 1019
    assert sched.tick() == []
    clock.now = T0 + 1021
    assert [(f.fire_at, f.outcome, f.missed) for f in sched.tick()] == [(T0 + 1020, "queued", 0)]
    assert task_keys(broker) == keys("late", [T0 + 1020])


def test_a_schedule_added_just_before_a_fire_gets_that_fire(broker) -> None:
    """Regression (once a bug in goclaw/cron/spec.py fires():
    ``cursor + _STEP``): created at 00:00:59.5, an
    every-minute schedule skips 00:01:00 and first fires at 00:02:00.

    ``fire_due`` passes created_at (the clock, with a fraction) as ``after``; fires()
    then asks for fires from after + 1 s = 00:01:00.5.
    """
    clock = Clock(T0 + 59.5)
    sched = scheduler(broker, clock)
    sched.store.add("m", spec(schedule="* * * * *", kind="k"))
    clock.now = T0 + 61
    assert [f.fire_at for f in sched.tick()] == [T0 + 60]
    assert task_keys(broker) == keys("m", [T0 + 60])


def test_add_refuses_an_existing_name_and_bad_names(broker) -> None:
    store = ScheduleStore(broker.db, clock=lambda: T0)
    every = spec(every="1m", kind="k")
    store.add("dup", every)
    with pytest.raises(ScheduleError, match=r"a schedule named 'dup' exists \(runtime\)"):
        store.add("dup", spec(every="5m", kind="other"))
    store.sync({"nightly": (CONFIG, spec(schedule="0 3 * * *", kind="purge"))})
    with pytest.raises(ScheduleError, match=r"a schedule named 'nightly' exists \(config\)"):
        store.add("nightly", every)
    with pytest.raises(ScheduleError, match=r"schedule name 'Bad Name'"):
        store.add("Bad Name", every)
    # The store is as it was and still usable.
    assert store.require("dup").spec == every
    assert [s.name for s in store.list()] == ["dup", "nightly"]
    assert store.add("fine", every).name == "fine"
    assert [s.name for s in store.list()] == ["dup", "fine", "nightly"]


def test_a_bad_spec_object_is_refused_by_add_and_leaves_the_store_usable(broker) -> None:
    """Regression (once a bug in goclaw/cron/store.py add):
    an unchecked ScheduleSpec is inserted and committed,
    then ``require`` fails to read it back, so the ScheduleError comes after the commit and
    the row stays: every later ``list()`` (goclaw cron list, each tick) raises."""
    store = ScheduleStore(broker.db, clock=lambda: T0)
    store.add("good", spec(every="1m", kind="k"))
    with pytest.raises(ScheduleError, match=r"every: .*1s.*0\.5"):
        store.add("zero", ScheduleSpec(every=0.5, kind="k"))
    assert store.get("zero") is None
    assert [s.name for s in store.list()] == ["good"]


def test_remove(broker) -> None:
    store = ScheduleStore(broker.db, clock=lambda: T0)
    store.sync(
        {
            "nightly": (CONFIG, spec(schedule="0 3 * * *", kind="purge")),
            "heartbeat.main": (HEARTBEAT, spec(every="30m", kind="heartbeat")),
        }
    )
    store.add("mine", spec(every="1m", kind="k"))
    with pytest.raises(ScheduleError) as caught:
        store.remove("nightly")
    assert "'nightly' comes from config.yaml (config)" in str(caught.value)
    with pytest.raises(ScheduleError, match=r"'heartbeat.main' comes from config.yaml"):
        store.remove("heartbeat.main")
    with pytest.raises(ScheduleError, match=r"no schedule named 'ghost'"):
        store.remove("ghost")
    assert store.remove("mine").name == "mine"
    assert [s.name for s in store.list()] == ["heartbeat.main", "nightly"]


def test_disable_stops_fires_and_enable_does_not_catch_up(broker) -> None:
    clock = Clock(T0)
    sched = scheduler(broker, clock)
    sched.store.add("m", spec(every="1m", kind="k", misfire="run_once"))
    clock.now = T0 + 61
    assert len(sched.tick()) == 1
    clock.now = T0 + 90
    off = sched.store.set_enabled("m", False)
    assert off.enabled is False
    assert sched.store.set_enabled("m", False) == off  # no change the second time
    for now in range(T0 + 100, T0 + 330, 10):
        clock.now = now
        assert sched.tick() == []
    assert sched.fire_due("m", T0 + 330) == []
    clock.now = T0 + 330
    on = sched.store.set_enabled("m", True)
    assert (on.enabled, on.last_fire_at) == (True, T0 + 330)
    assert sched.tick() == []
    clock.now = T0 + 361
    assert [(f.fire_at, f.outcome, f.missed) for f in sched.tick()] == [(T0 + 360, "queued", 0)]
    assert task_keys(broker) == keys("m", [T0 + 60, T0 + 360])
    assert outcomes(sched.store, "m") == [(T0 + 360, "queued", 0), (T0 + 60, "queued", 0)]
    with pytest.raises(ScheduleError, match="no schedule named 'ghost'"):
        sched.store.set_enabled("ghost", True)


def test_sync_adds_updates_removes_and_a_changed_spec_starts_afresh(broker) -> None:
    clock = Clock(T0)
    sched = scheduler(broker, clock)
    store = sched.store
    every = spec(every="1m", kind="k")
    assert store.sync({"a": (CONFIG, every), "b": (CONFIG, every)}) == ["added a", "added b"]
    store.add("r", every)
    assert store.sync({"a": (CONFIG, every), "b": (CONFIG, every)}) == []
    tick_through(sched, clock, range(T0 + 10, T0 + 200, 30))
    assert task_count(broker) == 9
    assert store.require("a").last_fire_at == T0 + 180
    # Down a while; config.yaml changed meanwhile.
    clock.now = T0 + 400
    changed = spec(every="2m", kind="k", args={"v": 2})
    assert store.sync({"a": (CONFIG, changed)}) == ["updated a", "removed b"]
    a = store.require("a")
    assert (a.source, a.spec, a.last_fire_at, a.updated_at) == (CONFIG, changed, T0 + 400, T0 + 400)
    assert store.get("b") is None
    assert store.require("r").source == RUNTIME  # config.yaml does not own it
    fired = sched.tick()
    # a starts afresh at 400: nothing of 240..360 is queued or even recorded.
    assert [(f.schedule, f.fire_at, f.outcome, f.missed) for f in fired] == [
        ("r", T0 + 240, "skipped", 2),
        ("r", T0 + 360, "queued", 0),
    ]
    clock.now = T0 + 450
    assert [(f.schedule, f.fire_at) for f in sched.tick()] == [("r", T0 + 420)]
    clock.now = T0 + 481
    assert [(f.schedule, f.fire_at) for f in sched.tick()] == [("a", T0 + 480), ("r", T0 + 480)]
    assert outcomes(store, "a") == [
        (T0 + 480, "queued", 0),
        (T0 + 180, "queued", 0),
        (T0 + 120, "queued", 0),
        (T0 + 60, "queued", 0),
    ]
    task = broker.get(store.history("a")[0].task_id)
    assert decode_payload(task.payload) == ([], {"v": 2})


def test_sync_lets_config_win_over_a_runtime_schedule(broker, caplog) -> None:
    store = ScheduleStore(broker.db, clock=lambda: T0)
    store.add("shared", spec(every="1m", kind="runtime-kind"))
    declared = {"shared": (CONFIG, spec(every="1m", kind="config-kind"))}
    with caplog.at_level(logging.WARNING, logger="goclaw.cron.store"):
        assert store.sync(declared) == ["updated shared"]
    assert "config.yaml declares shared: it replaces the runtime one" in caplog.text
    shared = store.require("shared")
    assert (shared.source, shared.spec.kind) == (CONFIG, "config-kind")
    with pytest.raises(ScheduleError, match=r"comes from config\.yaml"):
        store.remove("shared")
    assert store.sync(declared) == []


def test_run_now_queues_a_manual_fire_and_history_is_newest_first(broker) -> None:
    clock = Clock(T0 + 100)
    sched = scheduler(broker, clock)
    sched.store.add("hourly", spec(every="1h", kind="report"))
    manual = sched.run_now("hourly")
    assert (manual.schedule, manual.fire_at, manual.outcome, manual.missed) == (
        "hourly",
        T0 + 100,
        "manual",
        0,
    )
    [task] = broker.tasks()
    assert (task.id, task.kind) == (manual.task_id, "report")
    assert task.idempotency_key.startswith("cron:hourly:")
    # It does not move the schedule: the 01:00 fire still comes.
    assert sched.store.require("hourly").last_fire_at is None
    clock.now = T0 + 3601
    [on_time] = sched.tick()
    assert (on_time.fire_at, on_time.outcome) == (T0 + 3600, "queued")
    broker.cancel(manual.task_id, reason="not needed")
    history = sched.store.history("hourly")
    assert [(f.fire_at, f.outcome, f.task_id, f.task_state) for f in history] == [
        (T0 + 3600, "queued", on_time.task_id, "QUEUED"),
        (T0 + 100, "manual", manual.task_id, "CANCELED"),
    ]
    assert [f.recorded_at for f in history] == [T0 + 3601, T0 + 100]
    assert [f.fire_at for f in sched.store.history("hourly", limit=1)] == [T0 + 3600]
    with pytest.raises(ScheduleError, match="no schedule named 'ghost'"):
        sched.run_now("ghost")
    with pytest.raises(ScheduleError, match="no schedule named 'ghost'"):
        sched.store.history("ghost")


def test_run_now_does_not_swallow_the_next_scheduled_fire(broker) -> None:
    """Regression (once a bug in goclaw/cron/scheduler.py submit_fire: key ``f"{fire_at:.0f}"``):
    a manual run at
    00:00:59.6 gets the key cron:m:60, which is the key of the scheduled fire at 00:01:00;
    that fire then finds "its" task already there and queues nothing, while history
    records it as 'queued' with the manual run's task. Two run-nows within the same
    second likewise share one task (and two history rows)."""
    clock = Clock(T0)
    sched = scheduler(broker, clock)
    sched.store.add("m", spec(schedule="* * * * *", kind="k"))
    clock.now = T0 + 59.6
    manual = sched.run_now("m")
    clock.now = T0 + 61
    [scheduled] = sched.tick()
    assert scheduled.fire_at == T0 + 60
    assert scheduled.task_id != manual.task_id
    assert task_count(broker) == 2
    # The same cause: two manual runs within a second are one task.
    clock.now = T0 + 100.2
    one = sched.run_now("m")
    clock.now = T0 + 100.4
    two = sched.run_now("m")
    assert one.task_id != two.task_id
    assert task_count(broker) == 4


# -- what a fire queues ---------------------------------------------------------------------


def test_an_agent_schedule_queues_agent_turns(broker) -> None:
    clock = Clock(T0)
    sched = scheduler(broker, clock)
    sched.store.add("brief", spec(every="1h", agent="ops", prompt="Summarise the night"))
    sched.store.add("hello", spec(schedule="0 * * * *", prompt="Say hello"))
    fired: list[Fired] = []
    for now in (T0 + 3605, T0 + 7205):
        clock.now = now
        fired += sched.tick()
    assert [(f.schedule, f.fire_at) for f in fired] == [
        ("brief", T0 + 3600),
        ("hello", T0 + 3600),
        ("brief", T0 + 7200),
        ("hello", T0 + 7200),
    ]
    for fire in fired:
        key = f"cron:{fire.schedule}:{int(fire.fire_at)}"
        task = broker.get(fire.task_id)
        agent, prompt = (
            ("ops", "Summarise the night") if fire.schedule == "brief" else ("default", "Say hello")
        )
        assert (task.kind, task.idempotency_key, task.session_key) == (AGENT_KIND, key, key)
        assert decode_payload(task.payload) == (
            [],
            {"prompt": prompt, "agent": agent, "session": key},
        )
        row = broker.db.fetchone("SELECT agent_id FROM sessions WHERE key = ?", (key,))
        assert row == (agent,)
    assert task_count(broker) == 4
    assert broker.db.fetchone("SELECT COUNT(*) FROM sessions") == (4,)
    # The same fire handled again (a peer, a restart): the same task, no new task or session.
    broker.db.execute("UPDATE schedules SET last_fire_at = ?", (T0 + 3600,))
    assert [f.task_id for f in sched.tick()] == [f.task_id for f in fired[2:]]
    assert task_count(broker) == 4
    assert broker.db.fetchone("SELECT COUNT(*) FROM sessions") == (4,)


# -- robustness -----------------------------------------------------------------------------


def test_a_corrupted_stored_spec_is_skipped_and_the_others_fire(broker, tmp_path, caplog) -> None:
    """Regression (once a bug in goclaw/cron/store.py list + scheduler.py tick):
    ``tick`` lists the schedules
    outside its per-schedule ``try``; ``list()`` parses every row, so one bad row raises
    out of ``tick()`` and ``run()``, and no schedule fires any more."""
    clock = Clock(T0)
    sched = scheduler(broker, clock)
    sched.store.add("good", spec(every="1m", kind="k"))
    sched.store.add("bad", spec(every="1m", kind="k"))
    broker.db.execute("""UPDATE schedules SET spec = '{"every": "0s"}' WHERE name = 'bad'""")
    clock.now = T0 + 61
    with caplog.at_level(logging.ERROR):
        fired = sched.tick()
    assert [(f.schedule, f.fire_at) for f in fired] == [("good", T0 + 60)]
    assert "bad" in caplog.text
    assert task_keys(broker) == keys("good", [T0 + 60])

    # The loop survives it too.
    stop = threading.Event()

    class OneTick(Scheduler):
        def tick(self) -> list[Fired]:
            try:
                return super().tick()
            finally:
                stop.set()

    clock.now = T0 + 121
    OneTick(broker, SETTINGS, clock=clock).run(load_config(tmp_path, env={}), stop)
    assert task_keys(broker) == keys("good", [T0 + 60, T0 + 120])


def test_a_schedule_that_fails_to_fire_does_not_stop_the_others(broker, caplog) -> None:
    clock = Clock(T0)
    sched = scheduler(broker, clock)
    sched.store.add("a-first", spec(every="1m", kind="k"))
    sched.store.add("b-second", spec(every="1m", kind="k"))
    original = sched.fire_due

    def flaky(name: str, now: float) -> list[Fired]:
        if name == "a-first":
            raise RuntimeError("database hiccup")
        return original(name, now)

    sched.fire_due = flaky  # type: ignore[method-assign]
    clock.now = T0 + 61
    with caplog.at_level(logging.ERROR, logger="goclaw.cron.scheduler"):
        fired = sched.tick()
    assert [f.schedule for f in fired] == ["b-second"]
    assert "schedule a-first: firing failed" in caplog.text
    # Once it works again the missed fire is still on time.
    sched.fire_due = original  # type: ignore[method-assign]
    clock.now = T0 + 90
    assert [(f.schedule, f.fire_at) for f in sched.tick()] == [("a-first", T0 + 60)]


# -- config.yaml: cron entries and heartbeats -------------------------------------------------

AGENT = "    model: openai/gpt-4o-mini\n"
HEARTBEAT_YAML = (
    "agents:\n"
    "  main:\n" + AGENT + "    heartbeat_every: 30m\n"
    '    heartbeat_active_hours: "09:00-17:00"\n'
    "    heartbeat_timezone: Europe/Berlin\n"
    "  quiet:\n" + AGENT + "cron:\n"
    "  nightly:\n"
    '    schedule: "0 3 * * *"\n'
    "    kind: purge\n"
    "    args: {days: 30}\n"
)


def write_config(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_declared_schedules_from_config(tmp_path) -> None:
    write_config(tmp_path, HEARTBEAT_YAML)
    declared = declared_schedules(load_config(tmp_path, env={}))
    assert sorted(declared) == ["heartbeat.main", "nightly"]
    source, heartbeat = declared["heartbeat.main"]
    assert source == HEARTBEAT
    assert (heartbeat.kind, dict(heartbeat.args), heartbeat.every) == (
        "heartbeat",
        {"agent": "main"},
        1800,
    )
    assert (heartbeat.timezone, heartbeat.active_hours) == ("Europe/Berlin", (540, 1020))
    assert heartbeat.prompt is None
    source, nightly = declared["nightly"]
    assert (source, nightly.schedule, nightly.kind, dict(nightly.args)) == (
        CONFIG,
        "0 3 * * *",
        "purge",
        {"days": 30},
    )


@pytest.mark.parametrize(
    ("day", "first_utc_hour"),
    [((2026, 1, 15), 8), ((2026, 7, 15), 7), ((2026, 3, 29), 7)],
)
def test_heartbeat_fires_only_within_active_hours(
    broker, tmp_path, day: tuple[int, int, int], first_utc_hour: int
) -> None:
    write_config(tmp_path, HEARTBEAT_YAML)
    config = load_config(tmp_path, env={})
    start = utc(*day)
    clock = Clock(start)
    sched = scheduler(broker, clock)
    sched.sync(config)
    assert sorted(s.name for s in sched.store.list()) == ["heartbeat.main", "nightly"]
    # A simulated day, a tick every 15 minutes, 7 s after the quarter.
    fired = tick_through(sched, clock, [start + 900 * i + 7 for i in range(96)])
    beats = [f.fire_at for f in fired if f.schedule == "heartbeat.main"]
    first = utc(*day, first_utc_hour)
    assert beats == [first + 1800 * i for i in range(16)]  # 09:00 .. 16:30 Berlin
    assert [f.fire_at for f in fired if f.schedule == "nightly"] == [start + 3 * 3600]
    assert task_count(broker) == 17
    for fire in fired:
        task = broker.get(fire.task_id)
        if fire.schedule == "heartbeat.main":
            assert (task.kind, decode_payload(task.payload)) == (
                "heartbeat",
                ([], {"agent": "main"}),
            )
        else:
            assert (task.kind, decode_payload(task.payload)) == ("purge", ([], {"days": 30}))
        assert task.idempotency_key == f"cron:{fire.schedule}:{int(fire.fire_at)}"
    with pytest.raises(ScheduleError, match=r"comes from config\.yaml"):
        sched.store.remove("heartbeat.main")


def test_config_reload_removes_a_dropped_heartbeat(broker, tmp_path) -> None:
    write_config(tmp_path, HEARTBEAT_YAML)
    clock = Clock(T0)
    sched = scheduler(broker, clock)
    sched.sync(load_config(tmp_path, env={}))
    write_config(tmp_path, "agents:\n  main:\n" + AGENT)
    sched.sync(load_config(tmp_path, env={}))
    assert sched.store.list() == []


@pytest.mark.parametrize(
    ("settings_yaml", "message"),
    [
        (
            '    heartbeat_every: 30m\n    heartbeat_active_hours: "25:00-01:00"\n',
            "agents.main.heartbeat_active_hours: '25:00-01:00' is not a time of day range",
        ),
        (
            '    heartbeat_every: 30m\n    heartbeat_active_hours: "08:00-08:00"\n',
            "agents.main.heartbeat_active_hours: '08:00-08:00' is empty",
        ),
        (
            "    heartbeat_every: 30m\n    heartbeat_timezone: Mars/Base\n",
            "agents.main.heartbeat_timezone: unknown timezone 'Mars/Base'",
        ),
        (
            '    heartbeat_active_hours: "09:00-17:00"\n',
            "agents.main.heartbeat_active_hours: needs heartbeat_every",
        ),
        ("    heartbeat_every: 0s\n", "agents.main.heartbeat_every: '0s' must be more than zero"),
        ("    heartbeat_every: soon\n", "agents.main.heartbeat_every: 'soon' is not a duration"),
        ("    heartbeat_every: 0.5\n", ("agents.main.heartbeat_every: ", "1s", "0.5")),
    ],
)
def test_bad_heartbeat_settings_fail_load_config(
    tmp_path, settings_yaml: str, message: str | tuple[str, ...]
) -> None:
    write_config(tmp_path, "agents:\n  main:\n" + AGENT + settings_yaml)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, env={})
    text = str(caught.value)
    pieces = (message,) if isinstance(message, str) else message
    assert text.startswith(pieces[0]), text
    assert all(piece in text for piece in pieces), text


@pytest.mark.parametrize(
    ("cron_yaml", "message"),
    [
        ('  nightly:\n    schedule: "61 * * * *"\n    kind: k\n', "cron.nightly.schedule:"),
        ("  nightly:\n    every: 5m\n", "cron.nightly: say what to run"),
        ("  Nightly:\n    every: 5m\n    kind: k\n", "cron: schedule name 'Nightly'"),
        ("  nightly: every 5m\n", "cron.nightly: must be a mapping"),
    ],
)
def test_bad_cron_entries_fail_load_config(tmp_path, cron_yaml: str, message: str) -> None:
    write_config(tmp_path, "cron:\n" + cron_yaml)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, env={})
    assert message in str(caught.value)


def test_spec_json_in_the_database(broker) -> None:
    store = ScheduleStore(broker.db, clock=lambda: T0)
    added = spec(every="15m", timezone="Europe/Berlin", kind="k", active_hours="22:00-02:00")
    store.add("night", added)
    [(raw,)] = broker.db.fetchall("SELECT spec FROM schedules WHERE name = 'night'")
    assert json.loads(raw) == {
        "every": 900.0,
        "timezone": "Europe/Berlin",
        "kind": "k",
        "args": {},
        "misfire": "skip",
        "active_hours": "22:00-02:00",
        "enabled": True,
    }
    assert store.require("night").spec == added
