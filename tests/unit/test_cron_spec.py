"""ScheduleSpec: parsing (errors name the key), JSON round trips and fire times.

Fire times are checked against hand-computed UTC instants, including the DST
rules of goclaw/cron/spec.py: a skipped local time fires once, an hour later in
wall-clock terms; a repeated local time fires once, at its first occurrence.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from goclaw.cron.spec import (
    ScheduleError,
    ScheduleSpec,
    check_name,
    parse_active_hours,
    parse_spec,
    spec_from_json,
)
from goclaw.errors import ConfigError

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()


def spec(**raw: Any) -> ScheduleSpec:
    return parse_spec(raw, "cron.x")


def local(fire: float, zone: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(fire, UTC).astimezone(zone)


# A Monday 00:00 UTC, minute- and quarter-aligned.
T = utc(2026, 1, 5)


# -- valid specs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "described"),
    [
        (
            {"schedule": "0 8 * * 1-5", "kind": "report", "args": {"n": 1, "to": ["a"]}},
            "0 8 * * 1-5 -> kind report",
        ),
        ({"every": "15m", "agent": "ops", "prompt": "check the inbox"}, "every 15m -> agent ops"),
        ({"schedule": "*/5   *  * * *", "prompt": "hello"}, "*/5 * * * * -> agent default"),
        (
            {
                "every": 90,
                "timezone": "Europe/Berlin",
                "kind": "poll",
                "misfire": "run_once",
                "active_hours": "22:00-02:00",
                "enabled": False,
            },
            "every 90s (Europe/Berlin) within 22:00-02:00 -> kind poll",
        ),
        ({"every": "1d", "kind": "purge"}, "every 1d -> kind purge"),
        ({"every": "2h", "kind": "k", "active_hours": "00:00-24:00"}, None),
    ],
)
def test_valid_specs_round_trip_through_json(raw: dict[str, Any], described: str | None) -> None:
    parsed = spec(**raw)
    stored = json.loads(json.dumps(parsed.as_json()))
    again = spec_from_json(stored)
    assert again == parsed
    assert again.as_json() == parsed.as_json()
    if described is not None:
        assert parsed.describe() == described


def test_parsed_values() -> None:
    parsed = spec(
        every="1.5h",
        timezone="Europe/Berlin",
        kind="k",
        args={"a": 1},
        misfire="run_once",
        active_hours="9:05-17:00",
    )
    assert parsed.every == 5400
    assert parsed.schedule is None
    assert parsed.timezone == "Europe/Berlin"
    assert dict(parsed.args) == {"a": 1}
    assert parsed.misfire == "run_once"
    assert parsed.active_hours == (9 * 60 + 5, 17 * 60)
    assert parsed.enabled is True
    assert parsed.agent is None and parsed.prompt is None
    turn = spec(schedule="0 9 * * *", prompt="hi")
    assert (turn.agent, turn.prompt, turn.kind, turn.misfire) == ("default", "hi", None, "skip")
    assert turn.every is None


def test_args_are_a_snapshot() -> None:
    args = {"n": 1}
    parsed = spec(every="1m", kind="k", args=args)
    args["n"] = 2
    assert dict(parsed.args) == {"n": 1}
    with pytest.raises(TypeError):
        parsed.args["n"] = 3  # type: ignore[index]


# -- errors name the key ---------------------------------------------------------------

ERRORS = [
    (
        {"schedule": "61 * * * *", "kind": "k"},
        "cron.x.schedule: '61 * * * *' is not a cron expression",
    ),
    ({"schedule": "* * *", "kind": "k"}, "cron.x.schedule: '* * *' is not a cron expression"),
    ({"schedule": 5, "kind": "k"}, "cron.x.schedule: must be a cron expression string"),
    (
        {"schedule": "* * * * *", "timezone": "Mars/Olympus", "kind": "k"},
        "cron.x.timezone: unknown timezone 'Mars/Olympus'",
    ),
    ({"every": "1m", "timezone": "", "kind": "k"}, "cron.x.timezone: must be a non-empty string"),
    ({"every": "0s", "kind": "k"}, "cron.x.every: '0s' must be more than zero"),
    ({"every": "-5m", "kind": "k"}, "cron.x.every: '-5m' is not a duration"),
    ({"every": "soon", "kind": "k"}, "cron.x.every: 'soon' is not a duration"),
    ({"every": True, "kind": "k"}, "cron.x.every: True is not a duration"),
    ({"every": 0.5, "kind": "k"}, ("cron.x.every: ", "1s", "0.5")),
    ({"every": "367d", "kind": "k"}, ("cron.x.every: ", "366d", "'367d'")),
    (
        {"schedule": "* * * * *", "every": "1m", "kind": "k"},
        "cron.x: give exactly one of schedule (a cron expression) or every",
    ),
    ({"kind": "k"}, "cron.x: give exactly one of schedule (a cron expression) or every"),
    (
        {"every": "1m", "kind": "k", "prompt": "p"},
        "cron.x: give kind (a task) or agent and prompt (a turn), not both",
    ),
    (
        {"every": "1m", "kind": "k", "agent": "ops"},
        "cron.x: give kind (a task) or agent and prompt (a turn), not both",
    ),
    ({"every": "1m"}, "cron.x: say what to run: kind (a task kind) or prompt (an agent turn)"),
    ({"every": "1m", "agent": "ops"}, "cron.x: say what to run"),
    ({"every": "1m", "kind": ""}, "cron.x.kind: must be a non-empty string, got ''"),
    ({"every": "1m", "prompt": "   "}, "cron.x.prompt: must be a non-empty string"),
    (
        {"every": "1m", "kind": "k", "misfire": "always"},
        "cron.x.misfire: must be one of skip, run_once, got 'always'",
    ),
    ({"every": "1m", "kind": "k", "when": "now"}, "cron.x.when: unknown key (known: schedule,"),
    ({"every": "1m", "kind": "k", "args": [1, 2]}, "cron.x.args: must be a mapping"),
    ({"every": "1m", "kind": "k", "args": {"s": {1, 2}}}, "cron.x.args: must be JSON data"),
    ({"every": "1m", "kind": "k", "args": {"x": float("nan")}}, "cron.x.args: must be JSON data"),
    ({"every": "1m", "prompt": "p", "args": {"a": 1}}, "cron.x.args: only a kind takes args"),
    (
        {"every": "1m", "kind": "k", "active_hours": "25:00-01:00"},
        "cron.x.active_hours: '25:00-01:00' is not a time of day range",
    ),
    (
        {"every": "1m", "kind": "k", "active_hours": "08:00-24:30"},
        "cron.x.active_hours: '08:00-24:30' is not a time of day range",
    ),
    (
        {"every": "1m", "kind": "k", "active_hours": "08:00-08:00"},
        "cron.x.active_hours: '08:00-08:00' is empty (use 00:00-24:00 for all day)",
    ),
    (
        {"every": "1m", "kind": "k", "active_hours": "morning"},
        "cron.x.active_hours: expected HH:MM-HH:MM (for example 08:00-22:00), got 'morning'",
    ),
    (
        {"every": "1m", "kind": "k", "active_hours": 8},
        "cron.x.active_hours: expected HH:MM-HH:MM",
    ),
    ({"every": "1m", "kind": "k", "enabled": "yes"}, "cron.x.enabled: must be true or false"),
]


@pytest.mark.parametrize(("raw", "message"), ERRORS, ids=[str(m) for _, m in ERRORS])
def test_errors_name_the_key(raw: dict[str, Any], message: str | tuple[str, ...]) -> None:
    """``message``: text the error contains (or several pieces of it, in order)."""
    with pytest.raises(ScheduleError) as caught:
        parse_spec(raw, "cron.x")
    text = str(caught.value)
    pieces = (message,) if isinstance(message, str) else message
    assert text.startswith(pieces[0]), text
    at = 0
    for piece in pieces:
        assert piece in text[at:], text
        at = text.index(piece, at) + len(piece)
    assert isinstance(caught.value, ConfigError)


def test_a_spec_must_be_a_mapping() -> None:
    with pytest.raises(ScheduleError, match=r"^cron\.x: must be a mapping"):
        parse_spec("every 5m", "cron.x")


def test_stored_specs_are_checked_again() -> None:
    with pytest.raises(ScheduleError, match=r"stored schedule\.every: '0s' must be more than"):
        spec_from_json({"every": "0s", "kind": "k"})
    with pytest.raises(ScheduleError, match=r"^stored schedule\.every: .*1s.*0\.5"):
        spec_from_json(ScheduleSpec(every=0.5, kind="k").as_json())


@pytest.mark.parametrize(
    "name",
    ["a", "0", "nightly-report", "heartbeat.main", "a_b.c-d", "a" * 63, "heartbeat." + "a" * 63],
)
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Nightly", "-x", ".x", "_x", "a" * 81, "has space", "a/b", "ok\n", 5, None]
)
def test_bad_names(name: Any) -> None:
    with pytest.raises(ScheduleError) as caught:
        check_name(name)
    assert f"schedule name {name!r}: lower-case letters" in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "minutes"),
    [
        ("08:00-22:00", (480, 1320)),
        (" 9:05-17:00 ", (545, 1020)),
        ("22:00-02:00", (1320, 120)),
        ("00:00-24:00", (0, 1440)),
        ("23:59-00:00", (1439, 0)),
    ],
)
def test_active_hours(raw: str, minutes: tuple[int, int]) -> None:
    assert parse_active_hours(raw, "k") == minutes


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("25:00-01:00", "is not a time of day range"),
        ("08:60-09:00", "is not a time of day range"),
        ("24:00-01:00", "is not a time of day range"),
        ("08:00-08:00", "is empty"),
        ("morning", "expected HH:MM-HH:MM"),
        ("8-17", "expected HH:MM-HH:MM"),
        (None, "expected HH:MM-HH:MM"),
    ],
)
def test_bad_active_hours(raw: Any, message: str) -> None:
    with pytest.raises(ScheduleError, match=rf"^agents\.a\.heartbeat_active_hours: .*{message}"):
        parse_active_hours(raw, "agents.a.heartbeat_active_hours")


# -- fire times -------------------------------------------------------------------------


def test_every_minute_over_an_hour_fires_sixty_times() -> None:
    fires = list(spec(schedule="* * * * *", kind="k").fires(T, T + 3600))
    assert fires == [T + 60 * i for i in range(1, 61)]
    assert all(isinstance(f, float) for f in fires)
    # Not aligned to the minute: still 60 in any hour.
    assert len(list(spec(schedule="* * * * *", kind="k").fires(T + 17, T + 3617))) == 60


def test_after_is_exclusive_and_until_inclusive() -> None:
    minutely = spec(schedule="* * * * *", kind="k")
    assert list(minutely.fires(T, T + 60)) == [T + 60]
    assert list(minutely.fires(T - 1, T)) == [T]
    assert list(minutely.fires(T, T)) == []
    assert list(minutely.fires(T, T + 59)) == []
    assert list(minutely.fires(T + 60, T + 10)) == []  # an empty window, backwards
    quarter = spec(every="15m", kind="k")
    assert list(quarter.fires(T, T + 900)) == [T + 900]
    assert list(quarter.fires(T - 1, T)) == [T]
    assert list(quarter.fires(T, T + 899)) == []


def test_after_between_whole_seconds_is_still_exclusive_only_of_itself() -> None:
    """Regression (once a bug): a fire within a second after a fractional ``after`` is lost.

    ``fires`` asks APScheduler for the next fire at ``after + 1s``; that is only right
    when ``after`` is itself a fire time. ``after`` is also a schedule's created_at or
    the moment it was re-enabled or changed (the clock, with a fraction), so a schedule
    added at 11:59:59.5 never fires at 12:00:00.
    """
    minutely = spec(schedule="* * * * *", kind="k")
    assert list(minutely.fires(T - 0.5, T + 60)) == [T, T + 60]
    assert list(spec(every="1m", kind="k").fires(T - 0.25, T)) == [T]


@pytest.mark.parametrize("offset", [1, 7 * 60 + 13, 899, 901, 3599, 86400 * 3 + 1234])
@pytest.mark.parametrize("timezone", ["UTC", "Europe/Berlin", "Asia/Kolkata"])
def test_every_15m_is_aligned_to_the_quarter_hour(offset: float, timezone: str) -> None:
    quarter = spec(every="15m", timezone=timezone, kind="k")
    after = T + offset
    fires = list(quarter.fires(after, after + 4 * 3600))
    assert len(fires) == 16
    assert all(f % 900 == 0 for f in fires)
    assert fires[0] - after <= 900
    assert fires == [fires[0] + 900 * i for i in range(16)]


@pytest.mark.parametrize("timezone", ["Europe/Berlin", "America/New_York"])
def test_intervals_keep_their_pace_across_dst(timezone: str) -> None:
    """An interval counts real time: 15 minutes apart through both changes."""
    quarter = spec(every="15m", timezone=timezone, kind="k")
    for day in (utc(2026, 3, 6), utc(2026, 3, 27), utc(2026, 10, 23), utc(2026, 10, 30)):
        fires = list(quarter.fires(day, day + 4 * 86400))
        assert fires == [day + 900 * i for i in range(1, 4 * 96 + 1)]


def _daily(expression: str, zone: ZoneInfo, first: date, last: date) -> list[datetime]:
    after = datetime.combine(first, datetime.min.time(), zone).timestamp()
    until = datetime.combine(last + timedelta(days=1), datetime.min.time(), zone).timestamp()
    fires = spec(schedule=expression, timezone=str(zone), kind="k").fires(after, until)
    return [local(f, zone) for f in fires]


def test_berlin_spring_forward_fires_once_an_hour_later() -> None:
    fires = _daily("30 2 * * *", BERLIN, date(2026, 3, 1), date(2026, 3, 31))
    assert [f.date() for f in fires] == [date(2026, 3, d) for d in range(1, 32)]
    for fire in fires:
        if fire.date() == date(2026, 3, 29):
            # 02:30 does not exist that day: 03:30 CEST, which is 01:30 UTC.
            assert (fire.hour, fire.minute, fire.utcoffset()) == (3, 30, timedelta(hours=2))
            assert fire.timestamp() == utc(2026, 3, 29, 1, 30)
        else:
            assert (fire.hour, fire.minute) == (2, 30)
    assert fires[27].timestamp() == utc(2026, 3, 28, 1, 30)  # CET
    assert fires[29].timestamp() == utc(2026, 3, 30, 0, 30)  # CEST


def test_berlin_fall_back_fires_once_at_the_first_occurrence() -> None:
    fires = _daily("30 2 * * *", BERLIN, date(2026, 10, 1), date(2026, 10, 31))
    assert [f.date() for f in fires] == [date(2026, 10, d) for d in range(1, 32)]
    assert all((f.hour, f.minute) == (2, 30) for f in fires)
    [sunday] = [f for f in fires if f.date() == date(2026, 10, 25)]
    assert sunday.timestamp() == utc(2026, 10, 25, 0, 30)  # 02:30 CEST, not 02:30 CET
    assert sunday.utcoffset() == timedelta(hours=2)
    assert fires[25].timestamp() == utc(2026, 10, 26, 1, 30)  # CET from then on


def test_fall_back_second_occurrence_not_fired_after_restart() -> None:
    """A scheduler resuming from the first occurrence (its last_fire_at) skips the second."""
    daily = spec(schedule="30 2 * * *", timezone="Europe/Berlin", kind="k")
    first = utc(2026, 10, 25, 0, 30)
    assert list(daily.fires(first, utc(2026, 10, 26, 1, 30))) == [utc(2026, 10, 26, 1, 30)]


def test_fire_times_do_not_depend_on_where_the_window_starts() -> None:
    """Regression (once a bug):
    the repeated-time rule only looks at the window's start (or the previous fire).

    From 00:45 UTC on 2026-10-25 (02:45 CEST, between the two 02:30s) the second 02:30
    (01:30 UTC) is yielded, although the rule says that local time already fired. A
    schedule re-enabled (or added, or changed by sync) at 02:45 CEST fires twice that
    day: set_enabled/sync set last_fire_at to that moment.
    """
    daily = spec(schedule="30 2 * * *", timezone="Europe/Berlin", kind="k")
    assert list(daily.fires(utc(2026, 10, 25, 0, 45), utc(2026, 10, 25, 2))) == []


def test_repeated_hour_with_two_fire_times_fires_each_once() -> None:
    """Regression (once a bug): '0,30 2 * * *' fires four times on 2026-10-25 in Berlin.

    The duplicate check compares a fire's wall time with the previous fire's only, so
    02:00 CEST, 02:30 CEST, 02:00 CET, 02:30 CET all fire; by the module's rule the last
    two are second occurrences of local times that already fired.
    """
    fires = _daily("0,30 2 * * *", BERLIN, date(2026, 10, 25), date(2026, 10, 25))
    assert [f.timestamp() for f in fires] == [utc(2026, 10, 25, 0, 0), utc(2026, 10, 25, 0, 30)]


def test_new_york_spring_forward() -> None:
    # DST starts 2026-03-08 at 02:00 EST: 01:30 still exists (EST), 02:30 does not.
    fires = _daily("30 1 * * *", NEW_YORK, date(2026, 3, 6), date(2026, 3, 10))
    assert [f.timestamp() for f in fires] == [
        utc(2026, 3, 6, 6, 30),
        utc(2026, 3, 7, 6, 30),
        utc(2026, 3, 8, 6, 30),
        utc(2026, 3, 9, 5, 30),
        utc(2026, 3, 10, 5, 30),
    ]
    assert all((f.hour, f.minute) == (1, 30) for f in fires)
    skipped = _daily("30 2 * * *", NEW_YORK, date(2026, 3, 7), date(2026, 3, 9))
    assert [f.timestamp() for f in skipped] == [
        utc(2026, 3, 7, 7, 30),
        utc(2026, 3, 8, 7, 30),  # 03:30 EDT
        utc(2026, 3, 9, 6, 30),
    ]
    assert (skipped[1].hour, skipped[1].minute) == (3, 30)


def test_new_york_fall_back_fires_once() -> None:
    # DST ends 2026-11-01 at 02:00 EDT: 01:30 occurs at 05:30 UTC (EDT) and 06:30 UTC (EST).
    fires = _daily("30 1 * * *", NEW_YORK, date(2026, 10, 30), date(2026, 11, 3))
    assert [f.timestamp() for f in fires] == [
        utc(2026, 10, 30, 5, 30),
        utc(2026, 10, 31, 5, 30),
        utc(2026, 11, 1, 5, 30),
        utc(2026, 11, 2, 6, 30),
        utc(2026, 11, 3, 6, 30),
    ]
    assert all((f.hour, f.minute) == (1, 30) for f in fires)


def test_a_whole_year_of_daily_fires_in_berlin() -> None:
    fires = _daily("30 2 * * *", BERLIN, date(2026, 1, 1), date(2026, 12, 31))
    assert len(fires) == 365
    assert len({f.date() for f in fires}) == 365
    odd = [f for f in fires if (f.hour, f.minute) != (2, 30)]
    assert [f.date() for f in odd] == [date(2026, 3, 29)]


# -- active hours -------------------------------------------------------------------------


def test_active_hours_wrap_past_midnight() -> None:
    night = spec(every="30m", kind="k", active_hours="22:00-02:00")
    day = utc(2026, 1, 5)
    fires = list(night.fires(day - 1, day + 86400 - 1))  # 00:00 .. 23:30
    wall = [(local(f, ZoneInfo("UTC")).hour, local(f, ZoneInfo("UTC")).minute) for f in fires]
    assert wall == [(0, 0), (0, 30), (1, 0), (1, 30), (22, 0), (22, 30), (23, 0), (23, 30)]
    # over a week: 8 a day
    assert len(list(night.fires(day - 1, day + 7 * 86400 - 1))) == 56


def test_active_hours_all_day() -> None:
    always = spec(every="30m", kind="k", active_hours="00:00-24:00")
    plain = spec(every="30m", kind="k")
    day = utc(2026, 1, 5)
    assert list(always.fires(day, day + 86400)) == list(plain.fires(day, day + 86400))
    assert len(list(always.fires(day, day + 86400))) == 48


def test_active_hours_end_is_exclusive_for_cron_too() -> None:
    hourly = spec(schedule="0 * * * *", kind="k", active_hours="08:00-10:00")
    day = utc(2026, 1, 5)
    assert list(hourly.fires(day, day + 86400)) == [day + 8 * 3600, day + 9 * 3600]


@pytest.mark.parametrize(
    ("day", "first_utc_hour"),
    [((2026, 1, 15), 8), ((2026, 7, 15), 7), ((2026, 3, 29), 7), ((2026, 10, 25), 8)],
)
def test_active_hours_use_the_timezone(day: tuple[int, int, int], first_utc_hour: int) -> None:
    office = spec(every="30m", timezone="Europe/Berlin", kind="k", active_hours="09:00-17:00")
    start = datetime(*day, tzinfo=BERLIN).timestamp()  # local midnight
    end = (datetime(*day, tzinfo=BERLIN) + timedelta(days=1)).timestamp()
    fires = list(office.fires(start, end))
    first = utc(*day, first_utc_hour)
    assert fires == [first + 1800 * i for i in range(16)]
    assert [local(f, BERLIN).strftime("%H:%M") for f in fires][::4] == [
        "09:00",
        "11:00",
        "13:00",
        "15:00",
    ]
