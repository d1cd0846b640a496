"""ACP over a real WebSocket on 127.0.0.1, against the real gateway, broker and database.

Turns are run by the in-process agent harness (real loop, real LiteLLM
router, fake model server over HTTP), so every event a client sees was
written by the same code a worker runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from goclaw import event_log
from goclaw.agent.events import RunEvents
from goclaw.agent.sessions import SessionStore
from goclaw.broker import Outcome
from goclaw.gateway import jsonrpc
from tests.acp_client import AcpClient, AcpError, small_window_connector
from tests.gateway_support import serve_gateway, write_home
from tests.integration.agent_harness import agent_harness

TOKEN = "a" * 32
REPLY = "Paris is the capital of France, and this reply streams in small pieces."


@pytest.fixture
def home(tmp_path):
    return write_home(tmp_path, TOKEN)


@contextlib.contextmanager
def gateway(broker, home, script, **gateway_env: str) -> Iterator[tuple[str, object]]:
    settings = {"poll_seconds": "0.01", **gateway_env}
    with (
        agent_harness(broker, home, script) as harness,
        serve_gateway(broker, home, **settings) as (url, _),
    ):
        yield url, harness


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def connect(url: str, *, slow: bool = False, **kw) -> AsyncIterator[AcpClient]:
    connector = small_window_connector() if slow else None
    async with aiohttp.ClientSession(connector=connector) as session:
        acp = await AcpClient.connect(session, url, TOKEN, **kw)
        try:
            yield acp
        finally:
            await acp.close()


async def off_loop(broker, fn, *args, **kw):
    """Run blocking database work on a thread, closing that thread's connection after."""

    def call():
        try:
            return fn(*args, **kw)
        finally:
            broker.db.close()

    return await asyncio.to_thread(call)


def run_next_turn(harness, broker) -> None:
    """What a worker thread does: run the next turn, then close this thread's connection."""
    try:
        harness.run_next()
    finally:
        broker.db.close()


def reply_script(n: int = 1) -> dict:
    return {"replies": [{"content": REPLY, "chunk_size": 4}] * n}


def test_every_method_over_one_connection(broker, home):
    with gateway(broker, home, reply_script(2)) as (url, harness):

        async def scenario() -> None:
            async with connect(url) as acp:
                hello = await acp.hello()
                assert hello["version"] == 1 and "agent.chat" in hello["methods"]

                agents = await acp.call("agent.list")
                assert [a["id"] for a in agents["agents"]] == ["default"]

                chat = await acp.call("agent.chat", content="What is the capital of France?")
                task_id, session_key = chat["task_id"], chat["session_key"]
                status = await acp.call("agent.status", agent_id="default")
                assert status["queued"] == 1 and status["running"] == 0

                sub = await acp.call("session.events.subscribe", session_key=session_key)
                assert sub["cursor"] == "seq"
                runner = threading.Thread(target=run_next_turn, args=(harness, broker))
                runner.start()
                events = await acp.events_until(lambda e: e["type"] == "task.succeeded")
                runner.join()

                ids = [e["id"] for e in events]
                assert ids == sorted(set(ids)), "ids only increase, each once"
                types = [e["type"] for e in events]
                assert types[0] == "task.submitted" and types[-1] == "task.succeeded"
                assert "run.started" in types and "run.completed" in types
                text = "".join(e["data"]["delta"] for e in events if e["type"] == "chunk")
                assert text == REPLY

                task = await acp.call("task.get", task_id=task_id)
                assert task["state"] == "SUCCEEDED" and task["result"]["reply"] == REPLY
                listed = await acp.call("task.list", kind="agent", limit=5)
                assert [t["id"] for t in listed["tasks"]] == [task_id]
                history = await acp.call("session.history", session_key=session_key)
                assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
                sessions = await acp.call("session.list")
                assert [s["session_key"] for s in sessions["sessions"]] == [session_key]
                system = await acp.call("system.status")
                assert system["tasks"]["SUCCEEDED"] == 1 and system["connections"] == 1

                queued = await acp.call("agent.chat", content="again", session_key=session_key)
                aborted = await acp.call("agent.abort", task_id=queued["task_id"])
                assert aborted == {"task_id": queued["task_id"], "state": "CANCELED"}
                with pytest.raises(AcpError) as again:
                    await acp.call("agent.abort", task_id=queued["task_id"])
                assert again.value.code == jsonrpc.CONFLICT

                done = await acp.call(
                    "session.events.unsubscribe", subscription=sub["subscription"]
                )
                assert done["last_event_id"] >= ids[-1]
                with pytest.raises(AcpError) as gone:
                    await acp.call("session.events.unsubscribe", subscription=sub["subscription"])
                assert gone.value.code == jsonrpc.NOT_FOUND

        run(scenario())


def test_version_negotiation_and_hello_before_mutation(broker, home):
    with gateway(broker, home, reply_script()) as (url, _):

        async def scenario() -> None:
            async with connect(url) as acp:
                with pytest.raises(AcpError) as early:
                    await acp.call("agent.chat", content="hi")
                assert early.value.code == jsonrpc.HELLO_REQUIRED
                assert (await acp.call("agent.list"))["agents"], "reads need no hello"
                with pytest.raises(AcpError) as mismatch:
                    await acp.call("system.hello", min_version=2, max_version=5)
                assert mismatch.value.code == jsonrpc.VERSION_MISMATCH
                assert mismatch.value.data["supported"] == [1, 1]
                chosen = await acp.call("system.hello", min_version=1, max_version=7)
                assert chosen["version"] == 1
                assert (await acp.call("agent.chat", content="hi"))["task_id"] > 0

        run(scenario())


def test_bad_frames_get_the_right_error_and_the_connection_lives_on(broker, home):
    with gateway(broker, home, reply_script(), max_frame_bytes="4096") as (url, _):

        async def scenario() -> None:
            async with connect(url) as acp:

                async def raw(text: str) -> dict:
                    await acp.send_raw(text)
                    message = await acp.read()
                    acp.replies.pop(message.get("id"), None)
                    return message

                assert (await raw("{not json"))["error"]["code"] == jsonrpc.PARSE_ERROR
                assert (await raw("[1, 2]"))["error"]["code"] == jsonrpc.INVALID_REQUEST
                assert (await raw('"hello"'))["error"]["code"] == jsonrpc.INVALID_REQUEST
                bad_version = await raw('{"jsonrpc": "1.0", "id": 7, "method": "agent.list"}')
                assert bad_version["id"] == 7
                assert bad_version["error"]["code"] == jsonrpc.INVALID_REQUEST
                positional = await raw(
                    '{"jsonrpc": "2.0", "id": 8, "method": "task.get", "params": [1]}'
                )
                assert positional["error"]["code"] == jsonrpc.INVALID_PARAMS
                big = json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": 9,
                        "method": "agent.chat",
                        "params": {"content": "x" * 5000},
                    }
                )
                too_big = await raw(big)
                assert too_big["error"]["code"] == jsonrpc.FRAME_TOO_LARGE
                await acp.ws.send_bytes(b"\x00\x01")
                assert (await acp.read())["error"]["code"] == jsonrpc.INVALID_REQUEST

                for method, params, code in [
                    ("no.such.method", {}, jsonrpc.METHOD_NOT_FOUND),
                    ("task.get", {"task_id": "7"}, jsonrpc.INVALID_PARAMS),
                    ("task.get", {"task_id": True}, jsonrpc.INVALID_PARAMS),
                    ("task.get", {"task_id": 424242}, jsonrpc.NOT_FOUND),
                    ("task.list", {"limit": 10_000}, jsonrpc.INVALID_PARAMS),
                    ("task.list", {"state": "SLEEPING"}, jsonrpc.INVALID_PARAMS),
                    ("agent.list", {"surprise": 1}, jsonrpc.INVALID_PARAMS),
                    ("agent.status", {"agent_id": "ghost"}, jsonrpc.NOT_FOUND),
                    ("session.history", {"session_key": "nope"}, jsonrpc.NOT_FOUND),
                    ("session.events.subscribe", {}, jsonrpc.INVALID_PARAMS),
                    ("session.events.subscribe", {"task_id": 99999}, jsonrpc.NOT_FOUND),
                ]:
                    reply = await acp.request(method, **params)
                    assert reply["error"]["code"] == code, (method, params, reply)

                # A notification gets no reply, not even for an unknown method.
                await acp.send_raw('{"jsonrpc": "2.0", "method": "no.such.method"}')
                await acp.send_raw('{"jsonrpc": "2.0", "method": "agent.list", "params": 5}')
                reply = await acp.request("agent.list")
                assert "result" in reply and acp.notifications == []

        run(scenario())


def test_queue_saturated_has_a_retry_after_hint(broker, home):
    with gateway(broker, home, reply_script()) as (url, harness):
        harness.configure({"max_queue_depth": 2})

        async def scenario() -> None:
            await asyncio.sleep(1.1)  # the gateway's catalog reloads within a second
            async with connect(url) as acp:
                await acp.hello()
                for _ in range(2):
                    await acp.call("agent.chat", content="work")
                with pytest.raises(AcpError) as full:
                    await acp.call("agent.chat", content="one too many")
                assert full.value.code == jsonrpc.QUEUE_SATURATED
                assert full.value.data["retry_after"] > 0 and full.value.data["max"] == 2

        run(scenario())


def test_idempotency_key_returns_the_same_task(broker, home):
    with gateway(broker, home, reply_script()) as (url, _):

        async def scenario() -> None:
            async with connect(url) as acp:
                await acp.hello()
                first = await acp.call("agent.chat", content="once", idempotency_key="k1")
                second = await acp.call("agent.chat", content="once", idempotency_key="k1")
                assert first["task_id"] == second["task_id"]
                assert first["created"] and not second["created"]

        run(scenario())


def write_events(broker, session: str, count: int, size: int) -> None:
    """Agent events written by the real event writer, as a worker would, in a few commits."""
    [submitted] = broker.submit("noop")
    SessionStore(broker.db).ensure(session, "default")
    events = RunEvents(
        broker.db, SessionStore(broker.db), task_id=submitted.task_id, session_key=session
    )
    for start in range(0, count, 250):
        with broker.db.transaction():
            for i in range(start, min(count, start + 250)):
                events.emit("tool.result", ok=True, index=i, pad="x" * size)


def test_replay_is_paged_and_a_purge_is_a_precise_gap(broker, home):
    with gateway(broker, home, reply_script(), replay_page_size="50") as (url, _):
        write_events(broker, "old", 400, 10)
        [claim] = broker.claim("w")
        broker.start(claim)
        broker.report(claim, Outcome.succeeded())

        async def scenario() -> None:
            async with connect(url) as acp:
                sub = await acp.call("session.events.subscribe", session_key="old")
                assert sub["head_event_id"] == 400
                events = await acp.events_until(lambda e: e["id"] == 400)
                assert [e["id"] for e in events] == list(range(1, 401))

                purged = await off_loop(
                    broker, event_log.purge, broker.db, finished_before=time.time() + 1
                )
                assert purged == event_log.Purged(tasks=1, events=400 + 4)  # + its state changes
                with pytest.raises(AcpError) as gap:
                    await acp.call("session.events.subscribe", session_key="old", from_event_id=10)
                assert gap.value.code == jsonrpc.REPLAY_GAP
                assert gap.value.data == {"name": "replay_gap", "cursor": 10, "purged_upto": 400}
                resumed = await acp.call(
                    "session.events.subscribe", session_key="old", from_event_id=400
                )
                assert resumed["subscription"]

        run(scenario())


def test_a_slow_client_gets_backpressure_and_resumes_without_loss(broker, home):
    total = 3000
    with gateway(broker, home, reply_script(), send_queue_size="16") as (url, _):
        SessionStore(broker.db).ensure("busy", "default")

        async def scenario() -> None:
            async with connect(url, slow=True, max_msg_size=0) as acp:
                sub = await acp.call("session.events.subscribe", session_key="busy")
                # Stop reading while a burst is written: the socket and then the queue fill.
                await off_loop(broker, write_events, broker, "busy", total, 2000)
                await asyncio.sleep(1.0)
                seen: list[int] = []
                backpressure = None
                async with asyncio.timeout(60):
                    while len(seen) < total:
                        message = await acp.read()
                        if message.get("method") == "system.backpressure":
                            backpressure = message["params"]
                            assert backpressure["subscription"] == sub["subscription"]
                            assert backpressure["last_event_id"] == (seen[-1] if seen else 0)
                            await acp.ws.send_str(
                                json.dumps(
                                    {
                                        "jsonrpc": "2.0",
                                        "id": "resume",
                                        "method": "session.events.subscribe",
                                        "params": {
                                            "session_key": "busy",
                                            "from_event_id": backpressure["last_event_id"],
                                        },
                                    }
                                )
                            )
                        elif message.get("method") == "session.event":
                            seen.append(message["params"]["id"])
                assert backpressure is not None, "a client that stops reading is told"
                first = seen[0]
                assert seen == list(range(first, first + total)), "every event once, in order"

        run(scenario())


def test_connections_over_the_limit_get_503_and_the_rest_keep_working(broker, home):
    with gateway(broker, home, reply_script(), max_connections="2") as (url, _):

        async def scenario() -> None:
            async with connect(url) as first, connect(url) as second:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    async with connect(url):
                        pass
                assert refused.value.status == 503
                assert (await first.call("agent.list"))["agents"]
                assert (await second.call("agent.list"))["agents"]
            async with connect(url) as again:  # closed ones free their places
                assert (await again.call("system.status"))["connections"] == 1

        run(scenario())


def test_the_events_doorbell_wakes_the_gateway_without_waiting_for_a_poll(broker, home):
    with gateway(broker, home, reply_script(), poll_seconds="30") as (url, _):
        SessionStore(broker.db).ensure("rung", "default")
        [submitted] = broker.submit("noop")
        events = RunEvents(
            broker.db,
            SessionStore(broker.db),
            task_id=submitted.task_id,
            session_key="rung",
            doorbell=broker.doorbell,
        )

        async def scenario() -> float:
            async with connect(url) as acp:
                await acp.call("session.events.subscribe", session_key="rung")
                await asyncio.sleep(0.5)  # the pump is idle, its next poll 30 s away
                started = time.monotonic()
                events.emit("tool.result", ok=True)
                await acp.events_until(lambda e: e["type"] == "tool.result", timeout=10)
                return time.monotonic() - started

        assert run(scenario()) < 1.0
