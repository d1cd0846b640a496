"""ACP ``cron.*`` over a real WebSocket on 127.0.0.1, against the real gateway, broker, database
and policy: schedules are added, listed, fired by hand, paused and removed; a bad definition is
refused with the message that names its problem, and the connection goes on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest

from goclaw.audit import AuditLog, audit_path
from goclaw.cron.spec import parse_spec
from goclaw.cron.store import ScheduleStore
from goclaw.gateway import jsonrpc
from tests.acp_client import AcpClient, AcpError
from tests.gateway_support import TOKEN, serve_gateway, write_home
from tests.policy_support import write_policy

READ_ONLY = "version: 1\nallow: [acp.read]\n"
POLL = {"every": "15m", "kind": "noop", "args": {"feed": "news"}}
DIGEST = {
    "schedule": "0 8 * * 1-5",
    "timezone": "Europe/Berlin",
    "agent": "default",
    "prompt": "Summarise the overnight mail.",
    "misfire": "run_once",
}


@pytest.fixture
def home(tmp_path):
    return write_home(tmp_path, TOKEN)


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[AcpClient]:
    async with aiohttp.ClientSession() as session:
        acp = await AcpClient.connect(session, url, TOKEN)
        try:
            yield acp
        finally:
            await acp.close()


async def refused(acp: AcpClient, method: str, **params) -> AcpError:
    with pytest.raises(AcpError) as error:
        await acp.call(method, **params)
    return error.value


def names(listed: dict) -> list[str]:
    return [s["name"] for s in listed["schedules"]]


def test_add_list_run_now_history_pause_and_remove(broker, home):
    with serve_gateway(broker, home) as (url, _):

        async def scenario() -> None:
            async with connect(url) as acp:
                early = await refused(acp, "cron.add", name="poll", spec=POLL)
                assert early.code == jsonrpc.HELLO_REQUIRED
                hello = await acp.hello()
                assert {"cron.list", "cron.add", "cron.run_now"} <= set(hello["methods"])
                assert await acp.call("cron.list") == {"schedules": []}

                added = (await acp.call("cron.add", name="poll", spec=POLL))["schedule"]
                assert added["name"] == "poll" and added["source"] == "runtime"
                assert added["enabled"] is True and added["last_fire_at"] is None
                assert added["spec"]["every"] == 900 and added["spec"]["args"] == {"feed": "news"}
                assert added["describe"] == "every 15m -> kind noop"
                digest = (await acp.call("cron.add", name="digest", spec=DIGEST))["schedule"]
                assert digest["spec"]["schedule"] == "0 8 * * 1-5"
                assert digest["spec"]["timezone"] == "Europe/Berlin"
                assert digest["spec"]["misfire"] == "run_once"
                listed = await acp.call("cron.list")
                assert names(listed) == ["digest", "poll"]
                assert listed["schedules"][1] == added

                taken = await refused(acp, "cron.add", name="poll", spec=DIGEST)
                assert taken.code == jsonrpc.CONFLICT and "'poll' exists" in str(taken)
                assert taken.data == {"name": "conflict", "what": "schedule"}

                fired = await acp.call("cron.run_now", name="poll")
                assert set(fired) == {"fire_at", "task_id"}
                task = await acp.call("task.get", task_id=fired["task_id"])
                assert task["kind"] == "noop" and task["state"] == "QUEUED"
                assert task["args"] == {"feed": "news"}
                assert task["idempotency_key"] == f"cron:poll:manual:{fired['fire_at']!r}"
                history = await acp.call("cron.history", name="poll")
                [fire] = history["fires"]
                assert fire["outcome"] == "manual" and fire["task_id"] == fired["task_id"]
                assert fire["fire_at"] == fired["fire_at"] and fire["task_state"] == "QUEUED"
                assert fire["schedule"] == "poll" and fire["missed"] == 0

                turn = await acp.call("cron.run_now", name="digest")
                task = await acp.call("task.get", task_id=turn["task_id"])
                assert task["kind"] == "agent"
                assert task["args"]["prompt"] == "Summarise the overnight mail."
                assert (await acp.call("cron.history", name="digest", limit=1))["fires"][0][
                    "outcome"
                ] == "manual"
                assert (await acp.call("cron.history", name="poll", limit=1))["fires"] == [fire]

                paused = (await acp.call("cron.disable", name="poll"))["schedule"]
                assert paused["enabled"] is False
                listed = await acp.call("cron.list")
                assert [s["enabled"] for s in listed["schedules"]] == [True, False]
                resumed = (await acp.call("cron.enable", name="poll"))["schedule"]
                assert resumed["enabled"] is True

                assert await acp.call("cron.remove", name="poll") == {"removed": "poll"}
                assert names(await acp.call("cron.list")) == ["digest"]
                for method in ("cron.remove", "cron.enable", "cron.run_now", "cron.history"):
                    gone = await refused(acp, method, name="poll")
                    assert gone.code == jsonrpc.NOT_FOUND, method
                    assert "no schedule named 'poll'" in str(gone), method
                    assert gone.data == {"name": "not_found", "what": "schedule"}

        run(scenario())
    [submitted] = [t for t in broker.tasks() if t.kind == "noop"]
    assert submitted.queue == "default"


def test_bad_definitions_are_refused_precisely_and_the_connection_goes_on(broker, home):
    cases = [
        (
            "minutely",
            {"schedule": "61 * * * *", "kind": "noop"},
            "cron.minutely.schedule: '61 * * * *' is not a cron expression",
        ),
        (
            "mars",
            {"schedule": "0 8 * * *", "timezone": "Mars/Base", "kind": "noop"},
            "cron.mars.timezone: unknown timezone 'Mars/Base'",
        ),
        ("never", {"every": "0s", "kind": "noop"}, "cron.never.every: '0s' must be more than zero"),
        ("Bad Name!", POLL, "schedule name 'Bad Name!': lower-case letters"),
        ("colour", {**POLL, "colour": "red"}, "cron.colour.colour: unknown key"),
        ("idle", {"every": "15m"}, "cron.idle: say what to run"),
        ("both", {**POLL, "schedule": "* * * * *"}, "cron.both: give exactly one of schedule"),
    ]
    with serve_gateway(broker, home) as (url, _):

        async def scenario() -> None:
            async with connect(url) as acp:
                await acp.hello()
                for name, spec, message in cases:
                    error = await refused(acp, "cron.add", name=name, spec=spec)
                    assert error.code == jsonrpc.INVALID_PARAMS, (name, error)
                    assert message in error.error["message"], (name, error)
                for params, message in [
                    ({"name": "poll", "spec": POLL, "when": "now"}, "unknown param 'when'"),
                    ({"name": "poll", "spec": "every 15m"}, "spec must be an object"),
                    ({"spec": POLL}, "name is required"),
                    ({"name": "poll", "spec": {**POLL, "every": "soon"}}, "cron.poll.every:"),
                ]:
                    reply = await acp.request("cron.add", **params)
                    assert reply["error"]["code"] == jsonrpc.INVALID_PARAMS, (params, reply)
                    assert message in reply["error"]["message"], (params, reply)
                bad_name = await refused(acp, "cron.history", name="../etc")
                assert bad_name.code == jsonrpc.INVALID_PARAMS
                too_many = await refused(acp, "cron.history", name="poll", limit=501)
                assert "limit must be between 1 and 500" in str(too_many)
                assert await acp.call("cron.list") == {"schedules": []}, "nothing was stored"

                added = await acp.call("cron.add", name="poll", spec=POLL)
                assert added["schedule"]["name"] == "poll"
                assert names(await acp.call("cron.list")) == ["poll"]

        run(scenario())


def test_a_schedule_from_config_yaml_is_not_removed_over_acp(broker, home):
    spec = parse_spec({"every": "1h", "kind": "noop"}, "cron.cfg")
    ScheduleStore(broker.db).sync({"cfg": ("config", spec)})
    with serve_gateway(broker, home) as (url, _):

        async def scenario() -> None:
            async with connect(url) as acp:
                await acp.hello()
                error = await refused(acp, "cron.remove", name="cfg")
                assert error.code == jsonrpc.CONFLICT
                assert "'cfg' comes from config.yaml (config)" in str(error)
                taken = await refused(acp, "cron.add", name="cfg", spec=POLL)
                assert taken.code == jsonrpc.CONFLICT and "exists (config)" in str(taken)
                [held] = (await acp.call("cron.list"))["schedules"]
                assert held["source"] == "config" and held["spec"]["every"] == 3600
                # Disabling is how one pauses a config schedule without editing config.yaml.
                assert (await acp.call("cron.disable", name="cfg"))["schedule"]["enabled"] is False

        run(scenario())


def test_a_read_only_client_lists_but_cannot_add(broker, home):
    write_policy(home, READ_ONLY)
    audit = AuditLog(broker.db, audit_path(home))
    with serve_gateway(broker, home) as (url, _):

        async def scenario() -> None:
            async with connect(url) as acp:
                await acp.hello()
                denied = await refused(acp, "cron.add", name="poll", spec=POLL)
                assert denied.code == jsonrpc.POLICY_DENIED
                assert denied.data == {"name": "policy_denied", "capability": "acp.mutate"}
                assert "acp.mutate is not allowed" in str(denied)
                assert await acp.call("cron.list") == {"schedules": []}

        run(scenario())
    records = [(r.capability, r.subject.split(" from ")[0], r.decision) for r in audit.query()]
    assert ("acp.mutate", "cron.add", "deny") in records
    assert ("acp.read", "cron.list", "allow") in records
    assert ScheduleStore(broker.db).list() == []
