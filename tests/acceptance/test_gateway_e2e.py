"""The gateway as a real process, in front of real workers, with real crashes.

Clients are real: an aiohttp WebSocket speaking ACP. The model is the fake
server in this process; the turn runs in a ``goclaw worker`` subprocess.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yaml

from goclaw.fake_llm import FakeLLM, Script
from goclaw.states import TERMINAL, TaskState
from tests.acceptance.conftest import AUTH_TOKEN, Stack
from tests.acp_client import AcpClient, small_window_connector

pytestmark = pytest.mark.slow

SLOW_REPLY = " ".join(f"word{i}" for i in range(120))


@pytest.fixture
def fake() -> Iterator[tuple[FakeLLM, str]]:
    server = FakeLLM(Script([]))
    with server.running() as base_url:
        yield server, base_url


def gateway_stack(make_stack, fake, script: dict[str, Any]) -> Stack:
    server, base_url = fake
    server.script = Script.from_data(script)
    stack = make_stack(GOCLAW_GATEWAY__POLL_SECONDS="0.01")
    config = {
        "agents": {"default": {"model": "openai/fake"}},
        "models": {"openai/fake": {"api_base": base_url, "timeout_seconds": 30}},
    }
    (stack.home / "config.yaml").write_text(yaml.safe_dump(config))
    return stack


def session_event_ids(stack: Stack, session: str) -> list[int]:
    rows = stack.broker.db.fetchall(
        "SELECT seq FROM task_events WHERE session_key = ? ORDER BY seq", (session,)
    )
    return [r[0] for r in rows]


def test_sigkill_of_the_gateway_mid_stream_loses_and_repeats_nothing(make_stack, fake):
    stack = gateway_stack(
        make_stack,
        fake,
        {"replies": [{"content": SLOW_REPLY, "chunk_size": 6, "chunk_delay": 0.02}]},
    )
    stack.worker()
    gateway = stack.gateway()
    port = int(gateway.url.rsplit(":", 1)[1])

    async def scenario() -> tuple[list[dict], int, str]:
        async with aiohttp.ClientSession() as http:
            acp = await AcpClient.connect(http, gateway.url, AUTH_TOKEN)
            await acp.hello()
            chat = await acp.call("agent.chat", content="tell me slowly")
            await acp.call("session.events.subscribe", session_key=chat["session_key"])
            before = await acp.events_until(
                lambda e: e["type"] == "chunk" and len(e["data"]["delta"]) > 0
            )
            # A few chunks in: the gateway dies with no warning, mid-stream.
            before = await acp.events_until(lambda e: len(acp.events()) >= len(before) + 3)
            gateway.kill()
            with pytest.raises((ConnectionError, aiohttp.ClientError, asyncio.TimeoutError)):
                while True:
                    await acp.read(timeout=5)
            await acp.close()
            cursor = before[-1]["id"]

            restarted = await asyncio.to_thread(stack.gateway, port)
            acp = await AcpClient.connect(http, restarted.url, AUTH_TOKEN)
            await acp.call(
                "session.events.subscribe", session_key=chat["session_key"], from_event_id=cursor
            )
            after = await acp.events_until(lambda e: e["type"] == "task.succeeded", timeout=60)
            await acp.close()
            return before + after, chat["task_id"], chat["session_key"]

    events, task_id, session = asyncio.run(scenario())
    ids = [e["id"] for e in events]
    assert ids == session_event_ids(stack, session), "every event exactly once, in order"
    text = "".join(e["data"]["delta"] for e in events if e["type"] == "chunk")
    assert text == SLOW_REPLY
    task = stack.broker.get(task_id)
    assert task.state is TaskState.SUCCEEDED and task.attempts == 1, "the run never noticed"


def test_a_slow_client_of_a_real_run_gets_backpressure_and_misses_nothing(make_stack, fake):
    # Megabytes of events: more than the socket buffers between the two ends can hold.
    # (Distinct chunks: LiteLLM ends a stream that repeats one chunk 100 times.)
    text = " ".join(f"w{i:06d}" for i in range(250_000))
    reply = {"content": text, "chunk_size": 2000}
    stack = gateway_stack(make_stack, fake, {"replies": [reply]})
    stack.env["GOCLAW_GATEWAY__SEND_QUEUE_SIZE"] = "4"
    stack.worker()
    gateway = stack.gateway()

    async def scenario() -> tuple[list[int], list[dict], str, int]:
        async with aiohttp.ClientSession(connector=small_window_connector()) as http:
            acp = await AcpClient.connect(http, gateway.url, AUTH_TOKEN, max_msg_size=0)
            await acp.hello()
            chat = await acp.call("agent.chat", content="flood me")
            await acp.call("session.events.subscribe", session_key=chat["session_key"])
            # Do not read while the whole run is written: the client falls behind.
            async with asyncio.timeout(60):
                while stack.broker.get(chat["task_id"]).state not in TERMINAL:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            notices: list[dict] = []
            seen: list[int] = []
            async with asyncio.timeout(60):
                while not seen or seen[-1] < max(session_event_ids(stack, chat["session_key"])):
                    message = await acp.read()
                    if message.get("method") == "system.backpressure":
                        notices.append(message["params"])
                        resume = {
                            "session_key": chat["session_key"],
                            "from_event_id": message["params"]["last_event_id"],
                        }
                        await acp.send_raw(
                            json.dumps(
                                {
                                    "jsonrpc": "2.0",
                                    "id": f"resume-{len(notices)}",
                                    "method": "session.events.subscribe",
                                    "params": resume,
                                }
                            )
                        )
                    elif message.get("method") == "session.event":
                        seen.append(message["params"]["id"])
            await acp.close()
            return seen, notices, chat["session_key"], chat["task_id"]

    seen, notices, session, task_id = asyncio.run(scenario())
    assert notices, "the slow client was told it fell behind"
    assert seen == session_event_ids(stack, session), "resumed with nothing lost or repeated"
    assert stack.broker.get(task_id).state is TaskState.SUCCEEDED
