"""Issue 7 where processes matter: real ``goclaw scheduler`` processes on a controlled clock.

Each scheduler reads the time from a file the test writes (the hidden
``--clock-file``), so a test moves time minute by minute, kills a scheduler with
SIGKILL right as a fire comes due, runs two at once, and then counts the tasks:
exactly one per fire time.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from goclaw.cron.store import ScheduleStore
from goclaw.fake_llm import FakeLLM, Script
from tests.acceptance.conftest import Stack, wait_for

pytestmark = pytest.mark.slow
#: Where the database plays no part in what is tested (validation, the heartbeat's handling
#: of replies): SQLite only. Exactly-once under kills and peers runs on both.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

#: Tuesday 2026-11-24, 10:00:00 UTC (11:00 in Berlin): every minute from it is a fire time
#: of "* * * * *".
START = 1_795_514_400.0
FAST = {"GOCLAW_SCHEDULER__TICK_SECONDS": "0.05"}


class Clock:
    def __init__(self, path: Path, now: float) -> None:
        self.path = path
        self.set(now)

    def set(self, now: float) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(repr(now))
        tmp.replace(self.path)  # a reader never sees half a number
        self.now = now


def write_config(stack: Stack, **sections: Any) -> None:
    (stack.home / "config.yaml").write_text(yaml.safe_dump(sections))


def cron_tasks(stack: Stack, name: str) -> dict[str, int]:
    rows = stack.broker.db.fetchall(
        "SELECT idempotency_key, COUNT(*) FROM tasks WHERE idempotency_key LIKE ? "
        "GROUP BY idempotency_key",
        (f"cron:{name}:%",),
    )
    return {key: int(count) for key, count in rows}


def fire_keys(name: str, first: float, count: int) -> set[str]:
    return {f"cron:{name}:{first + 60 * i:.0f}" for i in range(count)}


def wait_synced(stack: Stack, name: str) -> None:
    store = ScheduleStore(stack.broker.db)
    wait_for(lambda: store.get(name) is not None, timeout=20, what=f"schedule {name} to sync")


def test_a_scheduler_killed_at_fire_times_queues_each_fire_exactly_once(make_stack):
    stack = make_stack(**FAST)
    write_config(stack, cron={"tick": {"schedule": "* * * * *", "kind": "noop"}})
    clock = Clock(stack.home / "clock", START - 30)
    scheduler = stack.scheduler("--clock-file", str(clock.path))
    wait_synced(stack, "tick")
    rng = random.Random(7)
    fires = 8
    for i in range(fires):
        fire_at = START + 60 * i
        clock.set(fire_at)  # the fire comes due now...
        time.sleep(rng.uniform(0, 0.12))  # ...and the scheduler dies somewhere around it
        scheduler.kill()
        scheduler = stack.scheduler("--clock-file", str(clock.path))
        key = f"cron:tick:{fire_at:.0f}"
        wait_for(lambda key=key: key in cron_tasks(stack, "tick"), timeout=20, what=key)
    tasks = cron_tasks(stack, "tick")
    assert set(tasks) == fire_keys("tick", START, fires)
    assert set(tasks.values()) == {1}, tasks
    history = stack.cli_json("cron", "history", "tick", "--limit", "50")
    assert sorted(f["fire_at"] for f in history) == [START + 60 * i for i in range(fires)]
    assert {f["outcome"] for f in history} == {"queued"}


def test_two_schedulers_at_once_queue_one_task_per_fire(make_stack):
    stack = make_stack(**FAST)
    write_config(stack, cron={"tick": {"schedule": "* * * * *", "kind": "noop"}})
    clock = Clock(stack.home / "clock", START - 30)
    first = stack.scheduler("--clock-file", str(clock.path))
    second = stack.scheduler("--clock-file", str(clock.path))
    wait_synced(stack, "tick")
    fires = 15
    for i in range(fires):
        clock.set(START + 60 * i)
        key = f"cron:tick:{START + 60 * i:.0f}"
        wait_for(lambda key=key: key in cron_tasks(stack, "tick"), timeout=20, what=key)
        time.sleep(0.1)  # both have looked at it by now
    tasks = cron_tasks(stack, "tick")
    assert set(tasks) == fire_keys("tick", START, fires) and set(tasks.values()) == {1}
    assert first.alive() and second.alive()


def test_missed_fires_skip_or_run_once_after_downtime(make_stack):
    stack = make_stack(**FAST)
    write_config(
        stack,
        cron={
            "skipper": {"schedule": "* * * * *", "kind": "noop"},
            "catcher": {"schedule": "* * * * *", "kind": "noop", "misfire": "run_once"},
        },
    )
    clock = Clock(stack.home / "clock", START - 30)
    scheduler = stack.scheduler("--clock-file", str(clock.path))
    wait_synced(stack, "catcher")
    clock.set(START)
    wait_for(lambda: len(cron_tasks(stack, "catcher")) == 1, timeout=20, what="the first fire")
    wait_for(lambda: len(cron_tasks(stack, "skipper")) == 1, timeout=20, what="the first fire")
    scheduler.kill()
    # Down across 10 fire times (START+60 .. START+600); it comes back at START+630,
    # when all ten are older than the 60 s grace... except the last, 30 s late.
    clock.set(START + 60 * 11 + 30)
    stack.scheduler("--clock-file", str(clock.path))
    wait_for(
        lambda: len(stack.cli_json("cron", "history", "skipper")) >= 3,
        timeout=20,
        what="the scheduler to handle the downtime",
    )
    skipper = stack.cli_json("cron", "history", "skipper")
    catcher = stack.cli_json("cron", "history", "catcher")
    # skip: the 10 missed fires queue nothing (one 'skipped' row counts them); the fire
    # of START+660, 30 s ago and so on time, is queued.
    assert [(f["outcome"], f["missed"]) for f in skipper] == [
        ("queued", 0),
        ("skipped", 10),
        ("queued", 0),
    ]
    assert len(cron_tasks(stack, "skipper")) == 2
    # run_once: exactly one catch-up for the ten, then the on-time fire.
    assert [(f["outcome"], f["missed"]) for f in catcher] == [
        ("queued", 0),
        ("catch_up", 10),
        ("queued", 0),
    ]
    assert len(cron_tasks(stack, "catcher")) == 3


@sqlite_only
def test_a_bad_cron_add_or_config_edit_never_stops_the_running_scheduler(make_stack):
    stack = make_stack(**FAST)
    write_config(stack, cron={"tick": {"schedule": "* * * * *", "kind": "noop"}})
    clock = Clock(stack.home / "clock", START - 30)
    scheduler = stack.scheduler("--clock-file", str(clock.path))
    wait_synced(stack, "tick")

    for args, why in [
        (("--schedule", "61 * * * *", "--kind", "noop"), "cron.bad.schedule: '61 * * * *'"),
        (("--every", "0s", "--kind", "noop"), "cron.bad.every: '0s' must be more than zero"),
        (("--every", "1m", "--timezone", "Mars/Base", "--kind", "noop"), "unknown timezone"),
        (("--schedule", "* * *", "--kind", "noop"), "Wrong number of fields"),
    ]:
        result = stack.cli("cron", "add", "bad", *args, check=False)
        assert result.returncode == 1 and why in result.stderr, result.stderr
    # A broken config.yaml: logged, the schedules stay as they were.
    write_config(stack, cron={"tick": {"schedule": "99 * * * *", "kind": "noop"}})
    wait_for(lambda: "config.yaml not applied" in scheduler.log(), timeout=20, what="the warning")
    clock.set(START)
    wait_for(lambda: len(cron_tasks(stack, "tick")) == 1, timeout=20, what="the next fire")
    assert scheduler.alive()
    [tick] = ScheduleStore(stack.broker.db).list()  # the CLI, too, refuses the broken file
    assert tick.spec.schedule == "* * * * *"


@sqlite_only
def test_the_heartbeat_suppresses_ok_deduplicates_and_keeps_active_hours(make_stack):
    fake = FakeLLM(
        Script.from_data(
            {
                "replies": [
                    {"content": "HEARTBEAT_OK"},
                    {"content": "The disk is 95% full."},
                    {"content": "The disk is 95% full."},
                ]
            }
        )
    )
    with fake.running() as base_url:
        stack = make_stack(**FAST)
        write_config(
            stack,
            agents={
                "watcher": {
                    "model": "openai/fake",
                    "heartbeat_every": "1m",
                    # START is 11:00 in Berlin (UTC+1 in November).
                    "heartbeat_active_hours": "11:00-11:03",
                    "heartbeat_timezone": "Europe/Berlin",
                }
            },
            models={"openai/fake": {"api_base": base_url, "timeout_seconds": 30}},
        )
        workspace = stack.home / "workspaces" / "watcher"
        workspace.mkdir(parents=True)
        (workspace / "HEARTBEAT.md").write_text("Check the disk; tell me if it is nearly full.")
        clock = Clock(stack.home / "clock", START - 30)
        stack.worker(concurrency=1)  # the replies are scripted in order
        stack.scheduler("--clock-file", str(clock.path))
        wait_synced(stack, "heartbeat.watcher")
        for minute in range(5):  # 11:00 .. 11:04 local; the window ends at 11:03
            clock.set(START + 60 * minute)
            time.sleep(0.3)
        keys = cron_tasks(stack, "heartbeat.watcher")
        assert set(keys) == fire_keys("heartbeat.watcher", START, 3), keys
        ids = [
            row[0]
            for row in stack.broker.db.fetchall(
                "SELECT id FROM tasks WHERE kind = 'heartbeat' ORDER BY id"
            )
        ]
        done = stack.wait_terminal(ids)
        outcomes = [json.loads(done[i].result or "{}")["outcome"] for i in ids]
        assert outcomes == ["suppressed", "delivered", "deduplicated"]
        alerts = [
            e.data for i in ids for e in stack.broker.events(i) if e.type == "heartbeat.alert"
        ]
        assert alerts == [{"agent": "watcher", "text": "The disk is 95% full."}]
