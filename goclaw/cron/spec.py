"""What a schedule is, checked: when it fires (APScheduler's triggers) and what each fire queues.

A ``ScheduleSpec`` comes from a ``cron:`` entry of config.yaml, from
``goclaw cron add`` or ACP ``cron.add``, or from an agent's heartbeat, and
is stored as JSON. Everything that could go wrong later (a bad expression, an
unknown timezone, an interval of zero) is refused here with a message that
names the key, so a running scheduler never meets it.

Fire times are APScheduler 3.11's (``CronTrigger.from_crontab``, and an
``IntervalTrigger`` anchored at the Unix epoch so that ``every: 15m`` fires at
:00, :15, :30 and :45 in every process; an interval counts real time, so its
timezone only matters for ``active_hours``). Two rules are ours (docs/ARCHITECTURE.md,
"Schedules"): a local time that a DST change skips fires once, an hour later in
wall-clock terms (APScheduler's behaviour); a local time that occurs twice fires
once, at its first occurrence.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from goclaw.durations import parse_duration
from goclaw.errors import ConfigError

MISFIRE_POLICIES = ("skip", "run_once")
MAX_EVERY_SECONDS = 366 * 86400
#: Room for ``heartbeat.<agent id>`` (agent ids have up to 63 characters).
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,79}$")
KEYS = (
    "schedule",
    "every",
    "timezone",
    "agent",
    "prompt",
    "kind",
    "args",
    "misfire",
    "active_hours",
    "enabled",
)
_HOURS = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STEP = timedelta(microseconds=1)


class ScheduleError(ConfigError):
    """A schedule that cannot be used; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    #: A five-field crontab expression, or None for an interval.
    schedule: str | None = None
    #: Seconds between fires, or None for a crontab expression.
    every: float | None = None
    timezone: str = "UTC"
    #: An agent turn (``agent`` and ``prompt``) or a task (``kind`` with ``args``).
    agent: str | None = None
    prompt: str | None = None
    kind: str | None = None
    args: Mapping[str, Any] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    misfire: str = "skip"
    #: Minutes after local midnight, [start, end); end <= start wraps past midnight.
    active_hours: tuple[int, int] | None = None
    enabled: bool = True

    def as_json(self) -> dict[str, Any]:
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        data["args"] = dict(self.args)
        data["active_hours"] = _format_hours(self.active_hours)
        return {key: value for key, value in data.items() if value is not None}

    def describe(self) -> str:
        when = self.schedule if self.schedule else f"every {_format_seconds(self.every or 0)}"
        if self.timezone != "UTC":
            when += f" ({self.timezone})"
        if self.active_hours:
            when += f" within {_format_hours(self.active_hours)}"
        what = f"agent {self.agent}" if self.agent else f"kind {self.kind}"
        return f"{when} -> {what}"

    def fires(self, after: float, until: float) -> Iterator[float]:
        """Fire times in (``after``, ``until``], in order, as epoch seconds."""
        trigger = self._trigger()
        zone = ZoneInfo(self.timezone)
        # In UTC: local arithmetic and comparisons ignore which of two equal wall times
        # (fold) a datetime is, and APScheduler then answers a repeated time again.
        cursor = datetime.fromtimestamp(after, UTC)
        while True:
            fire = trigger.get_next_fire_time(None, cursor + _STEP)
            if fire is None or fire.timestamp() > until:
                return
            if fire.timestamp() <= cursor.timestamp():  # never go back, whatever it says
                raise ScheduleError(f"{self.describe()}: no fire time after {cursor}")
            cursor = fire.astimezone(UTC)
            local = fire.astimezone(zone)
            if self.schedule and local.replace(fold=0).astimezone(UTC) != cursor:
                continue  # the second occurrence of a repeated local time (DST ends)
            if self.active_hours and not _within(local, self.active_hours):
                continue
            yield fire.timestamp()

    def _trigger(self) -> CronTrigger | IntervalTrigger:
        if self.schedule:
            return CronTrigger.from_crontab(self.schedule, timezone=self.timezone)
        assert self.every is not None
        return IntervalTrigger(seconds=self.every, start_date=_EPOCH, timezone=self.timezone)


def parse_spec(raw: Any, key: str) -> ScheduleSpec:
    """A spec from config.yaml, the CLI or ACP; ``key`` prefixes every error (``cron.poll``)."""
    if not isinstance(raw, Mapping):
        raise ScheduleError(f"{key}: must be a mapping (schedule or every, and what to run)")
    unknown = sorted(set(raw) - set(KEYS), key=str)
    if unknown:
        raise ScheduleError(f"{key}.{unknown[0]}: unknown key (known: {', '.join(KEYS)})")
    values: dict[str, Any] = {}
    timezone = _text(raw, key, "timezone") or "UTC"
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"{key}.timezone: unknown timezone {timezone!r} (an IANA name such as Europe/Berlin)"
        ) from None
    values["timezone"] = timezone
    schedule, every = raw.get("schedule"), raw.get("every")
    if (schedule is None) == (every is None):
        raise ScheduleError(f"{key}: give exactly one of schedule (a cron expression) or every")
    if schedule is not None:
        values["schedule"] = _crontab(key, schedule, timezone)
    else:
        try:
            values["every"] = parse_duration(every)
        except ValueError as exc:
            raise ScheduleError(f"{key}.every: {exc}") from None
        seconds = values["every"]
        if not 1 <= seconds <= MAX_EVERY_SECONDS or seconds != int(seconds):
            raise ScheduleError(f"{key}.every: whole seconds between 1s and 366d, got {every!r}")
    agent, prompt, kind = (_text(raw, key, name) for name in ("agent", "prompt", "kind"))
    if kind and (agent or prompt):
        raise ScheduleError(f"{key}: give kind (a task) or agent and prompt (a turn), not both")
    if kind:
        args = raw.get("args") or {}
        if not isinstance(args, Mapping):
            raise ScheduleError(f"{key}.args: must be a mapping of argument names to values")
        try:
            json.dumps(args, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ScheduleError(f"{key}.args: must be JSON data: {exc}") from None
        values.update(kind=kind, args=types.MappingProxyType(dict(args)))
    elif prompt:
        if raw.get("args"):
            raise ScheduleError(f"{key}.args: only a kind takes args")
        values.update(agent=agent or "default", prompt=prompt)
    else:
        raise ScheduleError(f"{key}: say what to run: kind (a task kind) or prompt (an agent turn)")
    misfire = raw.get("misfire", "skip")
    if misfire not in MISFIRE_POLICIES:
        raise ScheduleError(
            f"{key}.misfire: must be one of {', '.join(MISFIRE_POLICIES)}, got {misfire!r}"
        )
    values["misfire"] = misfire
    if raw.get("active_hours") is not None:
        values["active_hours"] = parse_active_hours(raw["active_hours"], f"{key}.active_hours")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ScheduleError(f"{key}.enabled: must be true or false, got {enabled!r}")
    values["enabled"] = enabled
    return ScheduleSpec(**values)


def spec_from_json(data: Mapping[str, Any]) -> ScheduleSpec:
    """A stored spec (``as_json``), checked again: the database is not trusted blindly."""
    return parse_spec({k: v for k, v in data.items() if v is not None}, "stored schedule")


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ScheduleError(
            f"schedule name {name!r}: lower-case letters, digits, '_', '.' and '-', starting "
            "with a letter or digit, at most 80 characters"
        )
    return name


def parse_active_hours(raw: Any, key: str) -> tuple[int, int]:
    """``HH:MM-HH:MM`` as minutes after midnight; the end may be 24:00 or wrap past midnight."""
    match = _HOURS.match(str(raw).strip()) if isinstance(raw, str) else None
    if match is None:
        raise ScheduleError(f"{key}: expected HH:MM-HH:MM (for example 08:00-22:00), got {raw!r}")
    h1, m1, h2, m2 = (int(part) for part in match.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2):
        raise ScheduleError(f"{key}: {raw!r} is not a time of day range")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise ScheduleError(f"{key}: {raw!r} is empty (use 00:00-24:00 for all day)")
    return start, end


def _within(local: datetime, hours: tuple[int, int]) -> bool:
    minute = local.hour * 60 + local.minute
    start, end = hours
    return start <= minute < end if start < end else minute >= start or minute < end


def _crontab(key: str, expression: Any, timezone: str) -> str:
    if not isinstance(expression, str):
        raise ScheduleError(f"{key}.schedule: must be a cron expression string")
    try:
        CronTrigger.from_crontab(expression, timezone=timezone)
    except ValueError as exc:
        raise ScheduleError(
            f"{key}.schedule: {expression!r} is not a cron expression (minute hour day month "
            f"weekday, e.g. '0 8 * * 1-5'): {exc}"
        ) from None
    return " ".join(expression.split())


def _text(raw: Mapping[str, Any], key: str, name: str) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ScheduleError(f"{key}.{name}: must be a non-empty string, got {value!r}")
    return value


def _format_hours(hours: tuple[int, int] | None) -> str | None:
    if hours is None:
        return None
    return "-".join(f"{m // 60:02d}:{m % 60:02d}" for m in hours)


def _format_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
