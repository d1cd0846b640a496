"""``goclaw scheduler`` and ``goclaw cron``: the scheduler process, and schedules by hand.

Kept apart from ``goclaw/cli.py`` (which adds these commands), like ``goclaw
skill``; the same ``Context``, error handling and ``--json`` conventions.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from goclaw.cli import Context, command, emit_json, json_option


@click.command("scheduler")
@click.option(
    "--clock-file",
    type=click.Path(dir_okay=False, path_type=Path),
    hidden=True,
    help="For tests: read the current time (epoch seconds) from this file.",
)
@click.pass_obj
@command
def scheduler(obj: Context, clock_file: Path | None) -> None:
    """Queue every schedule's work when it is due, until stopped (SIGINT or SIGTERM).

    Schedules come from config.yaml (`cron:` and agents' heartbeats, re-read when
    it changes) and from `goclaw cron add`. Running two schedulers is safe: each
    fire time queues one task.
    """
    from goclaw.cron.scheduler import Scheduler

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = obj.config
    clock = _file_clock(clock_file) if clock_file else time.time
    loop = Scheduler(obj.broker, config.scheduler, queue=config.worker.queue, clock=clock)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    logging.getLogger("goclaw.cron").info("scheduler started (pid %d)", os.getpid())
    loop.run(config, stop)


def _file_clock(path: Path) -> Any:
    def now() -> float:
        return float(path.read_text().strip())

    return now


@click.group("cron")
def cron() -> None:
    """Schedules: list, add, remove, enable, disable, run-now, history."""


def _store(obj: Context) -> Any:
    from goclaw.cron.store import ScheduleStore

    return ScheduleStore(obj.broker.db)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


@cron.command("list")
@json_option
@click.pass_obj
@command
def cron_list(obj: Context, as_json: bool) -> None:
    """Every schedule: where it comes from, when it fires, what it queues."""
    from goclaw.cron.scheduler import declared_schedules

    store = _store(obj)
    store.sync(declared_schedules(obj.config))  # config.yaml as it is now, scheduler or not
    schedules = store.list()
    if as_json:
        emit_json([s.as_json() for s in schedules])
        return
    if not schedules:
        click.echo("no schedules (config.yaml `cron:`, or goclaw cron add)")
    for s in schedules:
        state = "enabled" if s.enabled else "disabled"
        click.echo(
            f"{s.name:<24} {s.source:<9} {state:<8} last {_when(s.last_fire_at)}  "
            f"{s.spec.describe()}"
        )


@cron.command("add")
@click.argument("name")
@click.option("--schedule", "expression", help="A cron expression: minute hour day month weekday.")
@click.option("--every", help="An interval instead: 90s, 15m, 1h, 1d.")
@click.option("--timezone", default="UTC", show_default=True, help="An IANA name.")
@click.option("--agent", help="Run an agent turn with --prompt [default agent: default].")
@click.option("--prompt", help="The turn's prompt.")
@click.option("--kind", help="Queue a task of this kind instead of a turn.")
@click.option("--arg", "pairs", multiple=True, metavar="KEY=VALUE", help="A task argument.")
@click.option(
    "--misfire",
    type=click.Choice(["skip", "run_once"]),
    default="skip",
    show_default=True,
    help="Fire times missed while no scheduler ran: skip them, or run one catch-up.",
)
@click.option("--active-hours", help="Only fire within HH:MM-HH:MM (may wrap midnight).")
@json_option
@click.pass_obj
@command
def cron_add(
    obj: Context,
    name: str,
    expression: str | None,
    every: str | None,
    timezone: str,
    agent: str | None,
    prompt: str | None,
    kind: str | None,
    pairs: tuple[str, ...],
    misfire: str,
    active_hours: str | None,
    as_json: bool,
) -> None:
    """Add a schedule; it fires from now on. Checked first: a bad one is refused."""
    from goclaw.cli import parse_args
    from goclaw.cron.spec import check_name, parse_spec

    raw: dict[str, Any] = {"timezone": timezone, "misfire": misfire}
    for key, value in (
        ("schedule", expression),
        ("every", every),
        ("agent", agent),
        ("prompt", prompt),
        ("kind", kind),
        ("active_hours", active_hours),
    ):
        if value is not None:
            raw[key] = value
    if pairs:
        raw["args"] = parse_args(pairs)
    spec = parse_spec(raw, f"cron.{check_name(name)}")
    schedule = _store(obj).add(name, spec)
    if as_json:
        emit_json(schedule.as_json())
    else:
        click.echo(f"added {name}: {spec.describe()}")


@cron.command("remove")
@click.argument("name")
@json_option
@click.pass_obj
@command
def cron_remove(obj: Context, name: str, as_json: bool) -> None:
    """Remove a schedule added at runtime (config ones are removed in config.yaml)."""
    _store(obj).remove(name)
    if as_json:
        emit_json({"removed": name})
    else:
        click.echo(f"removed {name}")


def _set_enabled(obj: Context, name: str, enabled: bool, as_json: bool) -> None:
    schedule = _store(obj).set_enabled(name, enabled)
    if as_json:
        emit_json(schedule.as_json())
    else:
        click.echo(f"{name} {'enabled' if enabled else 'disabled'}")


@cron.command("enable")
@click.argument("name")
@json_option
@click.pass_obj
@command
def cron_enable(obj: Context, name: str, as_json: bool) -> None:
    """Fire again from now on (times missed while disabled are not caught up)."""
    _set_enabled(obj, name, True, as_json)


@cron.command("disable")
@click.argument("name")
@json_option
@click.pass_obj
@command
def cron_disable(obj: Context, name: str, as_json: bool) -> None:
    """Stop firing until enabled."""
    _set_enabled(obj, name, False, as_json)


@cron.command("run-now")
@click.argument("name")
@json_option
@click.pass_obj
@command
def cron_run_now(obj: Context, name: str, as_json: bool) -> None:
    """Queue the schedule's work once, now."""
    from goclaw.cron.scheduler import Scheduler

    config = obj.config
    fired = Scheduler(obj.broker, config.scheduler, queue=config.worker.queue).run_now(name)
    if as_json:
        emit_json({"fire_at": fired.fire_at, "task_id": fired.task_id})
    else:
        click.echo(f"queued task {fired.task_id}")


@cron.command("history")
@click.argument("name")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=20, show_default=True)
@json_option
@click.pass_obj
@command
def cron_history(obj: Context, name: str, limit: int, as_json: bool) -> None:
    """Each fire time, newest first: its task and the task's outcome (or that it was skipped)."""
    fires = _store(obj).history(name, limit)
    if as_json:
        emit_json([f.as_json() for f in fires])
        return
    if not fires:
        click.echo(f"{name} has not fired yet")
    for f in fires:
        if f.task_id is None:
            what = f"skipped ({f.missed} missed fire(s) from here)"
        else:
            what = f"task {f.task_id} {f.task_state or 'purged'}"
            if f.missed:
                what += f" (catch-up for {f.missed} missed)"
        click.echo(f"{_when(f.fire_at)}  {f.outcome:<8} {what}")


__all__ = ["cron", "scheduler"]
